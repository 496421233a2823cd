"""`careen cleanup` on hand-made journals: what it releases, and what it must leave."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from careen import journal, recover


@pytest.fixture
def state(tmp_path: Path) -> Path:
    (tmp_path / "state" / "runs").mkdir(parents=True)
    return tmp_path / "state"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def write_journal(state: Path, name: str, entries: list[dict[str, Any]], boot: str = "") -> Path:
    path = state / "runs" / f"{name}.journal"
    header = {"op": "start", "run": name, "pid": 1, "boot_id": boot or journal.boot_id()}
    lines = [json.dumps(header)] + [json.dumps(e) for e in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_files_and_dirs_of_a_dead_run_are_removed(state: Path, tmp_path: Path) -> None:
    work = tmp_path / "careen-work"
    work.mkdir()
    (work / "overlay.qcow2").write_bytes(b"x")
    partial = tmp_path / ".out.careen-partial"
    partial.write_bytes(b"y")
    released = tmp_path / "released"
    released.write_bytes(b"keep me")
    path = write_journal(
        state,
        "dead",
        [
            {"op": "acquire", "id": 1, "kind": "dir", "path": str(work)},
            {"op": "acquire", "id": 2, "kind": "file", "path": str(work / "overlay.qcow2")},
            {"op": "acquire", "id": 3, "kind": "file", "path": str(released)},
            {"op": "release", "id": 3},
            {"op": "acquire", "id": 4, "kind": "file", "path": str(partial)},
        ],
    )
    path.write_text(path.read_text() + '{"op": "acquire", "id": 5, "kin')  # torn by a crash
    dry = recover.cleanup(dry_run=True, state=state)
    assert len(dry.actions) == 3 and partial.exists() and work.exists()
    report = recover.cleanup(state=state)
    assert report.failures == []
    assert not work.exists() and not partial.exists()
    assert released.exists()
    assert not path.exists()
    assert recover.cleanup(state=state).actions == []  # a second run finds nothing


def test_daemon_is_stopped_only_if_it_is_still_the_same_process(
    state: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    start = journal.process_start_time(sleeper.pid)
    assert start is not None
    entry = {"op": "acquire", "id": 1, "kind": "daemon", "pid": sleeper.pid, "argv0": "sleep"}
    write_journal(state, "reused-pid", [{**entry, "start_time": start + 1}])
    write_journal(state, "other-boot", [{**entry, "start_time": start}], boot="another-boot")
    recover.cleanup(state=state)
    assert sleeper.poll() is None  # a PID reused by another process, or another boot
    write_journal(state, "same", [{**entry, "start_time": start}])
    report = recover.cleanup(state=state)
    assert sleeper.wait(timeout=10) is not None
    assert any("stopped sleep" in a for a in report.actions)


def test_a_live_run_is_left_alone(state: Path, tmp_path: Path) -> None:
    work = tmp_path / "live-work"
    work.mkdir()
    path = write_journal(
        state, "live", [{"op": "acquire", "id": 1, "kind": "dir", "path": str(work)}]
    )
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        report = recover.cleanup(state=state)
    finally:
        os.close(fd)
    assert report.live == ["live"] and work.exists() and path.exists()


def test_unknown_kind_is_reported_and_the_journal_kept(state: Path) -> None:
    path = write_journal(state, "future", [{"op": "acquire", "id": 1, "kind": "hologram"}])
    report = recover.cleanup(state=state)
    assert report.failures and "hologram" in report.failures[0]
    assert path.exists()


def test_run_journal_records_and_removes_itself(tmp_path: Path) -> None:
    with journal.run_journal(directory=tmp_path) as j:
        handle = journal.record("file", path="/nonexistent")
        assert journal.current_run_id() == j.run_id
        lines = [json.loads(x) for x in j.path.read_text().splitlines()]
        assert lines[0]["op"] == "start" and lines[0]["boot_id"] == journal.boot_id()
        assert lines[1]["kind"] == "file"
        handle.done()
    assert not j.path.exists()
    assert journal.current() is None
