"""apt and dpkg, for Debian, Ubuntu and their derivatives."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from careen.guest import osinfo
from careen.guest.base import Guest, glob

# Keep the guest's changed configuration files; never stop to ask.
_APT = [
    "apt-get",
    "-y",
    "-q",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
]


def upgrade_argv(packages: Sequence[str]) -> list[str]:
    if not packages:
        return [*_APT, "dist-upgrade"]
    return [*_APT, "install", "--only-upgrade", *packages]


class Apt:
    name = "apt"

    def refresh(self, guest: Guest) -> None:
        guest.run(["apt-get", "-q", "update"])

    def upgrade(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run(upgrade_argv(packages))

    def install(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([*_APT, "install", *packages])

    def remove(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([*_APT, "remove", *packages])

    def clean(self, guest: Guest) -> list[str]:
        guest.run(["apt-get", "clean"])
        removed = []
        for path in glob(guest, "/var/lib/apt/lists/*"):
            if not path.endswith(("/lock", "/partial")) and guest.delete(path):
                removed.append(path)
        return removed

    def installed(self, guest: Guest) -> dict[str, str]:
        return osinfo.dpkg_packages(guest) or {}

    def hold(self, guest: Guest, patterns: Sequence[str]) -> list[str]:
        already = set(guest.run(["apt-mark", "showhold"]).stdout.split())
        names = [
            n
            for n in self.installed(guest)
            if any(fnmatch.fnmatch(n, p) for p in patterns) and n not in already
        ]
        if names:
            guest.run(["apt-mark", "hold", *names])
        return names

    def unhold(self, guest: Guest, held: Sequence[str]) -> None:
        if held:
            guest.run(["apt-mark", "unhold", *held])
