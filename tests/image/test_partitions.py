"""Reading MBR and GPT partition tables from image files."""

from __future__ import annotations

from pathlib import Path

import pytest

from careen.image.model import Region
from careen.image.partitions import parse_sfdisk, read_partition_table

from .helpers import MiB, partition, require, sparse_file


@pytest.fixture(autouse=True)
def _tools() -> None:
    require("sfdisk")


def test_mbr_with_logical_partitions(tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk.raw", 100 * MiB)
    partition(disk, "label: dos\nlabel-id: 0x12345678\n,10M,83,*\n,20M,8e\n,,5\n,10M,83\n,,82\n")
    table = read_partition_table(disk)
    assert table is not None and table.label == "dos" and table.id == "0x12345678"
    assert [p.number for p in table.partitions] == [1, 2, 5, 6]  # no extended container
    first, second, logical = table.partitions[:3]
    assert first.region == Region(MiB, 10 * MiB) and first.bootable and first.type == "83"
    assert second.type == "8e" and not second.bootable
    assert logical.uuid == "12345678-05" and logical.region.size == 10 * MiB


def test_gpt(tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "disk1", 100 * MiB)  # a name ending in a digit: "disk1p2"
    partition(disk, "label: gpt\nsize=10M, type=U, name=efi\ntype=L\n")
    table = read_partition_table(disk)
    assert table is not None and table.label == "gpt"
    efi, root = table.partitions
    assert (efi.number, efi.name, efi.type) == (1, "efi", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
    assert root.number == 2 and root.region.offset == 11 * MiB
    assert root.uuid is not None and root.uuid == root.uuid.lower()


def test_no_table(tmp_path: Path) -> None:
    assert read_partition_table(sparse_file(tmp_path / "disk.raw", 10 * MiB)) is None


def test_sector_size_from_the_table() -> None:
    table = parse_sfdisk(
        {
            "label": "gpt",
            "device": "disk.raw",
            "sectorsize": 4096,
            "partitions": [{"node": "disk.raw1", "start": 256, "size": 1024, "type": "X"}],
        }
    )
    assert table.partitions[0].region == Region(MiB, 4 * MiB)
    assert table.partitions[0].type == "x"
