"""LVM2 metadata read straight from disk bytes, checked against LVM's own tools."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from careen.errors import CareenError
from careen.image.lvm import (
    LABEL_ID,
    LABEL_TYPE,
    MDA_MAGIC,
    lv_region,
    parse_config,
    read_pv,
    read_volume_groups,
)
from careen.image.model import LogicalVolume, PhysicalVolume, Region, Segment, Stripe, VolumeGroup

from .helpers import LvmDisk, MiB, needs_root, sparse_file

PV_UUID = "X7jbW6xAA378PjnIpKPD331vThnmaPFm"

METADATA = """\
# a comment
vg-1 {
id = "sGR0bg-4wCF-S6Z6-sWBL-U4WY-dzew-zv8HWv"
seqno = 7
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192          # 4 MiB
description = "quote \\" and \\\\ inside"

physical_volumes {
pv0 {
id = "X7jbW6-xAA3-78Pj-nIpK-PD33-1vTh-nmaPFm"
device = "/dev/vda2"
pe_start = 2048
pe_count = 24
}
}

logical_volumes {
root {
id = "elj6WM-G32O-PZFO-JHPS-UAsy-LO4c-HOJBlb"
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 10
type = "striped"
stripe_count = 1
stripes = [
"pv0", 3
]
}
}
}
}
contents = "Text Format Volume"
version = 1
"""


# --- the text format -------------------------------------------------------------------


def test_parse_config() -> None:
    config = parse_config(METADATA)
    vg = config.section("vg-1")
    assert vg.number("seqno") == 7 and vg.number("extent_size") == 8192
    assert vg.items_of("status") == ["RESIZEABLE", "READ", "WRITE"]
    assert vg.items_of("flags") == []
    assert vg.text("description") == 'quote " and \\ inside'
    segment = vg.section("logical_volumes").section("root").section("segment1")
    assert segment.items_of("stripes") == ["pv0", 3]
    assert config.number("version") == 1


@pytest.mark.parametrize("bad", ["vg {", "a = ", "a = [1, 2", "a b", "a = @"])
def test_parse_config_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_config(bad)


# --- synthetic PVs ---------------------------------------------------------------------

MDA_OFFSET = 4096
MDA_SIZE = 64 * 1024


def synthetic_pv(path: Path, text: str, region: Region, text_offset: int) -> None:
    """Write a PV label, header and metadata area holding `text` at `text_offset`."""
    data = text.encode()
    with path.open("r+b") as f:
        label = LABEL_ID + struct.pack("<QII", 1, 0, 32) + LABEL_TYPE
        header = PV_UUID.encode() + struct.pack("<Q", region.size)
        header += struct.pack("<QQQQ", MiB, 0, 0, 0)  # one data area, then the end
        header += struct.pack("<QQQQ", MDA_OFFSET, MDA_SIZE, 0, 0)  # one metadata area
        f.seek(region.offset + 512)
        f.write(label + header)
        mda = struct.pack("<I", 0) + MDA_MAGIC + struct.pack("<IQQ", 1, MDA_OFFSET, MDA_SIZE)
        mda += struct.pack("<QQII", text_offset, len(data), 0, 0)
        f.seek(region.offset + MDA_OFFSET)
        f.write(mda)
        first = min(len(data), MDA_SIZE - text_offset)
        f.seek(region.offset + MDA_OFFSET + text_offset)
        f.write(data[:first])
        f.seek(region.offset + MDA_OFFSET + 512)  # the circular buffer wraps past the header
        f.write(data[first:])


def test_read_pv_wrapped_metadata(tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.raw", 8 * MiB)
    region = Region(MiB, 4 * MiB)
    synthetic_pv(disk, METADATA, region, MDA_SIZE - 300)
    assert read_pv(disk, region) == (PV_UUID, METADATA)
    assert read_pv(disk, Region(0, MiB)) is None


def test_read_volume_groups_from_synthetic_pv(tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    region = Region(MiB, 60 * MiB)
    synthetic_pv(disk, METADATA, region, 1024)
    (vg,) = read_volume_groups(disk, [("partition 2", region)])
    assert (vg.name, vg.extent_size) == ("vg-1", 4 * MiB)
    assert vg.pvs == (PhysicalVolume("pv0", "X7jbW6-xAA3-78Pj-nIpK-PD33-1vTh-nmaPFm", region, MiB),)
    (lv,) = vg.lvs
    assert lv.path == "/dev/vg-1/root" and lv.mapper_name == "vg--1-root" and lv.visible
    assert lv_region(vg, lv) == Region(MiB + MiB + 3 * 4 * MiB, 40 * MiB)


def test_damaged_metadata_area(tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.raw", 8 * MiB)
    region = Region(0, 4 * MiB)
    synthetic_pv(disk, METADATA, region, 1024)
    with disk.open("r+b") as f:
        f.seek(MDA_OFFSET + 4)
        f.write(b"garbage!")
    with pytest.raises(CareenError, match="damaged"):
        read_pv(disk, region)


# --- lv_region refusals ----------------------------------------------------------------


def group(*segments: Segment) -> tuple[VolumeGroup, LogicalVolume]:
    lv = LogicalVolume("centos", "root", "u", segments)
    pv = PhysicalVolume("pv0", "p", Region(0, 100 * MiB), MiB)
    return VolumeGroup("centos", "v", 4 * MiB, (pv,), (lv,)), lv


@pytest.mark.parametrize(
    ("segments", "layout"),
    [
        (
            (
                Segment(0, 2, "striped", (Stripe("pv0", 0),)),
                Segment(2, 2, "striped", (Stripe("pv0", 5),)),
            ),
            "multi-segment(striped,striped)",
        ),
        ((Segment(0, 4, "striped", (Stripe("pv0", 0), Stripe("pv1", 0)), 65536),), "striped(2)"),
        ((Segment(0, 4, "thin"),), "thin"),
        ((Segment(0, 4, "raid1"),), "raid1"),
        ((Segment(0, 4, "mirror"),), "mirror"),
    ],
)
def test_lv_region_refuses_non_linear(segments: tuple[Segment, ...], layout: str) -> None:
    vg, lv = group(*segments)
    with pytest.raises(CareenError) as caught:
        lv_region(vg, lv)
    assert str(caught.value) == (
        f"LV centos/root is {layout}; this host has no device-mapper to assemble it"
    )
    assert caught.value.hint == "use --backend appliance"


def test_lv_region_refuses_missing_pv() -> None:
    vg, lv = group(Segment(0, 4, "striped", (Stripe("pv7", 0),)))
    with pytest.raises(CareenError, match="pv7"):
        lv_region(vg, lv)


# --- against LVM's own tools -----------------------------------------------------------


@pytest.mark.root
@needs_root
def test_volume_group_matches_lvm_tools(lvm_disk: LvmDisk) -> None:
    (vg,) = read_volume_groups(lvm_disk.path, list(lvm_disk.regions.items()))
    assert vg.name == "careentest" and vg.extent_size == MiB
    assert sorted(lv.name for lv in vg.lvs) == ["pad", "root", "str", "two"]
    for pv in vg.pvs:
        name = next(n for n, r in lvm_disk.regions.items() if r == pv.region)
        assert pv.pe_start == lvm_disk.pe_start[name]
    layouts = {lv.name: lv.layout for lv in vg.lvs}
    assert layouts == {
        "root": "linear",
        "pad": "linear",
        "two": "multi-segment(striped,striped)",
        "str": "striped(2)",
    }


@pytest.mark.root
@needs_root
def test_linear_offsets_match_lvs(lvm_disk: LvmDisk) -> None:
    (vg,) = read_volume_groups(lvm_disk.path, list(lvm_disk.regions.items()))
    for lv in vg.lvs:
        if lv.layout != "linear":
            with pytest.raises(CareenError, match="no device-mapper"):
                lv_region(vg, lv)
            continue
        ((name, first, last),) = lvm_disk.ranges[lv.name]
        start = lvm_disk.regions[name].offset + lvm_disk.pe_start[name]
        assert lv_region(vg, lv) == Region(start + first * MiB, (last - first + 1) * MiB)
