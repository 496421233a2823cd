"""Kernel file locks that keep two runs off the same source image or output path.

A lock is `flock(LOCK_EX | LOCK_NB)` on a file under STATE/locks, named after what it
guards: the source's device and inode (so two names for one file still collide) or the
output's absolute path. The kernel drops the lock when its holder dies, however it
dies, so a dead run never keeps anyone out. The file holds the holder's run ID and
command, which the refusal quotes. It is removed while still held, on release; a
waiter that then finds the name pointing at another file tries again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from careen import journal
from careen.errors import CareenError


def _lock_dir() -> Path:
    path = journal.state_dir() / "locks"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def source_key(path: Path) -> str:
    st = path.stat()
    return f"source-{st.st_dev}-{st.st_ino}"


def output_key(path: Path) -> str:
    digest = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:16]
    return f"output-{digest}"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another careen run"
    return (
        f"careen run {info.get('run', '?')} (pid {info.get('pid', '?')}: "
        f"{' '.join(info.get('argv', []))})"
    )


@contextmanager
def hold(key: str, what: str) -> Iterator[Path]:
    """Hold the lock named `key` for the block, or refuse naming the run that holds it."""
    path = _lock_dir() / f"{key}.lock"
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            os.close(fd)
            raise CareenError(
                f"{what} is in use by {holder}",
                hint="wait for that run to finish; a run that died holds no lock",
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # removed by its last holder between our open and our lock
    else:
        raise CareenError(f"could not take the lock for {what}")
    info = {"run": journal.current_run_id(), "pid": os.getpid(), "argv": sys.argv, "what": what}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


@contextmanager
def hold_for_refit(source: Path, output: Path | None) -> Iterator[None]:
    with ExitStack() as stack:
        stack.enter_context(hold(source_key(source), f"the source image {source}"))
        if output is not None:
            stack.enter_context(hold(output_key(output), f"the output {output}"))
        yield


def is_locked(path: Path) -> bool:
    """Whether some live process holds the lock file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
