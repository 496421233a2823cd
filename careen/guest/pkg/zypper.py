"""zypper, for SUSE and openSUSE."""

from __future__ import annotations

from collections.abc import Sequence

from careen.guest.base import Guest
from careen.guest.pkg.dnf import rpm_installed

_ZYPPER = ["zypper", "--non-interactive"]


class Zypper:
    name = "zypper"

    def refresh(self, guest: Guest) -> None:
        guest.run([*_ZYPPER, "refresh"])

    def upgrade(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([*_ZYPPER, "update", *packages])

    def install(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([*_ZYPPER, "install", *packages])

    def remove(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run([*_ZYPPER, "remove", *packages])

    def clean(self, guest: Guest) -> list[str]:
        guest.run([*_ZYPPER, "clean", "--all"])
        return []

    def installed(self, guest: Guest) -> dict[str, str]:
        return rpm_installed(guest)

    def hold(self, guest: Guest, patterns: Sequence[str]) -> list[str]:
        guest.run([*_ZYPPER, "addlock", *patterns])
        return list(patterns)

    def unhold(self, guest: Guest, held: Sequence[str]) -> None:
        if held:
            guest.run([*_ZYPPER, "removelock", *held])
