"""Finding filesystems in a disk's raw view, and parsing fstab and os-release."""

from __future__ import annotations

from pathlib import Path

import pytest

from careen.image.filesystems import (
    _parse_export,
    parse_fstab,
    parse_os_release,
    probe_filesystem,
    scan_disk,
)
from careen.image.model import FstabEntry, ImageFormat, ImageInfo, Region

from .helpers import (
    LvmDisk,
    MiB,
    copy_into,
    needs_root,
    partition,
    require,
    sh,
    sparse_file,
)

EXT4_UUID = "2495d442-8e07-4a9f-945d-f8f76c8277ef"
XFS_UUID = "1a4d4dc6-977f-425f-b759-90db4e28bc9b"
SWAP_UUID = "94f6928a-5e9f-430f-bb03-4ffd556ce6fb"


def raw_info(path: Path) -> ImageInfo:
    return ImageInfo(path, ImageFormat.RAW, path.stat().st_size, 0)


def ext4_at(disk: Path, region: Region, uuid: str, label: str) -> None:
    size_k = f"{region.size // 1024}k"
    sh(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-U",
        uuid,
        "-L",
        label,
        "-E",
        f"offset={region.offset}",
        disk,
        size_k,
    )


def xfs_image(path: Path) -> Path:
    # mkfs.xfs refuses filesystems under 300 MiB unless told they are unsupported; a
    # small one is all a probe needs.
    sparse_file(path, 32 * MiB)
    sh("mkfs.xfs", "-q", "--unsupported", "-m", f"uuid={XFS_UUID}", "-L", "xroot", path)
    return path


def swap_image(path: Path) -> Path:
    sparse_file(path, 8 * MiB)
    sh("mkswap", "-U", SWAP_UUID, "-L", "sw", path)
    return path


# --- real images -----------------------------------------------------------------------


@pytest.fixture
def partitioned(tmp_path: Path) -> Path:
    require("sfdisk", "mke2fs", "mkfs.xfs", "mkswap", "blkid")
    disk = sparse_file(tmp_path / "disk.raw", 100 * MiB)
    partition(disk, "label: dos\n,20M,83\n,40M,83\n,10M,82\n,,83\n")
    ext4_at(disk, Region(MiB, 20 * MiB), EXT4_UUID, "root")
    copy_into(xfs_image(tmp_path / "xfs.img"), disk, 21 * MiB)
    copy_into(swap_image(tmp_path / "swap.img"), disk, 61 * MiB)
    return disk


def test_probe_filesystem(partitioned: Path) -> None:
    ext4 = probe_filesystem(partitioned, Region(MiB, 20 * MiB))
    assert (ext4["TYPE"], ext4["UUID"], ext4["LABEL"]) == ("ext4", EXT4_UUID, "root")
    xfs = probe_filesystem(partitioned, Region(21 * MiB, 40 * MiB))
    assert (xfs["TYPE"], xfs["UUID"], xfs["LABEL"]) == ("xfs", XFS_UUID, "xroot")
    assert probe_filesystem(partitioned, Region(61 * MiB, 10 * MiB))["TYPE"] == "swap"
    assert probe_filesystem(partitioned, Region(71 * MiB, 29 * MiB)) == {}


def test_scan_partitioned_disk(partitioned: Path) -> None:
    table, groups, found = scan_disk(partitioned, raw_info(partitioned))
    assert table is not None and groups == ()
    summary = [(fs.source, fs.type, fs.uuid, fs.label) for fs in found]
    assert summary == [
        ("partition 1", "ext4", EXT4_UUID, "root"),
        ("partition 2", "xfs", XFS_UUID, "xroot"),
        ("partition 3", "swap", SWAP_UUID, "sw"),
    ]  # partition 4 holds nothing and is left out
    assert found[0].partition is table.partitions[0]
    assert found[0].region == Region(MiB, 20 * MiB)
    assert f"PARTUUID={table.partitions[0].uuid}" in found[0].names


