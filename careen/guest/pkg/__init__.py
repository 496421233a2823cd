"""Package managers: the guest's own tool always does the package work.

Running the host's rpm or dpkg against a guest's database corrupts it when their
formats differ, so every package manager here builds the guest's own command lines and
runs them inside the guest. Each one is a small plug-in behind `PackageManager`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from careen.errors import CareenError
from careen.guest.base import Guest

# Packages that write boot loaders; held back when the EFI partition is not mounted.
BOOT_LOADER_PATTERNS = ("grub*", "shim*")


class PackageManager(Protocol):
    name: str

    def refresh(self, guest: Guest) -> None: ...
    def upgrade(self, guest: Guest, packages: Sequence[str]) -> None: ...
    def install(self, guest: Guest, packages: Sequence[str]) -> None: ...
    def remove(self, guest: Guest, packages: Sequence[str]) -> None: ...
    def clean(self, guest: Guest) -> list[str]: ...
    def installed(self, guest: Guest) -> dict[str, str]: ...
    def hold(self, guest: Guest, patterns: Sequence[str]) -> list[str]: ...
    def unhold(self, guest: Guest, held: Sequence[str]) -> None: ...


def get(name: str | None) -> PackageManager:
    from careen.guest.pkg import apk, apt, dnf, zypper

    managers: dict[str, PackageManager] = {
        "apt": apt.Apt(),
        "dnf": dnf.Dnf("dnf"),
        "yum": dnf.Dnf("yum"),
        "zypper": zypper.Zypper(),
        "apk": apk.Apk(),
    }
    if name is None or name not in managers:
        raise CareenError(
            "no package manager found in the guest" + (f" (it looks like {name})" if name else ""),
            hint="package operations need apt, dnf, yum, zypper or apk inside the guest; "
            "drop the update/install/remove steps or check the image",
        )
    return managers[name]
