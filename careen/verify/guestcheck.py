"""What careen reads from the image before it boots it, and the reasons it will not boot it.

Nothing here starts the image. The disk is scanned the way `careen inspect` scans it:
an image holding NTFS and no Linux filesystem is Windows, which boot verification does
not support yet. Otherwise the guest is mounted read-only over a throwaway overlay (the
host backend, or the appliance when not root) and its files say whether there is a
kernel to boot at all (`/boot/vmlinuz*`, `/vmlinuz`, a unified kernel image), whether
cloud-init is installed, and who the default user is whose password cloud-init sets
(`system_info.default_user` in /etc/cloud/cloud.cfg and cloud.cfg.d, the last one
that names it winning, as in cloud-init).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from careen.attach import export, host
from careen.cleanup import Resources
from careen.errors import CareenError
from careen.guest.base import Guest, glob, read_text
from careen.image.model import Disk, ImageFormat, ImageInfo
from careen.log import step
from careen.refit import (
    ApplianceOptions,
    Backend,
    attach_guest,
    scan_source,
    select_backend,
    workdir,
)

log = logging.getLogger(__name__)

KERNEL_PATTERNS = (
    "/boot/vmlinuz*",
    "/vmlinuz",
    "/boot/vmlinux*",
    "/boot/efi/EFI/Linux/*.efi",  # unified kernel images
    "/efi/EFI/Linux/*.efi",
)
BOOT_LOADER_CONFIGS = (
    "/boot/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/boot/loader/entries/*.conf",
    "/boot/extlinux/extlinux.conf",
    "/extlinux.conf",
    "/boot/efi/EFI/*",
)
_LINK_DEPTH = 8


class NotBootable(CareenError):
    """The image cannot be boot-verified; said before anything is started."""


@dataclass(frozen=True)
class GuestFacts:
    pretty_name: str
    cloud_init: str
    default_user: str
    kernels: tuple[str, ...]
    boot_loader: tuple[str, ...]


def inspect_guest(
    info: ImageInfo,
    *,
    user: str | None,
    backend: Backend,
    options: ApplianceOptions,
    parent: Path | None,
) -> GuestFacts:
    """Read what the boot needs from the image, or refuse it before any boot."""
    # Scanning a qcow2 needs a FUSE export, which the host backend's user (root) has. The
    # one scan also decides the backend, so the source is exported only once for both.
    scanned = None
    if info.format is ImageFormat.RAW or os.geteuid() == 0:
        scanned = scan_source(info, parent)
        if holds_only_ntfs(scanned):
            raise _windows(info)
    chosen = select_backend(backend, info, "verify", parent, scanned=scanned)
    with Resources() as res:
        work = res.enter_context(workdir(parent))
        ovl = res.enter_context(export.overlay(info, work / "overlay.qcow2"))
        att = res.enter_context(
            attach_guest(
                chosen, info, ovl, ImageFormat.QCOW2, work, writable=False, options=options
            )
        )
        facts = att.disk.os
        if facts is not None and facts.family == "windows":
            raise _windows(info)
        with step("Looking for a kernel, cloud-init and its default user"):
            kernels = find_kernels(att.guest)
            loaders = tuple(p for pattern in BOOT_LOADER_CONFIGS for p in glob(att.guest, pattern))
            name = user or default_user(att.guest)
    if not kernels:
        raise NotBootable(
            f"no bootable kernel in {info.path}: none of {', '.join(KERNEL_PATTERNS)}",
            hint="this image has no kernel of its own (a container-style root?); "
            "nothing was booted",
        )
    if not loaders:
        log.warning("no boot loader configuration found in the image; the boot may fail")
    if facts is None or facts.cloud_init is None:
        raise NotBootable(
            f"cloud-init is not installed in {info.path}; nothing in it would set the "
            "password or the key",
            hint="install cloud-init (careen refit --install cloud-init); nothing was booted",
        )
    if not name:
        raise NotBootable(
            "cloud-init in the image names no default user (system_info.default_user)",
            hint="name the user cloud-init should set the password for with --user",
        )
    return GuestFacts(facts.pretty_name, facts.cloud_init, name, kernels, loaders)


def _windows(info: ImageInfo) -> NotBootable:
    return NotBootable(
        f"boot verification is not supported for Windows images yet ({info.path})",
        hint="refit it without --verify; nothing was booted",
    )


def holds_only_ntfs(disk: Disk) -> bool:
    """Whether the disk holds NTFS and no Linux filesystem (so, Windows)."""
    types = {fs.type for fs in disk.filesystems}
    return "ntfs" in types and not types & set(host.LINUX_FILESYSTEMS)


def find_kernels(guest: Guest) -> tuple[str, ...]:
    """Guest paths of kernel files that exist (symlinks followed inside the guest)."""
    found = []
    for pattern in KERNEL_PATTERNS:
        for path in glob(guest, pattern):
            if _regular_file(guest, path):
                found.append(path)
    return tuple(found)


def _regular_file(guest: Guest, path: str) -> bool:
    for _ in range(_LINK_DEPTH):
        st = guest.lstat(path)
        if st is None:
            return False
        if not stat.S_ISLNK(st.st_mode):
            return stat.S_ISREG(st.st_mode) and st.st_size > 0
        target = guest.readlink(path)
        path = str(PurePosixPath(path).parent / target) if not target.startswith("/") else target
    return False


def default_user(guest: Guest) -> str | None:
    """The default user's name in the guest's cloud-init configuration, if any."""
    texts = [read_text(guest, "/etc/cloud/cloud.cfg") or ""]
    texts += [read_text(guest, p) or "" for p in glob(guest, "/etc/cloud/cloud.cfg.d/*.cfg")]
    return default_user_from(texts)


def default_user_from(texts: Sequence[str]) -> str | None:
    """The default user named by cloud-init configuration files, read in this order."""
    name: str | None = None
    for text in texts:
        try:
            cfg: Any = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if not isinstance(cfg, dict):
            continue
        system = cfg.get("system_info")
        if isinstance(system, dict) and isinstance(system.get("default_user"), dict):
            name = system["default_user"].get("name") or name
        # The older top-level `user:` overrides the default user (a name or a mapping).
        user = cfg.get("user")
        if isinstance(user, str):
            name = user
        elif isinstance(user, dict) and user.get("name"):
            name = str(user["name"])
    return str(name) if name else None
