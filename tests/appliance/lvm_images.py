"""A disk whose root is a striped LV and whose /srv is a thin LV, built inside libguestfs.

Neither kind of LV is one contiguous byte range: without device-mapper the host backend
cannot assemble them, so this image shows what only the appliance reaches. One image
holds both kinds to keep appliance launches down: a GPT disk with two LVM partitions,
both PVs of the volume group `kinds`, a striped LV `root` across the two (ext4, /) and a
thin pool with a thin LV `srv` (ext4, /srv). The guest is the cached sample root, put in
with `tar_in`, with its fstab naming the LVs the way the LVM sample does.

The host's LVM never sees these volumes: the volume group is made, filled and closed
inside a libguestfs appliance (direct backend, TCG). libguestfs's `lvcreate` has no
striped or thin options, so the LVM commands run through the appliance's debug shell.

The image is cached beside the samples, under a key that digests the recipe below and
the sample root's key. It is built under a temporary name and renamed into place while
holding the samples' build lock, so a file that carries the name is whole, and a build
that died is swept up by the next sample build (the `.tmp-` in its name).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from integration.util import sh

from careen.samples.cache import cache_dir, root_key, sample_root
from careen.samples.root import RESOLV_CONF

MiB = 1 << 20
VG = "kinds"
ROOT_LV = f"/dev/{VG}/root"
SRV_LV = f"/dev/{VG}/srv"
DISK_SIZE = 2048 * MiB
# Two PVs of about 1 GiB each: the striped root takes 600 MiB from each.
PV_SPLIT_SECTOR = 1024 * MiB // 512
LVM_PARTITION_TYPE = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
ROOT_SIZE = "1200M"
STRIPE_SIZE = "64k"
POOL_SIZE = "400M"
SRV_SIZE = "384M"
FSTAB = (
    f"/dev/mapper/{VG}-root / ext4 errors=remount-ro 0 1\n"  # as the LVM sample names it
    f"{SRV_LV} /srv ext4 defaults 0 2\n"
)
LVM_COMMANDS = (
    "pvcreate -q /dev/sda1 /dev/sda2",
    f"vgcreate -q {VG} /dev/sda1 /dev/sda2",
    f"lvcreate -q -y --type striped -i 2 -I {STRIPE_SIZE} -L {ROOT_SIZE} -n root {VG}",
    f"lvcreate -q -y --type thin-pool -L {POOL_SIZE} -n pool {VG}",
    f"lvcreate -q -y --type thin -V {SRV_SIZE} --thinpool {VG}/pool -n srv",
)
# Raise when the builder changes what it makes in a way the recipe does not show.
BUILDER_VERSION = 1


def recipe() -> dict[str, object]:
    """Everything that decides what the builder makes; the cache key digests it."""
    return {
        "builder": BUILDER_VERSION,
        "disk_size": DISK_SIZE,
        "pv_split_sector": PV_SPLIT_SECTOR,
        "lvm": LVM_COMMANDS,
        "filesystems": {"root": "ext4", "srv": "ext4"},
        "fstab": FSTAB,
        "resolv_conf": RESOLV_CONF,
    }


def image_path() -> Path:
    text = json.dumps({"root": root_key(), **recipe()}, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / f"lvm-striped-thin-{key}.raw"


def striped_thin_image() -> Path:
    """The cached image (raw), built if missing. Copy it before changing it."""
    path = image_path()
    if path.is_file():
        return path
    root = sample_root()  # takes the build lock itself: before ours, never inside it
    with _build_lock(path.parent):
        if not path.is_file():
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            try:
                _build(root, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.rename(path)
    return path


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    # The samples' lock (see careen.samples.cache): while it is held nobody sweeps
    # half-built entries, ours included.
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def appliance(image: Path, fmt: str, *, readonly: bool) -> Iterator[Any]:
    """A launched libguestfs handle (direct backend, TCG) with `image` as its one disk."""
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    try:
        g.set_backend("direct")
        g.set_backend_settings(["force_tcg"])
        g.add_drive_opts(str(image), format=fmt, readonly=readonly)
        g.launch()
        yield g
        with suppress(RuntimeError):
            g.umount_all()
        g.shutdown()  # waits for qemu to flush and exit
    finally:
        g.close()


def shell(g: Any, script: str) -> str:
    """Run `script` in the appliance (not in the guest); fail on a non-zero status."""
    out: str = g.debug("sh", [f"{script}; echo careen-status=$?"])
    body, _, status = out.rstrip().rpartition("careen-status=")
    if status != "0":
        raise AssertionError(f"{script!r} failed in the appliance ({status}):\n{body}")
    return body


def lv_types(g: Any) -> dict[str, tuple[str, int]]:
    """Each visible LV of the volume group: its segment type and number of stripes."""
    out = shell(
        g, f"lvm lvs --noheadings --separator : -o lv_name,segtype,stripes {VG} 2>/dev/null"
    )
    types: dict[str, tuple[str, int]] = {}
    for line in out.splitlines():
        if line.count(":") == 2:
            name, segtype, stripes = (field.strip() for field in line.split(":"))
            types[name] = (segtype, int(stripes))
    return types


def _build(root: Path, dest: Path) -> None:
    with dest.open("wb") as f:
        f.truncate(DISK_SIZE)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f"{dest.name}.tmp-") as tmp:
        tar = Path(tmp) / "root.tar"
        # Numeric owners: the appliance's own user names must not remap the guest's.
        sh("tar", "--numeric-owner", "--xattrs", "-C", root, "-cf", tar, ".")
        with appliance(dest, "raw", readonly=False) as g:
            g.part_init("/dev/sda", "gpt")
            g.part_add("/dev/sda", "p", 2048, PV_SPLIT_SECTOR - 1)
            g.part_add("/dev/sda", "p", PV_SPLIT_SECTOR, -2048)
            for number in (1, 2):
                g.part_set_gpt_type("/dev/sda", number, LVM_PARTITION_TYPE)
            shell(g, " && ".join(f"lvm {command}" for command in LVM_COMMANDS))
            kinds = lv_types(g)
            if kinds.get("root") != ("striped", 2) or kinds.get("srv", ("",))[0] != "thin":
                raise AssertionError(f"the volume group came out as {kinds}")
            g.mkfs("ext4", ROOT_LV, label="root")
            g.mkfs("ext4", SRV_LV, label="srv")
            g.mount(ROOT_LV, "/")
            g.mkdir_p("/srv")
            g.mount(SRV_LV, "/srv")
            g.tar_in(str(tar), "/", xattrs=True)
            for path, text in (("/etc/fstab", FSTAB), ("/etc/resolv.conf", RESOLV_CONF)):
                g.rm_f(path)
                g.write(path, text.encode())
            g.sync()
