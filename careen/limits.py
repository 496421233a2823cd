"""Limits that the refits of one fleet share on one host.

`careen fleet run --limit downloads=2 --limit glance-rate=5 ...` gives every refit it
starts `CAREEN_LIMITS` (`downloads=2,glance-rate=5`) and `CAREEN_LIMITS_DIR` (a
directory beside the plan). A counted kind (`downloads`, `appliances`, `rbd-copies`)
is a set of N slot files there: a refit holds one with `flock` for as long as it
downloads, runs an appliance or copies in RBD, and waits for one when all are held. The
kernel drops a dead holder's lock, so a killed refit never keeps a slot. `glance-rate`
is requests per second towards Glance, across the refits: each request takes its turn
from a time stamp kept in a locked file. Without the variables nothing is limited.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from careen.errors import UsageError

log = logging.getLogger(__name__)

COUNTED = ("downloads", "appliances", "rbd-copies")
RATE = "glance-rate"
KINDS = (*COUNTED, RATE)
POLL = 0.2  # seconds between tries for a free slot


def parse(texts: list[str]) -> dict[str, float]:
    """`KIND=N` options, checked."""
    out: dict[str, float] = {}
    for text in texts:
        kind, sep, value = text.partition("=")
        try:
            number = float(value) if kind == RATE else int(value)
        except ValueError:
            number = 0
        if not sep or kind not in KINDS or number <= 0:
            raise UsageError(
                f"cannot read the limit {text!r}",
                hint=f"write KIND=N with N > 0; kinds: {', '.join(KINDS)} (requests per second)",
            )
        out[kind] = number
    return out


def as_env(limits: dict[str, float], directory: Path) -> dict[str, str]:
    if not limits:
        return {}
    text = ",".join(f"{k}={v:g}" for k, v in sorted(limits.items()))
    return {"CAREEN_LIMITS": text, "CAREEN_LIMITS_DIR": str(directory)}


def _current() -> tuple[dict[str, float], Path] | None:
    text = os.environ.get("CAREEN_LIMITS")
    directory = os.environ.get("CAREEN_LIMITS_DIR")
    if not text or not directory:
        return None
    return parse(text.split(",")), Path(directory)


@contextmanager
def slot(kind: str) -> Iterator[None]:
    """Hold one of the `kind` slots for the block (no-op when `kind` is not limited)."""
    assert kind in COUNTED
    current = _current()
    if current is None or kind not in current[0]:
        yield
        return
    limits, directory = current
    directory.mkdir(parents=True, exist_ok=True)
    count = int(limits[kind])
    fds = [
        os.open(directory / f"{kind}.{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for i in range(count)
    ]
    held = None
    try:
        waited = False
        while held is None:
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held = fd
                break
            else:
                if not waited:
                    log.info("Waiting for one of the %d %s slots of this fleet", count, kind)
                    waited = True
                time.sleep(POLL)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing the held one drops its lock


def pace() -> None:
    """Wait for this request's turn under `glance-rate` (no-op when not limited)."""
    current = _current()
    if current is None or RATE not in current[0]:
        return
    limits, directory = current
    interval = 1.0 / limits[RATE]
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / RATE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 8, 0)
        last = struct.unpack("d", raw)[0] if len(raw) == 8 else 0.0
        now = time.time()
        turn = max(now, last + interval)
        if turn > now:
            time.sleep(turn - now)
        os.pwrite(fd, struct.pack("d", turn), 0)
    finally:
        os.close(fd)
