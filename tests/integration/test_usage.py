"""What a first-time operator ran into: each case ends in one clear line, loses nothing,
and a Ctrl-C from a terminal (SIGINT to the whole process group) unwinds cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from careen.samples import Layout, sample_image

from .util import CAREEN, assert_fails, careen, careen_env, error_lines
from .verify import host_state

pytestmark = [pytest.mark.root, pytest.mark.images]


@pytest.fixture
def source() -> Path:
    return sample_image(Layout.BARE)


@pytest.mark.timeout(120)
def test_force_never_replaces_a_special_file(source: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (Path("/dev/null"), fifo):
        before = target.lstat()
        proc = careen("refit", source, "-o", target, "--force", "-r", "empty", tmpdir=tmp_path)
        assert_fails(proc, 2, "not a regular file", "new file")
        after = target.lstat()
        assert (after.st_mode, after.st_rdev, after.st_ino) == (
            before.st_mode,
            before.st_rdev,
            before.st_ino,
        )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--delete", "/etc"], 2, "top-level system directory"),
        (["--delete", "/e*"], 2, "top-level system directory"),
        (["--delete", "/etc/*/"], 2, "without the trailing slash"),
        (["--install", "foo;rm -rf /"], 2, "not a package name"),
        (["--timeout", "nan", "--reset-machine-id"], 2, ""),
        (["--write", "/etc:hello"], 1, "step 1 .*failed"),
        (["--write", "/no-such-dir/motd:hello"], 1, "step 1 .*failed"),
        (["--workdir", "/no-such-dir", "-r", "empty"], 1, "cannot make a work directory"),
    ],
    ids=lambda v: str(v) if not isinstance(v, list) else " ".join(v),
)
def test_bad_requests_end_in_one_line(
    source: Path, tmp_path: Path, args: list[str], status: int, message: str
) -> None:
    before = host_state()
    out = tmp_path / "out.qcow2"
    proc = careen("refit", source, "-o", out, *args, tmpdir=tmp_path)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    if message:
        assert_fails(proc, status, message)
    assert not out.exists() and not list(tmp_path.glob("careen-*"))
    assert host_state() == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("verb", ["inspect", "refit", "verify"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some text\n" * 6 + b"1234567890", "only 100 bytes: too small"),
        (bytes(1 << 20), "no partition table and no filesystem that careen recognises"),
    ],
    ids=["100 bytes of text", "1 MiB of zeros"],
)
def test_a_file_that_is_no_disk_image(
    tmp_path: Path, verb: str, content: bytes, message: str
) -> None:
    image = tmp_path / "notes.txt"
    image.write_bytes(content)
    out = tmp_path / "out.qcow2"
    extra: list[str | Path] = ["-o", out] if verb == "refit" else []
    before = host_state()
    proc = careen(verb, image, *extra, tmpdir=tmp_path)
    assert_fails(proc, 1, message, "check the path.*disk image")
    assert image.read_bytes() == content
    assert not out.exists() and not list(tmp_path.glob("careen-*"))
    assert host_state() == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("verify", [[], ["--verify"]], ids=["", "--verify"])
def test_in_place_with_an_output(source: Path, tmp_path: Path, verify: list[str]) -> None:
    out = tmp_path / "out.qcow2"
    proc = careen("refit", source, "-o", out, "--in-place", *verify, tmpdir=tmp_path)
    assert_fails(proc, 2, "--in-place and -o exclude each other", "drop -o.*drop --in-place")
    assert not out.exists()


@pytest.mark.timeout(120)
def test_force_ntfs_without_ntfs_says_it_does_nothing(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    proc = careen("refit", source, "-o", out, "-r", "empty", "--force-ntfs", tmpdir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--force-ntfs has no effect" in proc.stderr and "holds no NTFS" in proc.stderr
    assert out.exists()


@pytest.mark.timeout(120)
def test_refit_without_output_is_a_usage_error(source: Path, tmp_path: Path) -> None:
    assert_fails(careen("refit", source, tmpdir=tmp_path), 2, "needs an output")


@pytest.mark.timeout(120)
def test_a_failing_guest_command_shows_its_output(source: Path, tmp_path: Path) -> None:
    script = "echo first-visible-line; seq 100; echo last-visible-line >&2; exit 3"
    proc = careen("refit", source, "-o", tmp_path / "out.qcow2", "--run", script, tmpdir=tmp_path)
    error, hint = error_lines(proc)
    assert proc.returncode == 1 and "exited 3" in error
    assert "last-visible-line" in proc.stderr and "shown above" in hint


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delay", [0.4, 0.9, 1.5, 2.5])
def test_ctrl_c_from_a_terminal(source: Path, tmp_path: Path, delay: float) -> None:
    """SIGINT to careen's whole process group, as a terminal sends it, at various points."""
    state = tmp_path / "state"
    env = {**careen_env(tmp_path), "CAREEN_STATE_DIR": str(state)}
    before = host_state()
    proc = subprocess.Popen(
        [
            str(CAREEN),
            "-q",
            "refit",
            str(source),
            "-o",
            str(tmp_path / "out.qcow2"),
            "-r",
            "reset-identity",
            "--run",
            "sleep 3",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    if proc.returncode == 130:
        assert not (tmp_path / "out.qcow2").exists()
    assert not list(tmp_path.glob("careen-*")) and not list(tmp_path.glob(".out*"))
    assert not list((state / "runs").glob("*.journal")) if (state / "runs").exists() else True
    time.sleep(0.5)  # the guest's processes die with their namespace
    assert host_state() == before
