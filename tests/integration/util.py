"""Helpers for the integration tests that run careen's CLI as a subprocess.

They run `careen` with a private $TMPDIR, check the one-line error and hint it prints,
take a snapshot of what a run must leave as it was on the host (loop devices, mounts,
work directories, outputs, the source's bytes), and make guest variants from the cached
samples without ever writing through a hard link into the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careen.samples import Layout, make_image, sample_image, sample_root

CAREEN = Path(sys.executable).with_name("careen")
if not CAREEN.exists():  # pragma: no cover - a venv always has it
    CAREEN = Path(shutil.which("careen") or "careen")

Arg = str | os.PathLike[str]


def sh(*argv: Arg, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a tool for a test (not careen); fail the test with its output if it fails."""
    done = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done


def careen_env(tmpdir: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmpdir), "COLUMNS": "200"}


def careen(
    *args: Arg,
    tmpdir: Path,
    timeout: float = 240,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the careen CLI with $TMPDIR set to `tmpdir` (and `env` added)."""
    return subprocess.run(
        [*prefix, str(CAREEN), *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**careen_env(tmpdir), **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def refit_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON a successful `careen refit --format json` printed."""
    assert proc.returncode == 0, f"careen failed ({proc.returncode}):\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def error_lines(
    proc: subprocess.CompletedProcess[str], *, need_hint: bool = True
) -> tuple[str, str]:
    """Check a failed run's stderr: one error line, one hint line, no traceback."""
    err = proc.stderr
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("careen: error: ")]
    hints = [line for line in err.splitlines() if line.startswith("careen: hint: ")]
    assert len(errors) == 1, f"expected one error line:\n{err}"
    assert len(hints) == 1 or (not need_hint and not hints), f"expected one hint line:\n{err}"
    hint = hints[0].removeprefix("careen: hint: ") if hints else ""
    return errors[0].removeprefix("careen: error: "), hint


def assert_fails(
    proc: subprocess.CompletedProcess[str], status: int, message: str, hint: str = ""
) -> str:
    """A clean failure: the exit status, and the error and hint matching the patterns."""
    assert proc.returncode == status, f"exit {proc.returncode}, not {status}:\n{proc.stderr}"
    error, got_hint = error_lines(proc)
    assert re.search(message, error, re.I), f"{message!r} not in {error!r}"
    assert re.search(hint, got_hint, re.I), f"{hint!r} not in hint {got_hint!r}"
    return error


_ZEROS = bytes(1 << 22)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes; holes of a sparse file are hashed without reading."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                data = size
            _hash_zeros(h, data - pos)
            hole = os.lseek(fd, data, os.SEEK_HOLE) if data < size else size
            os.lseek(fd, data, os.SEEK_SET)
            left = hole - data
            while left > 0:
                chunk = os.read(fd, min(left, len(_ZEROS)))
                assert chunk, f"{path} shrank while it was hashed"
                h.update(chunk)
                left -= len(chunk)
            pos = hole
    finally:
        os.close(fd)
    return h.hexdigest()


def _hash_zeros(h: hashlib._Hash, count: int) -> None:
    view = memoryview(_ZEROS)
    while count > 0:
        n = min(count, len(_ZEROS))
        h.update(view[:n])
        count -= n


# ---- what a run must leave as it was --------------------------------------------------


