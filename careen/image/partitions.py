"""Read a disk's partition table (MBR or GPT) from its raw view.

`sfdisk --json` reads tables from a regular file without root or a loop device, which
matters here: the host kernel makes no partition devices for loop devices, so careen
works with byte regions of the raw view rather than `/dev/loop0p1`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from careen.errors import CareenError
from careen.image.model import Partition, PartitionTable, Region
from careen.run import CommandError, run

# MBR extended partition containers (DOS, Windows LBA, Linux): the logical partitions
# inside them are listed separately by sfdisk, and the container holds no filesystem.
EXTENDED_TYPES = frozenset({"5", "f", "85"})

_NO_TABLE = "does not contain a recognized partition table"


def read_partition_table(raw: Path) -> PartitionTable | None:
    """The partition table of a raw disk, or None when it has none."""
    try:
        proc = run(["sfdisk", "--json", raw], timeout=60)
    except CommandError as e:
        if _NO_TABLE in e.stderr:
            return None
        raise
    if not proc.stdout.strip():
        return None
    try:
        data = json.loads(proc.stdout)["partitiontable"]
    except (ValueError, KeyError) as e:
        raise CareenError(f"sfdisk printed an unreadable partition table for {raw}") from e
    return parse_sfdisk(data)


def parse_sfdisk(table: dict[str, Any]) -> PartitionTable:
    """Turn sfdisk's `partitiontable` object into a PartitionTable."""
    label = str(table.get("label", ""))
    sector = int(table.get("sectorsize", 512))
    table_id = table.get("id")
    device = str(table.get("device", ""))
    partitions = []
    for entry in table.get("partitions", []):
        part_type = str(entry.get("type", "")).lower()
        if label == "dos" and part_type in EXTENDED_TYPES:
            continue
        number = _number(str(entry.get("node", "")), device)
        partitions.append(
            Partition(
                number=number,
                region=Region(int(entry["start"]) * sector, int(entry["size"]) * sector),
                type=part_type,
                uuid=_partuuid(label, table_id, number, entry.get("uuid")),
                name=entry.get("name") or None,
                bootable=bool(entry.get("bootable", False)),
            )
        )
    return PartitionTable(label, str(table_id) if table_id else None, tuple(partitions))


def _number(node: str, device: str) -> int:
    """The partition number from sfdisk's node name: DEVICE + optional `p` + number."""
    rest = node.removeprefix(device) if device and node.startswith(device) else node
    match = re.search(r"(\d+)$", rest)
    if match is None:
        raise CareenError(f"sfdisk named a partition {node!r}, which has no number")
    return int(match.group(1))


def _partuuid(label: str, table_id: object, number: int, uuid: object) -> str | None:
    if uuid:
        return str(uuid).lower()
    # MBR has no per-partition UUID; Linux derives PARTUUID from the disk signature.
    if label == "dos" and isinstance(table_id, str) and table_id.startswith("0x"):
        return f"{table_id.removeprefix('0x').lower():0>8}-{number:02x}"
    return None
