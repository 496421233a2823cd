"""Bootable sample images, for `careen verify`: the used Debian root with a kernel and GRUB.

The spine's used root (cloud-init has run in it once, as instance
`iid-careen-sample-1`) is copied, given `linux-image-cloud-amd64` and GRUB's BIOS
modules from the Debian mirror, and cached as a directory. An image is made from that
directory the way a BIOS machine boots it: an MBR partition table with one ext4
partition (written with `mke2fs -d`, no mount), GRUB's `boot.img` in the MBR and its
core image in the gap before the partition (where `grub-install` would embed it; there
is no device-mapper or partition device here, so nothing is installed "on a device"),
a grub.cfg that boots the kernel with the console on the first serial port, and an
fstab naming the filesystem's UUID.

Two kinds, a minimal pair:

- GOOD: the previous instance's state is left in place, as in the spine's samples;
  cloud-init sees a new instance ID in the metadata and runs as a new instance.
- BROKEN: the same, plus `manual_cache_clean: true` in cloud-init's configuration, so
  cloud-init trusts its cache of the previous instance, never notices the new one, and
  sets no password and no key. `careen refit` with the default recipe clears that
  cache, and the next boot runs as a new instance again.

Both carry the previous instance's network configuration (DHCP on eth0; the kernel is
told `net.ifnames=0`), so the broken kind still answers SSH, and refuses the new key.

Cached beside the other samples (`bootable-root-<key>/`, `bootable-<kind>-<key>.raw`);
`python -m careen.samples.bootable [good|broken]` builds them and prints their paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from enum import StrEnum
from pathlib import Path

from careen.errors import CareenError, ExitCode
from careen.log import step
from careen.run import run
from careen.samples import PATH_FORMATS, cache, format_paths
from careen.samples import root as guest_root
from careen.samples.build import DISK_SIZE, PART_START, _write_ext4, partition
from careen.samples.devices import in_guest

log = logging.getLogger(__name__)

# Raise whenever the builder changes what it makes in a way the recipes do not show.
BUILD_VERSION = 1

# e2fsprogs: cloud-init grows the root filesystem with resize2fs at every boot, and
# fails its network stage without it (the bootstrap's apt variant has none).
BOOT_PACKAGES = ("linux-image-cloud-amd64", "grub-pc-bin", "e2fsprogs")
GRUB_PLATFORM = "i386-pc"
# Just what the core image needs to find /boot/grub; the rest loads from there.
GRUB_CORE_MODULES = ("biosdisk", "part_msdos", "ext2")
GRUB_PREFIX = "(hd0,msdos1)/boot/grub"
KERNEL_OPTIONS = "ro console=ttyS0,115200 net.ifnames=0"
# What cloud-init generated for the previous instance's network (ifupdown).
NETWORK_FILE = "etc/network/interfaces.d/50-cloud-init"
NETWORK_CONFIG = "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n"
MANUAL_CACHE_CLEAN_FILE = "etc/cloud/cloud.cfg.d/95_manual_cache_clean.cfg"
MANUAL_CACHE_CLEAN = (
    "# Trust the cached instance; do not look for a new one.\nmanual_cache_clean: true\n"
)
_MBR_CODE = 440  # boot.img's code; the disk signature and partition table follow


class BootableKind(StrEnum):
    GOOD = "good"
    BROKEN = "broken"  # manual_cache_clean with the previous instance's state


def root_recipe() -> dict[str, object]:
    """What `_build_root()` adds to the used root; the cache key digests it."""
    return {
        "suite": guest_root.SUITE,
        "mirror": guest_root.MIRROR,
        "packages": BOOT_PACKAGES,
        "grub_core_modules": GRUB_CORE_MODULES,
        "grub_prefix": GRUB_PREFIX,
        "network": {NETWORK_FILE: NETWORK_CONFIG},
    }


def image_recipe(kind: BootableKind) -> dict[str, object]:
    """What decides an image of `kind`; the cache key digests it."""
    extra = {MANUAL_CACHE_CLEAN_FILE: MANUAL_CACHE_CLEAN} if kind is BootableKind.BROKEN else {}
    return {
        "kind": str(kind),
        "disk_size": DISK_SIZE,
        "part_start": PART_START,
        "kernel_options": KERNEL_OPTIONS,
        "files": extra,
        "removed": [guest_root.SEED_CFG],
    }


def _digest(recipe: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def root_key() -> str:
    return _digest({"build_version": BUILD_VERSION, "base": cache.root_key(), **root_recipe()})


def image_key(kind: BootableKind) -> str:
    return _digest({"build_version": BUILD_VERSION, "root": root_key(), **image_recipe(kind)})


def bootable_root_path(cache_base: Path | None = None) -> Path:
    return cache.cache_dir(cache_base) / f"bootable-root-{root_key()}"


def bootable_path(kind: BootableKind, cache_base: Path | None = None) -> Path:
    return cache.cache_dir(cache_base) / f"bootable-{kind}-{image_key(kind)}.raw"


def bootable_sample(kind: BootableKind, cache_base: Path | None = None) -> Path:
    """The cached raw bootable sample of `kind`, built if missing. Copy it to change it."""
    path = bootable_path(kind, cache_base)
    if path.is_file():
        return path
    base = cache.sample_root(cache_base)  # takes the build lock itself when it builds
    with cache._build_lock(cache.cache_dir(cache_base)):
        if not path.is_file():
            root = bootable_root_path(cache_base)
            cache._ensure_dir(root, lambda tmp, _work: _build_root(base, tmp))
            _build_image(root, kind, path)
    return path


def _build_root(base: Path, root: Path) -> None:
    with step(f"Copying the sample root into {root}"):
        run(["cp", "-a", f"{base}/.", root])  # a real copy: packages change files in place
    with step(f"Installing {', '.join(BOOT_PACKAGES)} from {guest_root.MIRROR}"):
        guest_root._install_from_mirror(root, BOOT_PACKAGES)
    with step("Making GRUB's core image"):
        _make_grub_images(root)
    network = root / NETWORK_FILE
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text(NETWORK_CONFIG)
    kernel_version(root)  # fails here, not at the first boot, when the kernel is missing


def _make_grub_images(root: Path) -> None:
    """Lay out /boot/grub as grub-install would, with the core image made in the guest."""
    modules = root / "usr/lib/grub" / GRUB_PLATFORM
    target = root / "boot/grub" / GRUB_PLATFORM
    target.mkdir(parents=True)
    for item in modules.iterdir():
        if item.suffix in (".mod", ".lst", ".img"):
            shutil.copy2(item, target)
    core = f"/boot/grub/{GRUB_PLATFORM}/core.img"
    argv = ["grub-mkimage", "-O", GRUB_PLATFORM, "-o", core, "-p", GRUB_PREFIX]
    in_guest(root, [*argv, *GRUB_CORE_MODULES])
    size = (root / core.lstrip("/")).stat().st_size
    if size > PART_START - 512:
        raise CareenError(
            f"GRUB's core image is {size} bytes; it does not fit before the partition"
        )


def kernel_version(root: Path) -> str:
    """The version of the one kernel installed in `root`."""
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    initrds = {p.name.removeprefix("initrd.img-") for p in (root / "boot").glob("initrd.img-*")}
    if len(kernels) != 1 or kernels[0] not in initrds:
        raise CareenError(
            f"the bootable sample root {root} should hold one kernel with its initramfs; "
            f"found kernels {kernels}, initramfs images {sorted(initrds)}",
            hint="run with --debug and read the apt output above",
        )
    return kernels[0]


def grub_cfg(version: str, fs_uuid: str) -> str:
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set default=0\n"
        "set timeout=0\n"
        "menuentry 'Debian GNU/Linux (careen bootable sample)' {\n"
        f"    search --no-floppy --fs-uuid --set=root {fs_uuid}\n"
        f"    linux /boot/vmlinuz-{version} root=UUID={fs_uuid} {KERNEL_OPTIONS}\n"
        f"    initrd /boot/initrd.img-{version}\n"
        "}\n"
    )


def _replace(root: Path, path: str, text: str) -> None:
    target = root / path
    target.unlink(missing_ok=True)  # it may be a hard link into the cached root
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(0o644)


def _build_image(root: Path, kind: BootableKind, path: Path) -> None:
    tmp = path.with_name(path.name + cache._TMP + str(os.getpid()))
    try:
        staging_dir = tempfile.TemporaryDirectory(dir=path.parent, prefix="staging" + cache._TMP)
        with step(f"Making the bootable sample {path.name}"), staging_dir as d:
            staging = Path(d) / "root"
            # Hard links: everything changed below is unlinked and written anew.
            run(["cp", "-al", root, staging])
            _write_disk(staging, kind, tmp)
    except BaseException:
        cache._discard(tmp)
        raise
    tmp.rename(path)


def _write_disk(staging: Path, kind: BootableKind, disk: Path) -> None:
    fs_uuid = str(uuid.uuid4())
    recipe = image_recipe(kind)
    _replace(staging, "etc/fstab", f"UUID={fs_uuid} / ext4 errors=remount-ro 0 1\n")
    _replace(staging, "boot/grub/grub.cfg", grub_cfg(kernel_version(staging), fs_uuid))
    files = recipe["files"]
    assert isinstance(files, dict)
    for name, text in files.items():
        _replace(staging, name, text)
    # The spine's seed-only datasource list, should it be there: the booted guest must
    # look at the NoCloud or ConfigDrive disk it is given.
    (staging / guest_root.SEED_CFG).unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
    (part,) = partition(disk, f"label: dos\nstart={PART_START // 512}, type=83, bootable\n")
    _write_ext4(staging, disk, part, fs_uuid)
    grub = staging / "boot/grub" / GRUB_PLATFORM
    boot_img = (grub / "boot.img").read_bytes()
    core_img = (grub / "core.img").read_bytes()
    with disk.open("r+b") as f:
        f.write(boot_img[:_MBR_CODE])
        f.seek(512)  # the core image's first sector is where boot.img looks by default
        f.write(core_img)
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    """`python -m careen.samples.bootable [good|broken ...] [--format path|json]`."""
    parser = argparse.ArgumentParser(
        prog="python -m careen.samples.bootable",
        description="Build the bootable samples and print their paths, one a line.",
    )
    parser.add_argument(
        "kinds",
        nargs="*",
        metavar="KIND",
        help=f"one of {', '.join(BootableKind)} (default: both)",
    )
    parser.add_argument(
        "--format",
        choices=PATH_FORMATS,
        default="path",
        help="print one path a line (default), or a JSON object of kind to path",
    )
    args = parser.parse_args(argv)
    try:
        kinds = [BootableKind(name) for name in args.kinds] or list(BootableKind)
    except ValueError as e:
        parser.error(f"{e}; kinds: {', '.join(BootableKind)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = {str(kind): bootable_sample(kind) for kind in kinds}
    except CareenError as e:
        print(f"error: {e}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    print(format_paths(paths, args.format))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
