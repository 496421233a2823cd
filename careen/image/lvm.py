"""Read LVM2 volume groups straight from the bytes of a disk image.

The host may have no device-mapper, and running the host's LVM tools against a guest's
PVs risks name clashes with the host's own VGs (pitfalls 6 and 19). So this module reads
LVM's on-disk format itself, without activating anything: the PV label near the start of
each candidate region, the metadata area it points at, and the VG description text stored
there. From that it can say where a *linear* LV lies in the raw view, which is all that can
be mounted safely without device-mapper.

Facts about the format (all integers little-endian):

- label header, in one of the first four 512-byte sectors: ``LABELONE``, its own sector
  number (u64), a CRC (u32), the offset of the PV header from the label sector (u32), and
  the type ``LVM2 001``;
- PV header: the PV UUID (32 characters, no dashes), the device size (u64), then two lists
  of (offset, size) u64 pairs, each ended by a pair of zeros: data areas, then metadata
  areas;
- metadata area header: a checksum (u32), the magic `` LVM2 x[5A%r0N*>``, a version
  (u32), the area's start and size (u64), then (offset, size, checksum, flags) locations of
  the metadata text, offsets relative to the area start. The area after its 512-byte header
  is a circular buffer, so the text may wrap around to just after the header.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from careen.errors import CareenError
from careen.image.model import (
    LogicalVolume,
    PhysicalVolume,
    Region,
    Segment,
    Stripe,
    VolumeGroup,
)

SECTOR = 512
LABEL_SECTORS = 4
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
RAW_LOCN_IGNORED = 0x1
# Real metadata is kilobytes; a crafted header must not make us read gigabytes.
MAX_METADATA = 16 * 1024 * 1024
MAX_AREAS = 16

APPLIANCE_HINT = "use --backend appliance"

# A value in LVM's text format: a string, an integer, or a list of those.
Value = str | int | list["str | int"]


class Section(dict[str, "Value | Section"]):
    """One `name { ... }` block of LVM's text format, keys in file order."""

    def section(self, key: str) -> Section:
        value = self.get(key)
        return value if isinstance(value, Section) else Section()

    def sections(self) -> list[tuple[str, Section]]:
        return [(k, v) for k, v in self.items() if isinstance(v, Section)]

    def text(self, key: str, default: str = "") -> str:
        value = self.get(key)
        return value if isinstance(value, str) else default

    def number(self, key: str, default: int = 0) -> int:
        value = self.get(key)
        return value if isinstance(value, int) else default

    def items_of(self, key: str) -> list[str | int]:
        value = self.get(key)
        return value if isinstance(value, list) else []


class ConfigSyntaxError(ValueError):
    pass


# --- the text format -------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<name>[A-Za-z0-9_.+\-/:]+)
    | (?P<punct>[{}\[\]=,])
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "\0":  # the text on disk may be NUL-terminated
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigSyntaxError(f"unexpected {text[pos]!r} at offset {pos}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind == "name" and re.fullmatch(r"-?\d+(\.\d+)?", m.group()):
            kind = "number"
        if kind != "space":
            out.append((kind, m.group()))
    return out


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokens(text)
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ConfigSyntaxError("unexpected end of text")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        kind, got = self.take()
        if got != value or kind != "punct":
            raise ConfigSyntaxError(f"expected {value!r}, got {got!r}")

    def body(self, closing: str | None) -> Section:
        section = Section()
        while True:
            token = self.peek()
            if token is None:
                if closing is not None:
                    raise ConfigSyntaxError("unclosed section")
                return section
            if token == ("punct", "}") and closing == "}":
                self.pos += 1
                return section
            kind, key = self.take()
            if kind not in ("name", "number", "string"):
                raise ConfigSyntaxError(f"expected a name, got {key!r}")
            key = _unquote(key) if kind == "string" else key
            kind, op = self.take()
            if op == "{":
                section[key] = self.body("}")
            elif op == "=":
                section[key] = self.value()
            else:
                raise ConfigSyntaxError(f"expected '=' or '{{' after {key!r}, got {op!r}")

    def value(self) -> Value:
        kind, token = self.take()
        if token == "[" and kind == "punct":
            return self.items()
        return _scalar(kind, token)

    def items(self) -> list[str | int]:
        items: list[str | int] = []
        while True:
            kind, token = self.take()
            if token == "]" and kind == "punct":
                return items
            if token == "," and kind == "punct":
                continue
            items.append(_scalar(kind, token))


def _scalar(kind: str, token: str) -> str | int:
    if kind == "string":
        return _unquote(token)
    if kind == "number":
        # Floats appear only in settings careen never reads; keep them as text.
        return int(token) if "." not in token else token
    if kind == "name":
        return token
    raise ConfigSyntaxError(f"unexpected {token!r}")


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1], flags=re.DOTALL)


