"""Whether Windows left an NTFS volume safe to write: its dirty flag and hibernation.

careen refuses to write to an NTFS that Windows left dirty (the volume was not shut
down cleanly, chkdsk is due) or hibernated (Windows, fast startup included, keeps the
volume's state in memory it will resume; anything written meanwhile is lost or
corrupts it). The flag lives in the $VOLUME_INFORMATION attribute of the $Volume
record (MFT record 3), and again in its copy in $MFTMirr; this module reads both through
a `read(offset, size)` callable, so it runs no process and works on a file, a device or
a guest's partition alike. Offsets are relative to the start of the filesystem.

careen must check for itself: ntfs-3g (2022.10.3, what libguestfs's appliance mounts
NTFS with) mounts a dirty volume read-write without a word, and mounts a hibernated one
read-only with exit status 0 ("Windows is hibernated, refused to mount. Falling back
to read-only mount"), so the first write fails with EROFS, not the mount.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from careen.errors import CareenError

Reader = Callable[[int, int], bytes]

VOLUME_DIRTY = 0x0001
_OEM_ID = b"NTFS    "
_VOLUME_RECORD = 3
_VOLUME_INFORMATION = 0x70
_END_OF_ATTRIBUTES = 0xFFFFFFFF
# The update sequence protects every 512 bytes of a record, whatever the sector size:
# the last two bytes of each 512-byte stride hold the sequence number on disk.
_FIXUP_STRIDE = 512


@dataclass(frozen=True)
class VolumeState:
    """The $Volume flags, where they are on disk, and the NTFS version (3, 1).

    A writer that changes the flags must write the same value at both offsets: ntfs-3g
    refuses a volume whose $MFTMirr does not match its $MFT ("$MFTMirr does not match
    $MFT (record 3)"), and Windows' chkdsk repairs it.
    """

    flags: int
    flags_offset: int  # the 16-bit flags in $MFT, in bytes from the filesystem's start
    version: tuple[int, int]
    mirror_flags_offset: int  # the same field in $MFTMirr's copy of the record

    @property
    def dirty(self) -> bool:
        return bool(self.flags & VOLUME_DIRTY)


@dataclass(frozen=True)
class _Geometry:
    mft_offset: int
    mirror_offset: int
    record_size: int


def volume_state(read: Reader) -> VolumeState:
    """The $Volume flags and NTFS version of the filesystem that `read` reads."""
    geometry = _boot_sector(_read(read, 0, 512))
    flags, offset, version = _volume_record(read, geometry.mft_offset, geometry.record_size)
    mirror = _volume_record(read, geometry.mirror_offset, geometry.record_size)
    if mirror[0] != flags:
        raise CareenError(
            f"NTFS $MFTMirr does not match $MFT: $Volume flags {mirror[0]:#06x} and {flags:#06x}",
            hint="let Windows' chkdsk (or ntfsfix) repair the volume",
        )
    return VolumeState(flags, offset, version, mirror[1])


def _volume_record(read: Reader, table: int, record_size: int) -> tuple[int, int, tuple[int, int]]:
    """The flags, their offset and the version in record 3 of the MFT (or its mirror)."""
    record_offset = table + _VOLUME_RECORD * record_size
    record = _apply_fixups(_read(read, record_offset, record_size))
    value_offset = _volume_information(record)
    major, minor, flags = struct.unpack_from("<BBH", record, value_offset + 8)
    flags_in_record = value_offset + 10
    if {flags_in_record % _FIXUP_STRIDE, (flags_in_record + 1) % _FIXUP_STRIDE} & {510, 511}:
        # On disk these bytes hold the update sequence number, not the flags: writing
        # the flags there would break the record.
        raise CareenError("malformed NTFS: $Volume's flags fall on an update sequence position")
    return flags, record_offset + flags_in_record, (major, minor)


def hibernated(header: bytes) -> bool:
    """Whether hiberfil.sys starting with `header` holds a hibernated (or fast-started)
    Windows: "hibr" in any case. "wake" or zeros mean Windows resumed, or never slept."""
    return header[:4].lower() == b"hibr"


def _read(read: Reader, offset: int, size: int) -> bytes:
    data = read(offset, size)
    if len(data) < size:
        raise CareenError(f"not NTFS: truncated at byte {offset + len(data)}")
    return data


def _boot_sector(sector: bytes) -> _Geometry:
    if sector[3:11] != _OEM_ID:
        raise CareenError(f"not NTFS: the boot sector's OEM ID is {sector[3:11]!r}")
    if sector[510:512] != b"\x55\xaa":
        raise CareenError("not NTFS: the boot sector has no 55 AA signature")
    (sector_size,) = struct.unpack_from("<H", sector, 0x0B)
    if sector_size not in (256, 512, 1024, 2048, 4096):
        raise CareenError(f"malformed NTFS boot sector: {sector_size} bytes per sector")
    cluster_size = sector_size * _power_of_two(sector[0x0D], "sectors per cluster")
    mft_lcn, mirror_lcn = struct.unpack_from("<QQ", sector, 0x30)
    if mft_lcn == 0 or mirror_lcn == 0:
        raise CareenError("malformed NTFS boot sector: the MFT or its mirror at cluster 0")
    record_size = _record_size(struct.unpack_from("<b", sector, 0x40)[0], cluster_size)
    return _Geometry(mft_lcn * cluster_size, mirror_lcn * cluster_size, record_size)


def _power_of_two(encoded: int, what: str) -> int:
    # Values above 128 encode 2 ** (256 - value): how mkntfs and Windows write clusters
    # of 64 KiB and more, which do not fit in the byte.
    value = 1 << (256 - encoded) if encoded > 128 else encoded
    if value == 0 or value & (value - 1) or value > 4096:
        raise CareenError(f"malformed NTFS boot sector: {encoded} {what}")
    return value


def _record_size(encoded: int, cluster_size: int) -> int:
    # A negative count means 2 ** -count bytes: records smaller than a cluster.
    size = 1 << -encoded if encoded < 0 else encoded * cluster_size
    if size < _FIXUP_STRIDE or size > 65536 or size & (size - 1):
        raise CareenError(f"malformed NTFS boot sector: MFT records of {size} bytes")
    return size


def _apply_fixups(raw: bytes) -> bytes:
    """The MFT record with its update sequence undone, after checking every stride."""
    if raw[:4] != b"FILE":
        raise CareenError(f"malformed NTFS: MFT record {_VOLUME_RECORD} starts {raw[:4]!r}")
    usa_offset, usa_count = struct.unpack_from("<HH", raw, 4)
    strides = len(raw) // _FIXUP_STRIDE
    if usa_count != strides + 1 or usa_offset + 2 * usa_count > len(raw) or usa_offset % 2:
        raise CareenError(f"malformed NTFS: bad update sequence in MFT record {_VOLUME_RECORD}")
    record = bytearray(raw)
    usn = raw[usa_offset : usa_offset + 2]
    for i in range(strides):
        end = (i + 1) * _FIXUP_STRIDE
        if record[end - 2 : end] != usn:
            raise CareenError(
                f"malformed NTFS: fixup mismatch in MFT record {_VOLUME_RECORD} "
                f"at byte {end - 2} (a torn write?)"
            )
        entry = usa_offset + 2 * (i + 1)
        record[end - 2 : end] = raw[entry : entry + 2]
    _check_header(bytes(record))
    return bytes(record)


def _check_header(record: bytes) -> None:
    (flags,) = struct.unpack_from("<H", record, 0x16)
    if not flags & 0x0001:
        raise CareenError(f"malformed NTFS: MFT record {_VOLUME_RECORD} is not in use")
    (usa_offset,) = struct.unpack_from("<H", record, 4)
    # NTFS 3.1 records carry their own number (older ones have their update sequence there).
    if usa_offset >= 0x30 and struct.unpack_from("<I", record, 0x2C)[0] != _VOLUME_RECORD:
        raise CareenError(f"malformed NTFS: MFT record {_VOLUME_RECORD} is not $Volume")


def _volume_information(record: bytes) -> int:
    """The offset in `record` of the resident $VOLUME_INFORMATION value."""
    offset, used = struct.unpack_from("<H", record, 0x14)[0], _used_size(record)
    while offset + 8 <= used:
        kind, length = struct.unpack_from("<II", record, offset)
        if kind == _END_OF_ATTRIBUTES:
            break
        if length < 16 or length % 8 or offset + length > used:
            raise CareenError(f"malformed NTFS: bad attribute at byte {offset} of $Volume")
        if kind == _VOLUME_INFORMATION:
            return _resident_value(record, offset, length)
        offset += length
    raise CareenError("malformed NTFS: $Volume has no $VOLUME_INFORMATION attribute")


def _used_size(record: bytes) -> int:
    used = int.from_bytes(record[0x18:0x1C], "little")
    if used > len(record):
        raise CareenError("malformed NTFS: $Volume's used size exceeds its record")
    return used


def _resident_value(record: bytes, offset: int, length: int) -> int:
    if record[offset + 8] != 0 or length < 0x18:
        raise CareenError("malformed NTFS: $VOLUME_INFORMATION is not resident")
    value_length, value_offset = struct.unpack_from("<IH", record, offset + 0x10)
    if value_length < 12 or value_offset + value_length > length:
        raise CareenError("malformed NTFS: $VOLUME_INFORMATION is too short")
    return offset + int(value_offset)
