"""A disk that is too small, or that fills up mid-run: a clear error, and nothing published."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from careen.samples import Layout, sample_image

from .verify import host_state, sh

pytestmark = [pytest.mark.root, pytest.mark.images]

CAREEN = Path(os.environ.get("CAREEN", Path(__file__).parents[2] / ".venv/bin/careen"))


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of the size given by the test's parameter (MiB)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", f"size={request.param}m", "tmpfs", mnt)
    try:
        yield mnt
    finally:
        sh("umount", mnt)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("small_disk", [100], indirect=True)
def test_too_little_room_is_refused_before_copying(small_disk: Path) -> None:
    source = sample_image(Layout.MBR_QCOW2)
    before = host_state()
    proc = subprocess.run(
        [str(CAREEN), "refit", str(source), "-o", str(small_disk / "out.qcow2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "MiB free" in proc.stderr and "careen: hint:" in proc.stderr
    assert list(small_disk.iterdir()) == []
    assert host_state() == before


@pytest.mark.timeout(300)
@pytest.mark.parametrize("small_disk", [700], indirect=True)
def test_disk_filling_up_mid_run_publishes_nothing(small_disk: Path, tmp_path: Path) -> None:
    source = sample_image(Layout.BARE)
    sha = _sha(source)
    out = tmp_path / "out.qcow2"
    before = host_state()
    # dd without fsync: the writes succeed into the page cache and fail only at writeback.
    fill = "dd if=/dev/urandom of=/root/filler bs=1M count=900 status=none"
    proc = subprocess.run(
        [
            str(CAREEN),
            "refit",
            str(source),
            "-o",
            str(out),
            "--workdir",
            str(small_disk),
            "--run",
            fill,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr
    assert "filled up" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.qcow2*"))
    assert list(small_disk.iterdir()) == []
    assert _sha(source) == sha
    assert host_state() == before