def parse_config(text: str) -> Section:
    """Parse LVM's text configuration format (metadata, lvm.conf) into nested sections."""
    return _Parser(text).body(None)


# --- the on-disk structures ------------------------------------------------------------


@dataclass(frozen=True)
class _Area:
    offset: int  # bytes from the start of the PV
    size: int


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _find_label(f: BinaryIO, region: Region) -> tuple[int, bytes] | None:
    """The label sector's offset within the region and the sector's bytes."""
    for n in range(LABEL_SECTORS):
        sector = _read_at(f, region.offset + n * SECTOR, SECTOR)
        if len(sector) < SECTOR:
            return None
        if sector[:8] == LABEL_ID and sector[24:32] == LABEL_TYPE:
            return n * SECTOR, sector
    return None


def _area_list(data: bytes, pos: int) -> tuple[list[_Area], int]:
    """Read (offset, size) pairs up to the zero pair; return them and the position after."""
    areas: list[_Area] = []
    while pos + 16 <= len(data) and len(areas) <= MAX_AREAS:
        offset, size = struct.unpack_from("<QQ", data, pos)
        pos += 16
        if offset == 0:
            return areas, pos
        areas.append(_Area(offset, size))
    raise ValueError("PV header area list is not terminated")


def _metadata_areas(f: BinaryIO, region: Region) -> tuple[str, list[_Area]] | None:
    found = _find_label(f, region)
    if found is None:
        return None
    label_offset, _ = found
    sector = _read_at(f, region.offset + label_offset, 2 * SECTOR)
    (header_offset,) = struct.unpack_from("<I", sector, 20)
    if not 32 <= header_offset < SECTOR:
        raise ValueError(f"PV header offset {header_offset} is out of range")
    header = sector[header_offset:]
    uuid = header[:32].decode("ascii", errors="replace")
    _, pos = _area_list(header, 40)  # data areas: careen uses pe_start from the metadata
    mdas, _ = _area_list(header, pos)
    return uuid, mdas


def _metadata_text(f: BinaryIO, region: Region, area: _Area) -> str | None:
    if area.offset + area.size > region.size or area.size <= MDA_HEADER_SIZE:
        raise ValueError("metadata area lies outside the PV")
    header = _read_at(f, region.offset + area.offset, MDA_HEADER_SIZE)
    if header[4:20] != MDA_MAGIC:
        raise ValueError("metadata area has no LVM2 magic")
    locations = header[40:]
    offset, size, _, flags = struct.unpack_from("<QQII", locations, 0)
    if offset == 0 or size == 0 or flags & RAW_LOCN_IGNORED:
        return None
    if size > min(MAX_METADATA, area.size - MDA_HEADER_SIZE) or offset >= area.size:
        raise ValueError(f"metadata text of {size} bytes at {offset} does not fit its area")
    return _read_circular(f, region.offset + area.offset, area.size, offset, size).decode(
        "utf-8", errors="replace"
    )


def _read_circular(f: BinaryIO, start: int, area_size: int, offset: int, size: int) -> bytes:
    """Read `size` bytes at `offset` of a circular buffer that skips the area header."""
    first = min(size, area_size - offset)
    data = _read_at(f, start + offset, first)
    if first < size:
        data += _read_at(f, start + MDA_HEADER_SIZE, size - first)
    if len(data) != size:
        raise ValueError("metadata text is cut short by the end of the file")
    return data


def read_pv(raw: Path, region: Region) -> tuple[str, str] | None:
    """The PV UUID (32 characters, no dashes) and the current VG metadata text in a region.

    None when the region holds no LVM2 label. The text is empty for a PV without a
    metadata area (`pvcreate --metadatacopies 0`): another PV of its VG carries it.
    """
    try:
        with raw.open("rb") as f:
            found = _metadata_areas(f, region)
            if found is None:
                return None
            uuid, areas = found
            for area in areas:
                text = _metadata_text(f, region, area)
                if text:
                    return uuid, text
            return uuid, ""
    except (ValueError, struct.error) as e:
        raise CareenError(
            f"the LVM label at byte {region.offset} of {raw} is damaged: {e}",
            "check the image with the guest's own tools (pvck), or use --backend appliance",
        ) from e