def test_scan_whole_disk(tmp_path: Path) -> None:
    require("sfdisk", "mke2fs", "blkid")
    disk = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    ext4_at(disk, Region(0, 64 * MiB), EXT4_UUID, "cloudimg-rootfs")
    table, _, (fs,) = scan_disk(disk, raw_info(disk))
    assert table is None
    assert (fs.source, fs.type, fs.region) == ("whole disk", "ext4", Region(0, 64 * MiB))
    assert "LABEL=cloudimg-rootfs" in fs.names and "/dev/vda" in fs.names


@pytest.mark.root
@needs_root
def test_scan_lvm_disk(lvm_disk: LvmDisk) -> None:
    require("mke2fs", "blkid")

    def extents(lv: str, index: int = 0) -> Region:
        name, first, last = lvm_disk.ranges[lv][index]
        start = lvm_disk.regions[name].offset + lvm_disk.pe_start[name]
        return Region(start + first * MiB, (last - first + 1) * MiB)

    ext4_at(lvm_disk.path, extents("root"), EXT4_UUID, "lvroot")
    # A filesystem made on the first segment only: enough for the probe to find it.
    ext4_at(lvm_disk.path, extents("two"), XFS_UUID, "lvtwo")
    _, (vg,), found = scan_disk(lvm_disk.path, raw_info(lvm_disk.path))
    by_source = {fs.source: fs for fs in found}
    assert by_source["partition 2"].type == "LVM2_member"
    root = by_source["LV careentest/root"]
    assert (root.type, root.uuid, root.region) == ("ext4", EXT4_UUID, extents("root"))
    assert root.lv is not None and "/dev/mapper/careentest-root" in root.names
    two = by_source["LV careentest/two"]
    assert (two.type, two.uuid, two.region) == ("ext4", XFS_UUID, None)
    assert by_source["LV careentest/str"].region is None
    assert {lv.name for lv in vg.lvs} == {"root", "two", "pad", "str"}


# --- pure parsing ----------------------------------------------------------------------


def test_parse_blkid_export() -> None:
    text = "DEVNAME=disk.raw\nUUID=x\nVERSION=LVM2\\ 001\nTYPE=LVM2_member\n"
    assert _parse_export(text) == {"UUID": "x", "VERSION": "LVM2 001", "TYPE": "LVM2_member"}


def test_parse_fstab() -> None:
    text = """\
# /etc/fstab: static file system information.

UUID=abc /               ext4    errors=remount-ro 0       1
  # indented comment
LABEL=my\\040disk /mnt/with\\040space xfs defaults,nofail 0 2
/dev/mapper/centos-swap swap swap defaults 0 0
/dev/vdb /data
UUID=f /home btrfs subvol=@home,compress=zstd
"""
    assert parse_fstab(text) == (
        FstabEntry("UUID=abc", "/", "ext4", ("errors=remount-ro",)),
        FstabEntry("LABEL=my disk", "/mnt/with space", "xfs", ("defaults", "nofail")),
        FstabEntry("/dev/mapper/centos-swap", "swap", "swap", ("defaults",)),
        FstabEntry("/dev/vdb", "/data", "auto", ("defaults",)),
        FstabEntry("UUID=f", "/home", "btrfs", ("subvol=@home", "compress=zstd")),
    )
    assert parse_fstab(text)[-1].subvolume == "@home"
    assert parse_fstab("") == ()


def test_parse_os_release() -> None:
    text = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME='Debian GNU/Linux'
VERSION_ID="12"
ID=debian
# comment
ID_LIKE="rhel centos fedora"
QUOTED="a \\"b\\" \\$c \\\\ \\n"
BARE=it\\'s
EMPTY=
not a line
"""
    assert parse_os_release(text) == {
        "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)",
        "NAME": "Debian GNU/Linux",
        "VERSION_ID": "12",
        "ID": "debian",
        "ID_LIKE": "rhel centos fedora",
        "QUOTED": 'a "b" $c \\ \\n',
        "BARE": "it's",
        "EMPTY": "",
    }
