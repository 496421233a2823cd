"""Find the filesystems of a disk's raw view, and parse the guest files that name them.

`scan_disk()` walks the disk the way a booting guest would see it: the partition table
(or the whole disk when there is none), LVM PVs among those, then the LVs of their VGs.
Every probe is `blkid -p` on a byte range of the file, so nothing is mounted, attached or
activated, and the host's own devices are never consulted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from careen.errors import CareenError
from careen.image.lvm import lv_region, read_volume_groups
from careen.image.model import (
    Filesystem,
    FstabEntry,
    ImageInfo,
    LogicalVolume,
    Partition,
    PartitionTable,
    Region,
    VolumeGroup,
)
from careen.image.partitions import read_partition_table
from careen.image.probe import NOT_AN_IMAGE_HINT
from careen.run import CommandError, run

LVM_MEMBER = "LVM2_member"
# LV types that hold other LVs' data, never a filesystem of their own.
POOL_TYPES = frozenset({"thin-pool", "cache-pool", "vdo-pool"})
# blkid's exit status when it found nothing it recognises.
_BLKID_NOTHING = 2


def probe_filesystem(raw: Path, region: Region) -> dict[str, str]:
    """blkid's low-level probe of one byte range: TYPE, UUID, LABEL...; {} when nothing."""
    argv = ["blkid", "-p", "-o", "export", "--offset", str(region.offset)]
    argv += ["--size", str(region.size), str(raw)]
    try:
        proc = run(argv, timeout=60)
    except CommandError as e:
        if e.returncode == _BLKID_NOTHING:
            return {}
        raise
    return _parse_export(proc.stdout)


def _parse_export(text: str) -> dict[str, str]:
    """Parse `blkid -o export`: KEY=value lines, with shell-style backslash escapes."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and key != "DEVNAME":
            out[key] = re.sub(r"\\(.)", r"\1", value)
    return out


def scan_disk(
    raw: Path, image: ImageInfo
) -> tuple[PartitionTable | None, tuple[VolumeGroup, ...], tuple[Filesystem, ...]]:
    """The partition table, LVM volume groups and filesystems of a disk's raw view."""
    table = read_partition_table(raw)
    found: list[Filesystem] = []
    if table is None:
        found += _probe(raw, "whole disk", Region(0, image.virtual_size), None)
    else:
        for part in table.partitions:
            found += _probe(raw, f"partition {part.number}", part.region, part)
    candidates = [(fs.source, fs.region) for fs in found if fs.type == LVM_MEMBER and fs.region]
    groups = read_volume_groups(raw, candidates) if candidates else ()
    for vg in groups:
        for lv in vg.lvs:
            if lv.visible and not _is_pool(lv):
                found.append(_lv_filesystem(raw, vg, lv))
    return table, groups, tuple(found)


def check_found(
    image: ImageInfo, table: PartitionTable | None, found: Sequence[Filesystem]
) -> None:
    """Refuse a disk in which the scan recognised no filesystem at all: nothing to open."""
    if found:
        return
    if table is None:
        what = "no partition table and no filesystem"
    else:
        count = len(table.partitions)
        what = f"a {table.label} partition table ({count} partition(s)) but no filesystem"
    raise CareenError(f"{image.path} holds {what} that careen recognises", NOT_AN_IMAGE_HINT)


def _probe(raw: Path, source: str, region: Region, partition: Partition | None) -> list[Filesystem]:
    tags = probe_filesystem(raw, region)
    if "TYPE" not in tags:
        return []
    return [_filesystem(source, tags, region, partition=partition)]


def _filesystem(
    source: str,
    tags: dict[str, str],
    region: Region | None,
    *,
    partition: Partition | None = None,
    lv: LogicalVolume | None = None,
) -> Filesystem:
    # TODO: list btrfs subvolumes once careen reads the btrfs root tree itself;
    # `btrfs subvolume list` needs a mount and `dump-tree` cannot take an offset.
    return Filesystem(
        source=source,
        type=tags.get("TYPE", "unknown"),
        region=region,
        uuid=tags.get("UUID") or None,
        label=tags.get("LABEL") or None,
        partition=partition,
        lv=lv,
    )


def _is_pool(lv: LogicalVolume) -> bool:
    return any(seg.type in POOL_TYPES for seg in lv.segments)


def _lv_filesystem(raw: Path, vg: VolumeGroup, lv: LogicalVolume) -> Filesystem:
    source = f"LV {vg.name}/{lv.name}"
    try:
        region: Region | None = lv_region(vg, lv)
    except CareenError:
        region = None
    probe_at = region or _first_extents(vg, lv)
    tags = probe_filesystem(raw, probe_at) if probe_at else {}
    return _filesystem(source, tags, region, lv=lv)


def _first_extents(vg: VolumeGroup, lv: LogicalVolume) -> Region | None:
    """The bytes of an LV's first segment when it is one contiguous range, to read only.

    Superblocks sit near the start of a filesystem, so probing the first segment of a
    multi-segment LV still finds its type and UUID (which fstab may name). It is never
    handed out as the LV's region: mounting it would run past its end.
    """
    first = lv.segments[0] if lv.segments else None
    if first is None or first.type != "striped" or len(first.stripes) != 1:
        return None
    stripe = first.stripes[0]
    if stripe.pv not in {pv.name for pv in vg.pvs}:
        return None
    pv = vg.pv(stripe.pv)
    offset = pv.region.offset + pv.pe_start + stripe.start_extent * vg.extent_size
    return Region(offset, first.extent_count * vg.extent_size)


# --- guest files -----------------------------------------------------------------------

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape_fstab(field: str) -> str:
    # fstab writes space, tab, newline and backslash as \040, \011, \012 and \134.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_fstab(text: str) -> tuple[FstabEntry, ...]:
    """Entries of an fstab; missing type and options default as mount(8) does."""
    entries: list[FstabEntry] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        fields = [_unescape_fstab(f) for f in fields]
        fields += [""] * (4 - len(fields))
        spec, mountpoint, fstype, options = fields[:4]
        entries.append(
            FstabEntry(
                spec=spec,
                mountpoint=mountpoint,
                type=fstype or "auto",
                options=tuple(o for o in (options or "defaults").split(",") if o),
            )
        )
    return tuple(entries)


_OS_RELEASE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value pairs of os-release(5), with shell quoting and escapes undone."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep and _OS_RELEASE_KEY.fullmatch(key):
            out[key] = _shell_value(value)
    return out


def _shell_value(value: str) -> str:
    """Undo shell quoting of one assignment's value (no expansion: os-release has none)."""
    out: list[str] = []
    quote = ""
    chars = iter(value)
    for c in chars:
        if quote == "'" and c != "'":
            out.append(c)
        elif c == quote or (not quote and c in "'\""):
            quote = "" if quote else c
        elif c == "\\":
            escaped = next(chars, "")
            # Inside double quotes only these are escapes; elsewhere the backslash stays.
            if quote and escaped not in '$"\\`':
                out.append(c)
            out.append(escaped)
        elif not quote and c.isspace():
            break  # an unquoted blank ends the value (a trailing comment follows)
        else:
            out.append(c)
    return "".join(out)
