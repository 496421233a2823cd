"""Fixtures shared by the image tests: disks built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import LvmDisk, build_lvm_disk, require


@pytest.fixture(scope="session")
def lvm_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LvmDisk]:
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        pytest.skip("needs root and loop devices")
    require("sfdisk", "losetup", "pvcreate")
    yield from build_lvm_disk(tmp_path_factory.mktemp("lvm") / "disk.raw")
