"""apt and dpkg, for Debian, Ubuntu and their derivatives."""

from __future__ import annotations

import fnmatch
import logging
import stat
from collections.abc import Sequence

from careen.guest import osinfo
from careen.guest.base import Guest, glob

log = logging.getLogger(__name__)

ARCHIVES = "/var/cache/apt/archives"

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
        removed = []
        if _archives_linked(guest):
            # `apt-get clean` unlinks every file in the archive directory, wherever a
            # guest link sends it (`archives -> /etc` would empty the guest's /etc).
            log.warning(
                "the guest's %s is a symlink; removing only *.deb there "
                "instead of running apt-get clean",
                ARCHIVES,
            )
            for pattern in (f"{ARCHIVES}/*.deb", f"{ARCHIVES}/partial/*.deb"):
                removed += [p for p in glob(guest, pattern) if guest.delete(p)]
        else:
            guest.run(["apt-get", "clean"])
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


def _archives_linked(guest: Guest) -> bool:
    for path in (ARCHIVES, f"{ARCHIVES}/partial"):
        st = guest.lstat(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            return True
    return False
