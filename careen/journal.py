"""A crash-safe record of what a run has acquired, so a later `careen cleanup` can undo it.

Each run writes one journal, `STATE/runs/RUN_ID.journal`: JSON lines, appended and
fsync'd. The first line names the run (PID, its start time, the host's boot ID, the
command). Before a resource is acquired, an `acquire` line says what it will be; after
it is released, a `release` line names it again. A run that ends normally deletes its
journal. While the run lives it holds an exclusive `flock` on the journal, which the
kernel drops when the process dies, however it dies: that is how `cleanup` tells a
dead run from a live one.

Record kinds are open: each is a name plus JSON fields, and `careen.cleanup_runs` knows
how to release each kind. Local kinds (loop devices, mounts, daemons) die with a reboot;
files and remote resources (RBD images, Glance images) do not.

Code that acquires a resource calls `record(kind, **fields)` first and `done()` on the
handle after releasing it; with no journal active (library use without one) both do
nothing. The active journal lives in a
context variable, not a global, so nested and concurrent uses stay apart.
"""

from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from careen.errors import CareenError

log = logging.getLogger(__name__)

_current: contextvars.ContextVar[Journal | None] = contextvars.ContextVar(
    "careen_journal", default=None
)

# Kinds that do not survive a reboot of the host.
LOCAL_KINDS = frozenset({"loop", "mount", "daemon", "process"})


def state_dir() -> Path:
    """Where journals and locks live: $CAREEN_STATE_DIR, else /var/lib/careen as root."""
    env = os.environ.get("CAREEN_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/careen")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(base) / "careen"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields follow the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None  # exited; only its exit status is left for its parent to collect
    return int(fields[19])


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class Journal:
    path: Path
    run_id: str
    _fd: int = -1
    _next: int = 1
    _open: dict[int, dict[str, Any]] = field(default_factory=dict)

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        os.write(self._fd, line)
        os.fsync(self._fd)

    def acquire(self, kind: str, **fields: Any) -> int:
        rid = self._next
        self._next += 1
        entry = {"op": "acquire", "id": rid, "kind": kind, **fields}
        self._open[rid] = entry
        self._append(entry)
        return rid

    def update(self, rid: int, **fields: Any) -> None:
        """Add what became known once the resource exists (a loop device's name, a PID)."""
        self._open[rid].update(fields)
        self._append({"op": "update", "id": rid, **fields})

    def release(self, rid: int) -> None:
        self._open.pop(rid, None)
        self._append({"op": "release", "id": rid})

    @property
    def outstanding(self) -> list[dict[str, Any]]:
        return list(self._open.values())


@contextmanager
def run_journal(run_id: str | None = None, directory: Path | None = None) -> Iterator[Journal]:
    """Open this run's journal, make it current, and delete it when the run ends cleanly.

    If something is still outstanding at the end (a release failed), the journal stays
    for `careen cleanup`.
    """
    runs = (directory or state_dir()) / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise CareenError(
            f"cannot create careen's state directory {runs}: {e.strerror}",
            hint="run as root, or point CAREEN_STATE_DIR at a writable directory",
        ) from e
    rid = run_id or new_run_id()
    path = runs / f"{rid}.journal"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    journal = Journal(path, rid, fd)
    journal._append(
        {
            "op": "start",
            "run": rid,
            "pid": os.getpid(),
            "start_time": process_start_time(os.getpid()),
            "boot_id": boot_id(),
            "argv": sys.argv,
            "time": time.time(),
        }
    )
    _fsync_dir(runs)
    token = _current.set(journal)
    try:
        yield journal
    finally:
        _current.reset(token)
        if not journal.outstanding:
            path.unlink(missing_ok=True)
            _fsync_dir(runs)
        else:
            log.error("journal %s keeps %d unreleased resources", path, len(journal.outstanding))
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current() -> Journal | None:
    return _current.get()


def current_run_id() -> str | None:
    j = _current.get()
    return j.run_id if j else None


class Handle:
    """One journaled resource: `note()` what becomes known, `done()` once released."""

    def __init__(self, journal: Journal | None, rid: int | None) -> None:
        self._journal = journal
        self._rid = rid

    def note(self, **fields: Any) -> None:
        if self._journal is not None and self._rid is not None:
            self._journal.update(self._rid, **fields)

    def done(self) -> None:
        if self._journal is not None and self._rid is not None:
            self._journal.release(self._rid)
            self._rid = None


def record(kind: str, **fields: Any) -> Handle:
    """Journal a resource about to be acquired; call `done()` on the handle once released.

    A resource whose release never ran (careen was killed) or failed stays in the journal
    for `careen cleanup`. Without an active journal this costs nothing.
    """
    journal = _current.get()
    if journal is None:
        return Handle(None, None)
    return Handle(journal, journal.acquire(kind, **fields))


def checkpoint(stage: str) -> None:
    """A named point in a run where fault-injection tests may stop careen.

    With CAREEN_TEST_PAUSE=STAGE in the environment, careen writes its PID to
    $CAREEN_TEST_PAUSE_FILE when it reaches that stage and then waits there until a
    signal ends it, or, with CAREEN_TEST_RESUME=1, until the test removes that file.
    Without the variable this does nothing.
    """
    if os.environ.get("CAREEN_TEST_PAUSE") != stage:
        return
    marker = os.environ.get("CAREEN_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(f"{os.getpid()}\n")
    log.warning("paused at stage %s for a test", stage)
    resume = marker is not None and os.environ.get("CAREEN_TEST_RESUME") == "1"
    while not resume or Path(str(marker)).exists():
        time.sleep(0.1 if resume else 3600)
    log.warning("resumed at stage %s", stage)