# --- volume groups ---------------------------------------------------------------------


def _plain_uuid(uuid: str) -> str:
    return uuid.replace("-", "")


def _segment(section: Section) -> Segment:
    stripes: list[Stripe] = []
    listed = section.items_of("stripes")
    for name, start in zip(listed[::2], listed[1::2], strict=False):
        stripes.append(Stripe(str(name), int(start)))
    stripe_size = section.number("stripe_size")
    return Segment(
        start_extent=section.number("start_extent"),
        extent_count=section.number("extent_count"),
        type=section.text("type", "unknown"),
        stripes=tuple(stripes),
        stripe_size=stripe_size * SECTOR if stripe_size else None,
    )


def _logical_volume(vg: str, name: str, section: Section) -> LogicalVolume:
    segments = [
        _segment(body) for key, body in section.sections() if re.fullmatch(r"segment\d+", key)
    ]
    segments.sort(key=lambda s: s.start_extent)
    return LogicalVolume(
        vg=vg,
        name=name,
        uuid=section.text("id"),
        segments=tuple(segments),
        visible="VISIBLE" in section.items_of("status"),
    )


def _volume_group(name: str, body: Section, regions: dict[str, Region]) -> VolumeGroup:
    extent_bytes = body.number("extent_size") * SECTOR
    pvs = []
    for pv_name, pv in body.section("physical_volumes").sections():
        region = regions.get(_plain_uuid(pv.text("id")))
        if region is None:
            continue  # missing PV: LVs using it are refused by lv_region()
        pvs.append(PhysicalVolume(pv_name, pv.text("id"), region, pv.number("pe_start") * SECTOR))
    lvs = [
        _logical_volume(name, lv_name, lv)
        for lv_name, lv in body.section("logical_volumes").sections()
    ]
    return VolumeGroup(name, body.text("id"), extent_bytes, tuple(pvs), tuple(lvs))


def _vg_section(text: str, where: str) -> tuple[str, Section]:
    try:
        config = parse_config(text)
    except ConfigSyntaxError as e:
        raise CareenError(
            f"the LVM metadata on {where} cannot be parsed: {e}",
            "check the image with the guest's own tools (vgck), or use --backend appliance",
        ) from e
    for key, body in config.sections():
        if "physical_volumes" in body:
            return key, body
    raise CareenError(f"the LVM metadata on {where} names no volume group", APPLIANCE_HINT)


def read_volume_groups(
    raw: Path, candidates: Sequence[tuple[str, Region]]
) -> tuple[VolumeGroup, ...]:
    """Assemble every VG whose PVs lie in the candidate regions (named for messages).

    Each PV carries a copy of its VG's metadata; the copy with the highest `seqno` wins,
    as it does for LVM itself.
    """
    regions: dict[str, Region] = {}
    newest: dict[str, tuple[int, str, Section]] = {}
    for where, region in candidates:
        found = read_pv(raw, region)
        if found is None:
            continue
        uuid, text = found
        regions[uuid] = region
        if not text:
            continue
        name, body = _vg_section(text, where)
        vg_id = body.text("id")
        if vg_id not in newest or body.number("seqno") > newest[vg_id][0]:
            newest[vg_id] = (body.number("seqno"), name, body)
    return tuple(_volume_group(name, body, regions) for _, name, body in newest.values())


def lv_region(vg: VolumeGroup, lv: LogicalVolume) -> Region:
    """Where a linear LV's bytes lie in the raw view.

    Only a single-segment, single-stripe LV is one contiguous range. Anything else needs
    device-mapper to assemble; handing out its first segment would let a mount write past
    it into other data, so it is refused.
    """
    layout = lv.layout
    if layout != "linear":
        raise CareenError(
            f"LV {vg.name}/{lv.name} is {layout}; this host has no device-mapper to assemble it",
            APPLIANCE_HINT,
        )
    segment = lv.segments[0]
    stripe = segment.stripes[0]
    try:
        pv = vg.pv(stripe.pv)
    except KeyError:
        raise CareenError(
            f"LV {vg.name}/{lv.name} lies on {stripe.pv}, which is not in this image",
            "attach every disk of the volume group, or use --backend appliance",
        ) from None
    offset = pv.region.offset + pv.pe_start + stripe.start_extent * vg.extent_size
    size = segment.extent_count * vg.extent_size
    if offset + size > pv.region.end:
        raise CareenError(
            f"LV {vg.name}/{lv.name} runs past the end of its PV", "the image looks truncated"
        )
    return Region(offset, size)