def _mountinfo() -> frozenset[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return frozenset(" ".join(line.split()[3:5]) for line in lines)


def _loops() -> frozenset[str]:
    out = sh("losetup", "-a", "-n", "-O", "NAME,BACK-FILE,OFFSET,SIZELIMIT").stdout
    return frozenset(" ".join(line.split()) for line in out.splitlines())


def _foreign(entry: str, ours: Path) -> bool:
    """Whether a table entry belongs to another process's temporary directory.

    Other test runs may attach loops and mount things under their own temporary
    directories meanwhile; those are not careen's doing. Everything else counts, so a
    mount on a host path such as /etc or a loop over one of this test's files fails.
    """
    tmp = os.path.realpath(tempfile.gettempdir())
    where = entry.split()[1]  # the mount point, or the loop's backing file
    return where.startswith(tmp + "/") and not where.startswith(str(ours))


@dataclass(frozen=True)
class HostTables:
    mounts: frozenset[str]
    loops: frozenset[str]

    @classmethod
    def take(cls) -> HostTables:
        return cls(_mountinfo(), _loops())

    def changes(self, ours: Path) -> list[str]:
        now = HostTables.take()
        diffs = []
        for what, before, after in (
            ("mount", self.mounts, now.mounts),
            ("loop", self.loops, now.loops),
        ):
            for entry in sorted(before ^ after):
                if not _foreign(entry, ours):
                    sign = "+" if entry in after else "-"
                    diffs.append(f"{what} {sign} {entry}")
        return diffs

    def assert_same(self, ours: Path, wait: float = 5.0) -> None:
        """The tables are as before, allowing the kernel a moment to autoclear loops."""
        deadline = time.monotonic() + wait
        while (diffs := self.changes(ours)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not diffs, "host tables changed:\n" + "\n".join(diffs)


def work_dirs(*directories: Path) -> list[Path]:
    found: list[Path] = []
    for d in directories:
        found += d.glob("careen-*")
    return found


def partial(output: Path) -> Path:
    return output.with_name(f".{output.name}.careen-partial")


@dataclass
class Guarded:
    """Everything a failed (or interrupted) run must leave as it was."""

    base: Path  # the test's own directory; outputs and $TMPDIR live under it
    tmpdir: Path
    sources: dict[Path, str]
    tables: HostTables

    @classmethod
    def before(cls, base: Path, tmpdir: Path, sources: Iterable[Path]) -> Guarded:
        return cls(base, tmpdir, {s: sha256(s) for s in sources if s.is_file()}, HostTables.take())

    def assert_released(self, output: Path | None) -> None:
        self.tables.assert_same(self.base)
        dirs = [self.tmpdir] + ([output.parent] if output else [])
        assert not work_dirs(*dirs), f"work directories left: {work_dirs(*dirs)}"
        for source, digest in self.sources.items():
            assert sha256(source) == digest, f"{source} changed"

    def assert_nothing_written(self, output: Path) -> None:
        self.assert_released(output)
        assert not output.exists(), f"{output} was written"
        assert not partial(output).exists(), f"{partial(output)} was left"


# ---- processes ------------------------------------------------------------------------


def processes_running(argv: Sequence[str]) -> list[int]:
    """PIDs of processes whose command line is exactly `argv`."""
    want = "\0".join(argv) + "\0"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline == want:
            pids.append(int(entry))
    return pids


def wait_for_process(argv: Sequence[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pids := processes_running(argv):
            return pids[0]
        time.sleep(0.1)
    raise AssertionError(f"no process {argv} within {timeout} s")


def kill_all(argv: Sequence[str]) -> None:
    """End leftovers of a failed test (processes this test started, by exact argv)."""
    for pid in processes_running(argv):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- images ---------------------------------------------------------------------------


def copy_sample(layout: Layout, dest: Path) -> Path:
    """A private, writable copy of a cached sample image (sparse)."""
    sh("cp", "--sparse=always", sample_image(layout), dest)
    return dest


def variant_root(dest: Path) -> Path:
    """A hard-linked copy of the sample root: unlink a file before changing it."""
    sh("cp", "-al", sample_root(), dest)
    return dest


def _fresh(root: Path, path: str) -> Path:
    """`path` inside `root`, with whatever was there removed (never written through)."""
    target = root / path.lstrip("/")
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # removes the links, never the cache's files
    else:
        target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def put_file(root: Path, path: str, data: str, mode: int = 0o644) -> None:
    target = _fresh(root, path)
    target.write_text(data)
    target.chmod(mode)


def put_symlink(root: Path, path: str, points_to: str) -> None:
    _fresh(root, path).symlink_to(points_to)


def put_fifo(root: Path, path: str) -> None:
    os.mkfifo(_fresh(root, path), 0o644)


def remove(root: Path, path: str) -> None:
    _fresh(root, path)


def bare_image(root: Path, dest: Path) -> Path:
    return make_image(root, Layout.BARE, dest)


def to_raw(image: Path, dest: Path) -> Path:
    sh("qemu-img", "convert", "-O", "raw", image, dest)
    return dest


def debugfs(raw: Path, request: str, *, write: bool = False) -> str:
    """Run one debugfs request on the ext4 in `raw` (a bare filesystem image)."""
    done = sh("debugfs", *(["-w"] if write else []), "-R", request, raw)
    return done.stdout


def ext4_cat(raw: Path, path: str) -> str:
    return debugfs(raw, f"cat {path}")


def ext4_symlink_target(raw: Path, path: str) -> str | None:
    """The target of the symlink at `path`, or None when it is not a symlink."""
    out = debugfs(raw, f"stat {path}")
    if "Type: symlink" not in out:
        return None
    match = re.search(r'Fast link dest: "(.*)"', out)
    assert match, out
    return match.group(1)


def start_paused(
    argv: Sequence[str], env: Mapping[str, str], marker: Path, *, timeout: float = 300
) -> subprocess.Popen[str]:
    """Start careen with `env` (which names a CAREEN_TEST_PAUSE stage and `marker` as its
    pause file) and return once it waits there."""
    proc = subprocess.Popen(
        [str(CAREEN), *argv],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"careen never reached {env.get('CAREEN_TEST_PAUSE')}"
        time.sleep(0.1)
    return proc
