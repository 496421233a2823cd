"""Helpers for building small synthetic disk images with the real tools."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from careen.image.model import Region
from careen.run import run

MiB = 1024 * 1024

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)")


def require(*programs: str) -> None:
    """Skip the calling test when a program it needs is not installed."""
    for program in programs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")


def sh(*argv: str | Path, input: str | None = None) -> str:
    """Run a command for a test fixture and return its stdout."""
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    return run(list(argv), input=input, env=env, timeout=120).stdout


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def copy_into(src: Path, dst: Path, offset: int) -> None:
    """Copy a filesystem image into a region of a disk image, keeping holes."""
    with src.open("rb") as s, dst.open("r+b") as d:
        pos = 0
        while chunk := s.read(MiB):
            if chunk.count(0) != len(chunk):
                d.seek(offset + pos)
                d.write(chunk)
            pos += len(chunk)


def partition(disk: Path, script: str) -> None:
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk, input=script)


@contextmanager
def loop_device(image: Path, region: Region) -> Iterator[str]:
    """A loop device over one region of an image; detached however the test ends."""
    device = sh(
        "losetup", "-o", str(region.offset), "--sizelimit", str(region.size), "-f", "--show", image
    ).strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device], check=False)


# --- a disk with LVM, made by LVM's own tools ---------------------------------------------

LVM_CONFIG = (
    "global{activation=0} backup{backup=0 archive=0} "
    "devices{obtain_device_list_from_udev=0} activation{udev_sync=0 udev_rules=0}"
)


@dataclass(frozen=True)
class LvmDisk:
    path: Path
    regions: dict[str, Region]  # partition name -> region
    pe_start: dict[str, int]  # partition name -> bytes, as pvs says
    ranges: dict[str, list[tuple[str, int, int]]]  # LV -> (partition, first PE, last PE)


def lvm(devices: list[str], *argv: str) -> str:
    return sh(argv[0], "--devices", ",".join(devices), "--config", LVM_CONFIG, *argv[1:])


def build_lvm_disk(path: Path) -> Iterator[LvmDisk]:
    sparse_file(path, 200 * MiB)
    partition(path, "label: dos\nsize=20M,type=83\nsize=80M,type=8e\ntype=8e\n")
    regions = {
        "partition 2": Region(21 * MiB, 80 * MiB),
        "partition 3": Region(101 * MiB, 99 * MiB),
    }
    with ExitStack() as stack:
        loops = {stack.enter_context(loop_device(path, r)): n for n, r in regions.items()}
        devs = list(loops)
        lvm(devs, "pvcreate", "-q", *devs)
        lvm(devs, "vgcreate", "-q", "-s", "1M", "careentest", *devs)
        plan = [
            ("root", "8M", [devs[0]]),
            ("two", "4M", [devs[0]]),
            ("pad", "4M", [devs[0]]),  # so that extending "two" makes a second segment
            ("str", "8M", ["-i", "2", "-I", "64k"]),
        ]
        for name, size, extra in plan:
            lvm(devs, "lvcreate", "-q", "-an", "-Zn", "-L", size, "-n", name, "careentest", *extra)
        lvm(devs, "lvextend", "-q", "-L", "8M", "careentest/two", devs[0])
        pvs = json.loads(
            lvm(
                devs,
                "pvs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "pv_name,pe_start",
            )
        )
        lvs = json.loads(lvm(devs, "lvs", "--reportformat", "json", "-o", "lv_name,seg_pe_ranges"))
    pe_start = {loops[r["pv_name"]]: int(r["pe_start"]) for r in pvs["report"][0]["pv"]}
    ranges: dict[str, list[tuple[str, int, int]]] = {}
    for row in lvs["report"][0]["lv"]:
        for dev, first, last in re.findall(r"(\S+):(\d+)-(\d+)", row["seg_pe_ranges"]):
            ranges.setdefault(row["lv_name"], []).append((loops[dev], int(first), int(last)))
    yield LvmDisk(path, regions, pe_start, ranges)
