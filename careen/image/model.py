"""What probing found in an image: format, partitions, LVM, filesystems, the OS inside.

These are plain frozen records. Probing (`careen.image.probe` and friends) fills them in
once; everything after that (attaching, mounting, `careen inspect`) reads them and never
re-probes, so a format decided once is the format passed to qemu everywhere.

Byte offsets are always relative to the *raw view* of the disk: the image file itself for
raw images, or a raw export of it (qemu-storage-daemon FUSE, qemu-nbd) for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class ImageFormat(StrEnum):
    """Disk formats careen accepts. Anything else qemu-img reports is refused."""

    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VDI = "vdi"
    VHDX = "vhdx"
    VPC = "vpc"


@dataclass(frozen=True)
class ImageInfo:
    """What `qemu-img info` said about the image file, after the safety checks."""

    path: Path
    format: ImageFormat
    virtual_size: int
    actual_size: int
    backing_file: Path | None = None  # only when the user named it
    backing_format: ImageFormat | None = None  # probed from backing_file itself
    data_file: Path | None = None  # only when the user named it
    cluster_size: int | None = None


@dataclass(frozen=True)
class Region:
    """A byte range of the raw view of the disk."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Partition:
    number: int
    region: Region
    type: str  # MBR type ("83", "8e") or GPT type GUID, lower case
    uuid: str | None = None  # PARTUUID
    name: str | None = None  # GPT partition name
    bootable: bool = False


@dataclass(frozen=True)
class PartitionTable:
    label: str  # "dos" or "gpt"
    id: str | None
    partitions: tuple[Partition, ...]


@dataclass(frozen=True)
class Stripe:
    pv: str  # the PV's name in the VG metadata ("pv0")
    start_extent: int


@dataclass(frozen=True)
class Segment:
    start_extent: int
    extent_count: int
    type: str  # "striped" (linear is striped with one stripe), "thin", "raid1", ...
    stripes: tuple[Stripe, ...] = ()
    stripe_size: int | None = None  # bytes


@dataclass(frozen=True)
class PhysicalVolume:
    name: str  # key in the VG metadata ("pv0")
    uuid: str
    region: Region  # the device (partition or whole disk) holding the PV
    pe_start: int  # bytes from the start of the device to the first extent


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    uuid: str
    segments: tuple[Segment, ...]
    visible: bool = True

    @property
    def path(self) -> str:
        """The name the guest uses for it (`/dev/VG/LV`)."""
        return f"/dev/{self.vg}/{self.name}"

    @property
    def mapper_name(self) -> str:
        """`/dev/mapper/` name: dashes in the VG or LV name are doubled."""
        return f"{self.vg.replace('-', '--')}-{self.name.replace('-', '--')}"

    @property
    def layout(self) -> str:
        """`linear` for one single-stripe segment, else the segment types joined."""
        if len(self.segments) == 1:
            seg = self.segments[0]
            if seg.type == "striped" and len(seg.stripes) == 1:
                return "linear"
            if seg.type == "striped":
                return f"striped({len(seg.stripes)})"
            return seg.type
        return "multi-segment(" + ",".join(s.type for s in self.segments) + ")"


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    extent_size: int  # bytes
    pvs: tuple[PhysicalVolume, ...]
    lvs: tuple[LogicalVolume, ...]

    def pv(self, name: str) -> PhysicalVolume:
        for pv in self.pvs:
            if pv.name == name:
                return pv
        raise KeyError(name)


@dataclass(frozen=True)
class Filesystem:
    """A filesystem (or swap, or LUKS, or LVM PV) found on a partition, LV or the disk.

    `region` is where its bytes lie in the raw view, or None when they do not lie in one
    contiguous range (an LV that is not linear): such a filesystem can be mounted only
    where device-mapper or the appliance assembles it.
    """

    source: str  # human name: "partition 1", "LV centos/root", "whole disk"
    type: str  # blkid TYPE: ext4, xfs, btrfs, swap, vfat, ntfs, crypto_LUKS, LVM2_member...
    region: Region | None
    uuid: str | None = None
    label: str | None = None
    partition: Partition | None = None
    lv: LogicalVolume | None = None
    subvolumes: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling by which an fstab may name this filesystem."""
        out: list[str] = []
        if self.uuid:
            out += [f"UUID={self.uuid}", f"/dev/disk/by-uuid/{self.uuid}"]
        if self.label:
            out += [f"LABEL={self.label}", f"/dev/disk/by-label/{self.label}"]
        if self.partition is not None:
            if self.partition.uuid:
                out += [f"PARTUUID={self.partition.uuid}"]
                out += [f"/dev/disk/by-partuuid/{self.partition.uuid}"]
            n = self.partition.number
            for disk in ("vda", "sda", "xvda", "hda"):
                out.append(f"/dev/{disk}{n}")
            out.append(f"/dev/nvme0n1p{n}")
        if self.lv is not None:
            out += [self.lv.path, f"/dev/mapper/{self.lv.mapper_name}"]
        if self.partition is None and self.lv is None:
            out += ["/dev/vda", "/dev/sda", "/dev/xvda"]
        return tuple(out)


@dataclass(frozen=True)
class FstabEntry:
    spec: str
    mountpoint: str
    type: str
    options: tuple[str, ...]

    @property
    def subvolume(self) -> str | None:
        for opt in self.options:
            if opt.startswith("subvol="):
                return opt.removeprefix("subvol=")
        return None


@dataclass(frozen=True)
class OSInfo:
    """Facts about the guest OS, read from its files (never by running its programs)."""

    family: str  # "linux" or "windows"
    distro: str  # os-release ID: debian, ubuntu, centos, fedora, opensuse-leap, alpine...
    version: str  # VERSION_ID
    pretty_name: str
    id_like: tuple[str, ...] = ()
    package_manager: str | None = None  # apt, dnf, yum, zypper, apk
    cloud_init: str | None = None  # version, when installed
    cloudbase_init: str | None = None  # version, when installed
    cloudbase_init_folder: str | None = None  # as Windows names it: C:\\Program Files\\...
    windows_systemroot: str | None = None  # guest path: /Windows
    resolv_conf: str = "missing"  # "file", "symlink -> TARGET", "symlink -> TARGET (dangling)"
    selinux: str = "none"  # enforcing, permissive, disabled, none
    fstab: tuple[FstabEntry, ...] = ()


@dataclass(frozen=True)
class Disk:
    """Everything probing found; `careen inspect` prints it."""

    image: ImageInfo
    table: PartitionTable | None
    volume_groups: tuple[VolumeGroup, ...]
    filesystems: tuple[Filesystem, ...]
    root: Filesystem | None = None
    os: OSInfo | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
