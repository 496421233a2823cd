"""Fixtures for the appliance backend's tests: private copies, and the host's tables.

Every image these tests refit is a copy under the test's own directory, so the check
that the appliance left no loop device or mount on the host can look only at entries
naming that directory: other sessions on this machine attach their own meanwhile.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from integration.util import sh


def host_entries(ours: Path) -> set[str]:
    """Mounts and loop devices on the host that name anything under `ours`."""
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if str(ours) in line:
            found.add("mount " + " ".join(line.split()[3:5]))
    for line in sh("losetup", "-a", "-n", "-O", "NAME,BACK-FILE").stdout.splitlines():
        if str(ours) in line:
            found.add("loop " + re.sub(r"\s+", " ", line.strip()))
    return found


@contextmanager
def watching_host(ours: Path) -> Iterator[set[str]]:
    """Collect, while the block runs, host mounts and loops naming `ours` that were new."""
    already = host_entries(ours)
    seen: set[str] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.3):
            seen.update(host_entries(ours) - already)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()
        seen.update(host_entries(ours) - already)


def writable_by(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    path.chmod(0o700 if path.is_dir() else 0o600)
