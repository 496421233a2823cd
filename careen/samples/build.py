"""Disk images in the layouts careen meets in the wild, made from one guest root.

Each layout writes its filesystems straight into a sparse disk file: ext4 with
`mke2fs -d` at a byte offset (no mount), XFS and swap through offset loop devices, LVM
metadata with the host's LVM tools on a loop device without ever activating anything
(there may be no device-mapper). The guest's /etc/fstab and /etc/resolv.conf are
rewritten in a private copy of the root so they match what each disk really holds.
The SELinux layout is the MBR disk made from the SELinux variant of the root, labelled
again after those rewrites so that every file in it carries its policy's label.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from careen.errors import CareenError
from careen.log import step
from careen.run import Arg, run
from careen.samples.devices import loop_device, mounted
from careen.samples.root import RESOLV_CONF, label_root

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DISK_SIZE = 2048 * MiB
PART_START = 1 * MiB
BIOS_BOOT_SIZE = 1 * MiB
# mkfs.xfs (xfsprogs 6.1) refuses filesystems under 300 MB.
BOOT_SIZE = 512 * MiB
SWAP_SIZE = 128 * MiB
VG_NAME = "centos"
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69E4C7DE47"
STUB_RESOLV = "../run/systemd/resolve/stub-resolv.conf"
# Metadata only: no activation (no device-mapper), no backups under the host's /etc/lvm,
# and no devices file or hints, so the host's LVM forgets the VG once the loop is gone.
LVM_CONFIG = (
    'global{activation=0} backup{backup=0 archive=0} devices{use_devicesfile=0 hints="none"}'
)


class Layout(StrEnum):
    """The sample disk layouts."""

    MBR = "mbr"
    GPT = "gpt"
    MBR_QCOW2 = "mbr-qcow2"
    LVM = "lvm"
    LVM_QCOW2 = "lvm-qcow2"
    BARE = "bare"
    SELINUX = "selinux"  # MBR, from the SELinux variant of the root, fully labelled

    @property
    def base(self) -> Layout | None:
        """The raw layout a qcow2 layout is converted from."""
        return {Layout.MBR_QCOW2: Layout.MBR, Layout.LVM_QCOW2: Layout.LVM}.get(self)

    @property
    def suffix(self) -> str:
        return "qcow2" if self.base else "raw"

    @property
    def symlinked_resolv_conf(self) -> bool:
        return self is Layout.GPT

    @property
    def selinux(self) -> bool:
        """Made from the SELinux variant of the root."""
        return self is Layout.SELINUX


def layout_recipe(layout: Layout) -> dict[str, object]:
    """The parameters that decide what `make_image()` makes; the cache key digests them."""
    base = layout.base or layout
    common: dict[str, object] = {"layout": str(base), "disk_size": DISK_SIZE}
    resolv: dict[str, object] = (
        {"stub_resolv": STUB_RESOLV} if base.symlinked_resolv_conf else {"resolv_conf": RESOLV_CONF}
    )
    specific: dict[Layout, dict[str, object]] = {
        Layout.MBR: {"part_start": PART_START},
        Layout.GPT: {"part_start": PART_START, "bios_boot_size": BIOS_BOOT_SIZE},
        Layout.LVM: {
            "part_start": PART_START,
            "boot_size": BOOT_SIZE,
            "swap_size": SWAP_SIZE,
            "vg": VG_NAME,
        },
        Layout.BARE: {},
        Layout.SELINUX: {"part_start": PART_START, "labelled": "setfiles"},
    }
    return {**common, **resolv, **specific[base], "format": layout.suffix}


@dataclass(frozen=True)
class Region:
    """A byte range of a disk file: a partition or a logical volume."""

    start: int
    size: int


def make_image(
    root: Path, layout: Layout, dest: Path, *, resolv_conf_symlink: bool | None = None
) -> Path:
    """Write `root` into a new disk image `dest` in `layout`; return `dest`."""
    if resolv_conf_symlink is None:
        resolv_conf_symlink = layout.symlinked_resolv_conf
    with step(f"Making a {layout} image {dest.name}"), ExitStack() as stack:
        # The ".tmp-" name lets the cache sweep it up if this process gets killed.
        tmpdir = tempfile.TemporaryDirectory(dir=dest.parent, prefix=f"{dest.name}.tmp-")
        scratch = Path(stack.enter_context(tmpdir))
        staging = scratch / "root"
        _copy_tree(root, staging)
        _set_resolv_conf(staging, resolv_conf_symlink)
        raw = scratch / "disk.raw" if layout.base else dest
        _write_raw(staging, layout.base or layout, raw, scratch)
        if layout.base:
            convert_qcow2(raw, dest)
    return dest


def _copy_tree(root: Path, staging: Path) -> None:
    """Copy `root` cheaply: hard links where possible, since a full copy costs ~10 s.

    Everything later that changes a file in `staging` must unlink it first and write a
    new one, or it would change `root` too.
    """
    same_fs = root.stat().st_dev == staging.parent.stat().st_dev
    run(["cp", "-al" if same_fs else "-a", root, staging])


def convert_qcow2(raw: Path, dest: Path) -> None:
    with step(f"Converting {raw.name} to qcow2"):
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, dest])


def _write_raw(staging: Path, layout: Layout, disk: Path, scratch: Path) -> None:
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
    match layout:
        case Layout.MBR:
            _write_mbr(staging, disk)
        case Layout.SELINUX:
            _write_mbr(staging, disk, labelled=True)
        case Layout.GPT:
            _write_gpt(staging, disk)
        case Layout.LVM:
            _write_lvm(staging, disk, scratch)
        case Layout.BARE:
            _write_bare(staging, disk)
        case _:
            raise CareenError(f"no raw writer for layout {layout}")


def _set_resolv_conf(root: Path, symlink: bool) -> None:
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    if symlink:
        resolv.symlink_to(STUB_RESOLV)
        return
    resolv.write_text(RESOLV_CONF)
    resolv.chmod(0o644)


def _write_fstab(root: Path, *lines: str) -> None:
    fstab = root / "etc/fstab"
    fstab.unlink(missing_ok=True)  # it may be a hard link into the cached root
    fstab.write_text("".join(line + "\n" for line in lines))


def partition(disk: Path, script: str) -> list[Region]:
    """Write a partition table with sfdisk and return the partitions it made."""
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], input=script)
    table = json.loads(run(["sfdisk", "--json", disk]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return [Region(p["start"] * sector, p["size"] * sector) for p in table["partitions"]]


def _write_ext4(staging: Path, disk: Path, region: Region, fs_uuid: str) -> None:
    """Fill an ext4 filesystem from `staging` inside `region` of `disk`, without a mount."""
    argv: list[Arg] = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-U", fs_uuid]
    with step(f"Writing ext4 at offset {region.start} of {disk.name}"):
        run([*argv, "-d", staging, "-E", f"offset={region.start}", disk, f"{region.size // 1024}k"])


def _write_mbr(staging: Path, disk: Path, *, labelled: bool = False) -> None:
    fs_uuid = str(uuid.uuid4())
    _write_fstab(staging, f"UUID={fs_uuid} / ext4 errors=remount-ro 0 1")
    if labelled:
        # Labels the new fstab and resolv.conf; the hard-linked rest already carries the
        # same labels from the cached root, so setfiles leaves the cache's inodes alone.
        label_root(staging)
    (part,) = partition(disk, f"label: dos\nstart={PART_START // 512}, type=83, bootable\n")
    _write_ext4(staging, disk, part, fs_uuid)


def _write_gpt(staging: Path, disk: Path) -> None:
    part_uuid = str(uuid.uuid4())
    _write_fstab(staging, f"PARTUUID={part_uuid} / ext4 errors=remount-ro 0 1")
    bios_sectors = BIOS_BOOT_SIZE // 512
    script = (
        "label: gpt\n"
        f"start={PART_START // 512}, size={bios_sectors}, type={BIOS_BOOT_TYPE}, name=bios\n"
        f"start={(PART_START + BIOS_BOOT_SIZE) // 512}, type={LINUX_TYPE}, uuid={part_uuid}, "
        "name=root\n"
    )
    _bios, part = partition(disk, script)
    _write_ext4(staging, disk, part, str(uuid.uuid4()))


def _write_bare(staging: Path, disk: Path) -> None:
    _write_fstab(staging, "LABEL=root / ext4 errors=remount-ro 0 1")
    _write_ext4(staging, disk, Region(0, DISK_SIZE), str(uuid.uuid4()))


def _write_lvm(staging: Path, disk: Path, scratch: Path) -> None:
    """A CentOS 7 style disk: /boot on partition 1, VG `centos` with root and swap on 2."""
    boot_uuid = str(uuid.uuid4())
    _write_fstab(
        staging,
        f"/dev/mapper/{VG_NAME}-root / xfs defaults 0 0",
        f"UUID={boot_uuid} /boot xfs defaults 0 0",
        f"/dev/mapper/{VG_NAME}-swap swap swap defaults 0 0",
    )
    boot = scratch / "boot"
    shutil.move(staging / "boot", boot)
    (staging / "boot").mkdir()
    script = (
        f"label: dos\nstart={PART_START // 512}, size={BOOT_SIZE // 512}, type=83, bootable\n"
        f"start={(PART_START + BOOT_SIZE) // 512}, type=8e\n"
    )
    boot_part, pv_part = partition(disk, script)
    _write_xfs(disk, boot_part, boot, scratch, label="boot", fs_uuid=boot_uuid)
    volumes = _create_volume_group(disk, pv_part)
    _write_xfs(disk, volumes["root"], staging, scratch, label="root")
    with loop_device(disk, volumes["swap"].start, volumes["swap"].size) as swap:
        run(["mkswap", "--label", "swap", swap])


def _write_xfs(
    disk: Path,
    region: Region,
    source: Path,
    scratch: Path,
    *,
    label: str,
    fs_uuid: str | None = None,
) -> None:
    with step(f"Writing xfs {label} at offset {region.start} of {disk.name}"), ExitStack() as st:
        device = st.enter_context(loop_device(disk, region.start, region.size))
        uuid_opt = ["-m", f"uuid={fs_uuid}"] if fs_uuid else []
        run(["mkfs.xfs", "-q", "-f", "-L", label, *uuid_opt, device])
        mnt = Path(st.enter_context(tempfile.TemporaryDirectory(dir=scratch)))
        st.enter_context(mounted(device, mnt, "xfs"))
        run(["cp", "-a", f"{source}/.", mnt])


def _lvm(command: str, device: Path, *args: str) -> str:
    argv = [command, "--config", LVM_CONFIG, "--devices", str(device), *args]
    return run(argv, env=_lvm_env()).stdout


def _lvm_env() -> dict[str, str]:
    # LVM complains about every inherited descriptor; none of them matter here.
    return {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def _create_volume_group(disk: Path, pv_part: Region) -> dict[str, Region]:
    """Write a PV, VG `centos`, LVs swap and root; return where each LV lies in `disk`."""
    with step(f"Creating LVM volume group {VG_NAME}"), ExitStack() as stack:
        pv = stack.enter_context(loop_device(disk, pv_part.start, pv_part.size))
        _lvm("pvcreate", pv, "--quiet", str(pv))
        _lvm("vgcreate", pv, "--quiet", VG_NAME, str(pv))
        _lvm("lvcreate", pv, "--quiet", "-an", "-Zn", "-L", f"{SWAP_SIZE}b", "-n", "swap", VG_NAME)
        _lvm("lvcreate", pv, "--quiet", "-an", "-Zn", "-l", "100%FREE", "-n", "root", VG_NAME)
        return {name: Region(pv_part.start + r.start, r.size) for name, r in lv_regions(pv).items()}


def _report(text: str, kind: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = json.loads(text)["report"][0][kind]
    return rows


def lv_regions(pv: Path) -> dict[str, Region]:
    """Where each linear LV on the single PV `pv` lies, relative to the start of the PV."""
    opts = ["--reportformat", "json", "--units", "b", "--nosuffix"]
    (pv_row,) = _report(_lvm("pvs", pv, *opts, "-o", "pv_name,pe_start"), "pv")
    segs = _lvm("lvs", pv, *opts, "--segments", "-o", "lv_name,vg_extent_size,seg_pe_ranges")
    regions: dict[str, Region] = {}
    for seg in _report(segs, "seg"):
        ranges = seg["seg_pe_ranges"].split()
        if seg["lv_name"] in regions or len(ranges) != 1:
            raise CareenError(f"logical volume {seg['lv_name']} is not one linear segment")
        first, last = (int(n) for n in ranges[0].rsplit(":", 1)[1].split("-"))
        extent = int(seg["vg_extent_size"])
        start = int(pv_row["pe_start"]) + first * extent
        regions[seg["lv_name"]] = Region(start, (last - first + 1) * extent)
    return regions
