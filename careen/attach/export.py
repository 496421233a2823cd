"""Give any image a raw view that loop devices can use, without touching the source.

- `overlay()` creates a qcow2 copy-on-write overlay over the source, with the source's
  format recorded explicitly (`-F`), so qemu never probes it again. All writes land in
  the overlay; the source is opened read-only.
- `raw_view()` exposes an image as a plain raw file: the file itself when it is raw,
  a qemu-nbd block device where the host has nbd (`careen.attach.nbd`), otherwise a
  qemu-storage-daemon FUSE export.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from careen import journal, run
from careen.attach import nbd
from careen.errors import CareenError
from careen.image.model import ImageFormat, ImageInfo
from careen.interrupts import critical
from careen.log import step

log = logging.getLogger(__name__)

_EXPORT_TIMEOUT = 20.0


@contextmanager
def overlay(source: ImageInfo, path: Path) -> Iterator[Path]:
    """A qcow2 overlay over `source` at `path`, removed afterwards."""
    # Absolute, not resolved: an export seen through /proc/PID/root must stay there
    # (resolving it would name the empty mount point in this namespace).
    backing = Path(os.path.abspath(source.path))
    argv: list[run.Arg] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    argv += ["-o", f"backing_file={backing},backing_fmt={source.format.value}"]
    argv += ["-o", "lazy_refcounts=on", path]
    handle = journal.record("file", path=str(path), what="overlay")
    try:
        with step(f"Creating a copy-on-write overlay over {source.path.name}"):
            run.run(argv)
        yield path
    finally:
        path.unlink(missing_ok=True)
        handle.done()


def qsd_argv(image: Path, fmt: ImageFormat, mountpoint: Path, *, writable: bool) -> list[str]:
    """The qemu-storage-daemon command that exports `image` as raw at `mountpoint`."""
    ro = not writable
    file_node = {
        "driver": "file",
        "node-name": "file0",
        "filename": str(image),
        "read-only": ro,
        "discard": "unmap",
    }
    fmt_node = {
        "driver": fmt.value,
        "node-name": "disk0",
        "file": "file0",
        "read-only": ro,
        "discard": "unmap",
    }
    return qsd_export_argv([file_node, fmt_node], mountpoint, writable=writable)


def qsd_export_argv(
    nodes: Sequence[Mapping[str, object]],
    mountpoint: Path,
    *,
    writable: bool,
    objects: Sequence[str] = (),
) -> list[str]:
    """qemu-storage-daemon with `nodes` (the last one, named disk0, exported) and `objects`."""
    export = f"type=fuse,id=exp0,node-name=disk0,mountpoint={mountpoint}"
    export += f",writable={'on' if writable else 'off'}"
    argv = ["qemu-storage-daemon"]
    for obj in objects:
        argv += ["--object", obj]
    for node in nodes:
        argv += ["--blockdev", json.dumps(node)]
    return [*argv, "--export", export]


def _is_mounted(path: Path) -> bool:
    return os.stat(path).st_dev != os.stat(path.parent).st_dev


@contextmanager
def raw_view(image: Path, fmt: ImageFormat, workdir: Path, *, writable: bool) -> Iterator[Path]:
    """`image` as a raw file for as long as the context lasts."""
    if fmt is ImageFormat.RAW:
        yield image
        return
    if nbd.nbd_usable():
        handle = journal.record("nbd", image=str(image))
        try:
            with nbd.nbd_view(image, fmt, writable=writable) as device:
                handle.note(device=str(device))
                yield device
        finally:
            handle.done()
        return
    mountpoint = workdir / "export.raw"
    argv = qsd_argv(image, fmt, mountpoint, writable=writable)
    with fuse_export(argv, image.name, mountpoint) as view:
        yield view


@contextmanager
def fuse_export(qsd: list[str], label: str, mountpoint: Path) -> Iterator[Path]:
    """Run the qemu-storage-daemon command `qsd`, whose FUSE export is at `mountpoint`
    (created here), and yield the export as a raw file."""
    file_handle = journal.record("file", path=str(mountpoint), what="FUSE export mount point")
    mountpoint.touch()  # a FUSE export's mount point must be an existing regular file
    try:
        with _export_daemon(qsd, label, mountpoint) as view:
            journal.checkpoint("exported")
            yield view
    finally:
        mountpoint.unlink(missing_ok=True)
        file_handle.done()


def daemon_argv(qsd: list[str]) -> list[str]:
    """qemu-storage-daemon in a mount namespace of its own.

    Its FUSE mount must not live in the namespace that holds the guest's filesystems: if
    careen is killed, the last process to leave that namespace unmounts them, and the
    final sync goes through the loop devices to this very export. Were the daemon that
    last process, it would wait on itself forever (seen: a D-state thread, every
    `losetup` on the host hanging behind it). In a namespace of its own, its death
    aborts the FUSE connection, and the guest's unmount fails fast instead.
    """
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        *qsd,
    ]


@contextmanager
def _export_daemon(qsd: list[str], label: str, mountpoint: Path) -> Iterator[Path]:
    """Start the daemon and yield the export as seen from inside its namespace."""
    argv = daemon_argv(qsd)
    handle = journal.record("daemon", argv0="qemu-storage-daemon", mountpoint=str(mountpoint))
    with step(f"Exporting {label} as raw through qemu-storage-daemon"):
        with critical():  # journaled before Ctrl-C can strike
            daemon = run.spawn(argv)  # unshare execs the daemon: same PID, same death signal
            handle.note(pid=daemon.pid, start_time=journal.process_start_time(daemon.pid))
        view = Path(f"/proc/{daemon.pid}/root") / mountpoint.relative_to("/")
        try:
            _wait_for_export(daemon, view)
        except BaseException:
            daemon.stop()
            handle.done()
            raise
    try:
        yield view
    finally:
        daemon.stop()
        handle.done()


def _wait_for_export(daemon: run.Daemon, view: Path) -> None:
    deadline = time.monotonic() + _EXPORT_TIMEOUT
    while True:
        daemon.check_alive()
        try:
            if _is_mounted(view):
                return
        except FileNotFoundError:
            pass  # the daemon has not entered its namespace yet
        if time.monotonic() > deadline:
            raise CareenError(
                f"qemu-storage-daemon did not export the image within {_EXPORT_TIMEOUT:.0f} s",
                hint="check that FUSE works here (/dev/fuse, the fuse3 package)",
            )
        time.sleep(0.02)
