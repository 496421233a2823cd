"""dnf and yum, for Fedora, RHEL, CentOS and their derivatives."""

from __future__ import annotations

from collections.abc import Sequence

from careen.guest.base import Guest

RPM_QUERY = ["rpm", "-qa", "--qf", "%{NAME}\\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\\n"]


def rpm_installed(guest: Guest) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in guest.run(RPM_QUERY).stdout.splitlines():
        name, _, version = line.partition("\t")
        if name and version:
            out[name] = version.removeprefix("0:")
    return out


class Dnf:
    """dnf, or yum where dnf is missing: their command lines are the same here."""

    def __init__(self, binary: str) -> None:
        self.name = binary
        self._excludes: list[str] = []

    def _base(self) -> list[str]:
        return [self.name, "-y"] + [f"--exclude={p}" for p in self._excludes]

    def refresh(self, guest: Guest) -> None:
        guest.run([self.name, "-y", "makecache"])

    def upgrade(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([*self._base(), "upgrade", *packages])

    def install(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([*self._base(), "install", *packages])

    def remove(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([self.name, "-y", "remove", *packages])

    def clean(self, guest: Guest) -> list[str]:
        guest.run([self.name, "clean", "all"])
        return []

    def installed(self, guest: Guest) -> dict[str, str]:
        return rpm_installed(guest)

    def hold(self, guest: Guest, patterns: Sequence[str]) -> list[str]:
        # An exclude lasts for this run only, which is what holding back means here.
        self._excludes = list(patterns)
        return list(patterns)

    def unhold(self, guest: Guest, held: Sequence[str]) -> None:
        self._excludes = []
