"""`careen cleanup`: undo what dead runs left behind, as their journals describe it.

A journal whose flock nobody holds belongs to a dead run. Its resources that were
acquired and never released are undone newest first: a mount is unmounted, a loop
device still bound to the same file is detached, a daemon that is still the same
process (same PID and start time) is stopped, a device-mapper device or an nbd
connection is removed, a file or a work directory is deleted. After a reboot (another
boot ID) only files, directories and remote resources are left to undo. Live runs are
never touched; running cleanup twice, or beside a live run, is safe.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from careen import journal, linux, locks, run
from careen.errors import CareenError

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    path: Path
    header: dict[str, Any]
    outstanding: list[dict[str, Any]]  # acquired, not released, oldest first

    @property
    def run_id(self) -> str:
        return str(self.header.get("run", self.path.stem))

    @property
    def same_boot(self) -> bool:
        return self.header.get("boot_id") == journal.boot_id()


@dataclass
class Report:
    runs: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "runs": self.runs,
            "actions": self.actions,
            "failures": self.failures,
            "live": self.live,
        }


def read_journal(path: Path) -> RunRecord:
    header: dict[str, Any] = {}
    entries: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: the resource was not acquired yet
        op = entry.get("op")
        if op == "start":
            header = entry
        elif op == "acquire":
            entries[entry["id"]] = entry
        elif op == "update" and entry["id"] in entries:
            entries[entry["id"]].update({k: v for k, v in entry.items() if k not in ("op",)})
        elif op == "release":
            entries.pop(entry["id"], None)
    return RunRecord(path, header, sorted(entries.values(), key=lambda e: int(e["id"])))


def _host_mounts() -> set[str]:
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        out.add(line.split()[4].replace("\\040", " "))
    return out


def _release_mount(entry: dict[str, Any], same_boot: bool) -> str | None:
    if not same_boot:
        return None
    path = str(entry.get("path", ""))
    done = []
    if path in _host_mounts():
        try:
            linux.umount(path)
        except OSError:
            linux.umount(path, linux.MNT_DETACH)
        done.append(f"unmounted {path}")
    device = entry.get("device")
    if device and _loop_backs(str(device), str(entry.get("backing", ""))):
        run.run(["losetup", "-d", str(device)])
        done.append(f"detached {device}")
    return ", ".join(done) or None


def _loop_backs(device: str, backing: str) -> bool:
    name = Path(device).name
    try:
        current = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return False
    return bool(backing) and current == backing


def _release_daemon(entry: dict[str, Any], same_boot: bool) -> str | None:
    pid, start = entry.get("pid"), entry.get("start_time")
    if not same_boot or not pid or journal.process_start_time(int(pid)) != start:
        return None  # gone, or the PID now belongs to another process
    os.kill(int(pid), signal.SIGTERM)
    for _ in range(50):
        if journal.process_start_time(int(pid)) != start:
            return f"stopped {entry.get('argv0', 'process')} (pid {pid})"
        time.sleep(0.1)
    os.kill(int(pid), signal.SIGKILL)
    return f"killed {entry.get('argv0', 'process')} (pid {pid})"


def _release_file(entry: dict[str, Any], same_boot: bool) -> str | None:
    path = Path(str(entry.get("path", "")))
    if same_boot and str(path) in _host_mounts():
        linux.umount(str(path), linux.MNT_DETACH)  # a FUSE export whose daemon is gone
    if not path.exists() and not path.is_symlink():
        return None
    path.unlink()
    return f"removed {path}"


def _release_dir(entry: dict[str, Any], same_boot: bool) -> str | None:
    path = Path(str(entry.get("path", "")))
    if not path.is_dir():
        return None
    inside = [m for m in _host_mounts() if m == str(path) or m.startswith(f"{path}/")]
    if inside:
        raise OSError(f"{path} still has mounts under it: {', '.join(sorted(inside))}")
    shutil.rmtree(path)
    return f"removed {path}"


def _release_dm(entry: dict[str, Any], same_boot: bool) -> str | None:
    name = str(entry.get("name", ""))
    if not same_boot or not Path(f"/dev/mapper/{name}").exists():
        return None
    run.run(["dmsetup", "remove", name])
    return f"removed device-mapper device {name}"


def _release_nbd(entry: dict[str, Any], same_boot: bool) -> str | None:
    device = entry.get("device")
    if not same_boot or not device:
        return None
    pid_file = Path(f"/sys/block/{Path(str(device)).name}/pid")
    if not pid_file.exists():
        return None
    run.run(["qemu-nbd", "--disconnect", str(device)])
    return f"disconnected {device}"


def _release_glance_image(entry: dict[str, Any], same_boot: bool) -> str | None:
    from careen.glance.publish import release_journaled  # openstacksdk only when needed

    try:
        return release_journaled(entry, same_boot)
    except CareenError as e:
        raise OSError(e.message) from e


def _release_rbd_image(entry: dict[str, Any], same_boot: bool) -> str | None:
    from careen.ceph.images import release_journaled  # librados only when needed

    try:
        return release_journaled(entry, same_boot)
    except CareenError as e:
        raise OSError(e.message) from e


RELEASERS: dict[str, Callable[[dict[str, Any], bool], str | None]] = {
    "mount": _release_mount,
    "daemon": _release_daemon,
    "file": _release_file,
    "dir": _release_dir,
    "dm": _release_dm,
    "nbd": _release_nbd,
    "glance-image": _release_glance_image,
    "rbd-image": _release_rbd_image,
}


def _is_live(path: Path) -> bool:
    return locks.is_locked(path)


def _describe(entry: dict[str, Any]) -> str:
    what = entry.get("what") or entry.get("kind")
    where = entry.get("path") or entry.get("device") or entry.get("name") or entry.get("pid")
    return f"{what} {where}"


def cleanup(*, dry_run: bool = False, state: Path | None = None) -> Report:
    report = Report()
    runs = (state or journal.state_dir()) / "runs"
    try:
        journals = sorted(runs.glob("*.journal")) if runs.is_dir() else []
    except OSError as e:
        raise CareenError(
            f"cannot read careen's state directory {runs}: {e.strerror}",
            hint="run cleanup as the user who ran careen (root for the host backend)",
        ) from e
    for path in journals:
        if _is_live(path):
            report.live.append(path.stem)
            continue
        rec = read_journal(path)
        report.runs.append(rec.run_id)
        _undo(rec, report, dry_run)
    if not dry_run:
        _remove_stale_locks(state, report)
    return report


def _undo(rec: RunRecord, report: Report, dry_run: bool) -> None:
    failed = False
    for entry in reversed(rec.outstanding):
        kind = str(entry.get("kind"))
        if dry_run:
            report.actions.append(f"{rec.run_id}: would release {_describe(entry)}")
            continue
        release = RELEASERS.get(kind)
        if release is None:
            report.failures.append(f"{rec.run_id}: no way to release a {kind!r} record")
            failed = True
            continue
        try:
            done = release(entry, rec.same_boot)
        except (OSError, run.CommandError) as e:
            report.failures.append(f"{rec.run_id}: {_describe(entry)}: {e}")
            failed = True
            continue
        if done:
            report.actions.append(f"{rec.run_id}: {done}")
    if not dry_run and not failed:
        rec.path.unlink(missing_ok=True)


def _remove_stale_locks(state: Path | None, report: Report) -> None:
    lock_dir = (state or journal.state_dir()) / "locks"
    for path in sorted(lock_dir.glob("*.lock")) if lock_dir.is_dir() else []:
        if not locks.is_locked(path):
            path.unlink(missing_ok=True)
            report.actions.append(f"removed stale lock {path.name}")
