"""What a refit changed in a guest: package versions and paths, before against after.

Package versions come from the guest's package database (read by the guest's package
manager plug-in), paths from a walk of the mounted tree. A directory created or removed
as a whole is reported once, not with everything under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from careen.guest.base import Guest


@dataclass(frozen=True)
class Snapshot:
    packages: dict[str, str]
    paths: frozenset[str]


@dataclass(frozen=True)
class Changes:
    upgraded: tuple[tuple[str, str, str], ...] = ()  # name, before, after
    installed: tuple[tuple[str, str], ...] = ()
    removed_packages: tuple[tuple[str, str], ...] = ()
    created: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "packages": {
                "changed": [{"name": n, "before": b, "after": a} for n, b, a in self.upgraded],
                "installed": [{"name": n, "version": v} for n, v in self.installed],
                "removed": [{"name": n, "version": v} for n, v in self.removed_packages],
            },
            "paths": {"created": list(self.created), "removed": list(self.removed)},
        }


def snapshot(guest: Guest, packages: dict[str, str]) -> Snapshot:
    return Snapshot(dict(packages), frozenset(path for path, _ in guest.walk("/")))


def _collapse(paths: set[str]) -> tuple[str, ...]:
    """Keep only the top-most of the given paths (a removed dir hides its contents)."""
    out = []
    for path in sorted(paths):
        if not any(str(parent) in paths for parent in PurePosixPath(path).parents):
            out.append(path)
    return tuple(out)


def diff(before: Snapshot, after: Snapshot) -> Changes:
    b, a = before.packages, after.packages
    return Changes(
        upgraded=tuple((n, b[n], a[n]) for n in sorted(b.keys() & a.keys()) if b[n] != a[n]),
        installed=tuple((n, a[n]) for n in sorted(a.keys() - b.keys())),
        removed_packages=tuple((n, b[n]) for n in sorted(b.keys() - a.keys())),
        created=_collapse(set(after.paths - before.paths)),
        removed=_collapse(set(before.paths - after.paths)),
    )
