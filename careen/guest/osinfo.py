"""Facts about the OS inside a guest, read from its files without running its programs."""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence

from careen.guest.base import Guest, exists, glob, read_text
from careen.image.filesystems import parse_os_release
from careen.image.model import FstabEntry, OSInfo

# Package managers by os-release ID or ID_LIKE, most specific first.
_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("apt", ("debian", "ubuntu")),
    ("zypper", ("suse", "opensuse", "sles", "opensuse-leap", "opensuse-tumbleweed")),
    ("apk", ("alpine",)),
    ("dnf", ("fedora", "rhel", "centos", "rocky", "almalinux", "ol", "amzn")),
)
_BINARIES = {
    "apt": "/usr/bin/apt-get",
    "dnf": "/usr/bin/dnf",
    "yum": "/usr/bin/yum",
    "zypper": "/usr/bin/zypper",
    "apk": "/sbin/apk",
}


def detect(guest: Guest, fstab: Sequence[FstabEntry] = ()) -> OSInfo:
    release = parse_os_release(
        read_text(guest, "/etc/os-release") or read_text(guest, "/usr/lib/os-release") or ""
    )
    distro = release.get("ID", "unknown")
    id_like = tuple(release.get("ID_LIKE", "").split())
    return OSInfo(
        family="linux",
        distro=distro,
        version=release.get("VERSION_ID", ""),
        pretty_name=release.get("PRETTY_NAME", distro),
        id_like=id_like,
        package_manager=package_manager(guest, distro, id_like),
        cloud_init=cloud_init_version(guest),
        resolv_conf=describe_resolv_conf(guest),
        selinux=selinux_mode(guest),
        fstab=tuple(fstab),
    )


def package_manager(guest: Guest, distro: str, id_like: Sequence[str]) -> str | None:
    """The guest's own package manager: by distribution, confirmed by its binary."""
    for name, ids in _FAMILIES:
        if distro in ids or any(i in ids for i in id_like):
            if name == "dnf" and not exists(guest, _BINARIES["dnf"]):
                name = "yum"  # CentOS 7 and older
            return name if exists(guest, _BINARIES[name]) else None
    for name, path in _BINARIES.items():
        if exists(guest, path):
            return name
    return None


def dpkg_packages(guest: Guest) -> dict[str, str] | None:
    """Installed packages and versions from dpkg's database, or None without one."""
    text = read_text(guest, "/var/lib/dpkg/status")
    if text is None:
        return None
    out: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return out


def apk_packages(guest: Guest) -> dict[str, str] | None:
    text = read_text(guest, "/lib/apk/db/installed")
    if text is None:
        return None
    out: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z]):(.*)$", stanza, re.M))
        if "P" in fields:
            out[fields["P"]] = fields.get("V", "")
    return out


def cloud_init_version(guest: Guest) -> str | None:
    dpkg = dpkg_packages(guest)
    if dpkg is not None and "cloud-init" in dpkg:
        return dpkg["cloud-init"]
    # Every packaging of cloud-init ships its version in cloudinit/version.py.
    for path in glob(guest, "/usr/lib/python3*"):
        for site in ("site-packages", "dist-packages"):
            text = read_text(guest, f"{path}/{site}/cloudinit/version.py")
            match = re.search(r"__VERSION__\s*=\s*[\"']([^\"']+)", text or "")
            if match:
                return match.group(1)
    return None


def describe_resolv_conf(guest: Guest) -> str:
    st = guest.lstat("/etc/resolv.conf")
    if st is None:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        target = guest.readlink("/etc/resolv.conf")
        # Resolved inside the guest: /run is empty offline, so links into it dangle.
        try:
            guest.read_bytes("/etc/resolv.conf")
            return f"symlink -> {target}"
        except OSError:
            return f"symlink -> {target} (dangling)"
    return "file" if stat.S_ISREG(st.st_mode) else "special file"


def selinux_mode(guest: Guest) -> str:
    text = read_text(guest, "/etc/selinux/config")
    if text is None:
        return "none"
    match = re.search(r"^\s*SELINUX\s*=\s*(\w+)", text, re.M)
    return match.group(1).lower() if match else "none"
