"""apk, for Alpine."""

from __future__ import annotations

from collections.abc import Sequence

from careen.guest import osinfo
from careen.guest.base import Guest, glob


class Apk:
    name = "apk"

    def refresh(self, guest: Guest) -> None:
        guest.run(["apk", "update"])

    def upgrade(self, guest: Guest, packages: Sequence[str]) -> None:
        if packages:
            guest.run(["apk", "add", "--upgrade", *packages])
        else:
            guest.run(["apk", "upgrade"])

    def install(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run(["apk", "add", *packages])

    def remove(self, guest: Guest, packages: Sequence[str]) -> None:
        guest.run(["apk", "del", *packages])

    def clean(self, guest: Guest) -> list[str]:
        return [p for p in glob(guest, "/var/cache/apk/*") if guest.delete(p)]

    def installed(self, guest: Guest) -> dict[str, str]:
        return osinfo.apk_packages(guest) or {}

    def hold(self, guest: Guest, patterns: Sequence[str]) -> list[str]:
        # Alpine's boot loaders (grub, syslinux) are held by pinning them in the world.
        return []

    def unhold(self, guest: Guest, held: Sequence[str]) -> None:
        return None
