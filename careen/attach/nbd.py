"""Give a non-raw image a raw view through the kernel's network block device.

Where the host has the nbd module, `qemu-nbd --connect` is the quickest raw view of a qcow2
(or any format qemu reads): a real block device, with no FUSE in the data path. Hosts
without the module use the qemu-storage-daemon FUSE export in `careen.attach.export`.

`qemu-nbd --connect` daemonizes and returns, so the device and its server outlive careen if
careen is killed (`/sys/block/nbdN/pid` names the server, for a cleanup to find). On a
normal exit careen flushes the device, disconnects it, and waits for the qemu-nbd server to
end, so that the image is complete and unlocked before anything else (qemu-img convert, an
upload) opens it.

Where the nbd module's `max_part` is above 0 the kernel would scan the guest's partition
table on the device, and the host's udev could autoactivate a guest VG it finds there
(the VG name clash), so careen uses nbd only where `max_part` is 0 and otherwise falls
back to the FUSE export.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from careen import run
from careen.errors import CareenError
from careen.image.model import ImageFormat
from careen.log import step

log = logging.getLogger(__name__)

# Module attributes so that tests can point them at a fake sysfs and /dev.
SYS_BLOCK = Path("/sys/block")
SYS_MODULE = Path("/sys/module/nbd")
DEV = Path("/dev")

_CONNECT_ATTEMPTS = 3
_READY_TIMEOUT = 20.0
_EXIT_TIMEOUT = 60.0
_MODPROBE_HINT = "load the nbd module with more devices (modprobe nbd nbds_max=32)"


def nbd_available() -> bool:
    """Whether the nbd driver is here (loaded, or its nodes made) and qemu-nbd installed."""
    has_driver = SYS_MODULE.exists() or (DEV / "nbd0").exists()
    return has_driver and run.have("qemu-nbd")


def nbd_usable() -> bool:
    """nbd is here and will not expose the guest's partitions to the host's udev."""
    if not nbd_available():
        return False
    try:
        max_part = int((SYS_MODULE / "parameters/max_part").read_text().strip() or "0")
    except (OSError, ValueError):
        max_part = 0
    if max_part > 0:
        log.debug("nbd has max_part=%d; using the FUSE export instead", max_part)
    return max_part == 0


def free_nbd_device() -> str:
    """The first `/dev/nbdN` that nothing is connected to."""
    for name in _nbd_names():
        block = SYS_BLOCK / name
        try:
            size = int((block / "size").read_text().strip() or "0")
        except (OSError, ValueError):
            continue
        # A device being set up has a pid before it has a size; both must be clear.
        if size == 0 and not (block / "pid").exists():
            return str(DEV / name)
    raise CareenError("no free nbd device on this host", _MODPROBE_HINT)


def _nbd_names() -> list[str]:
    try:
        names = [p.name for p in SYS_BLOCK.iterdir() if re.fullmatch(r"nbd\d+", p.name)]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda n: int(n[3:]))


def connect_argv(image: Path, fmt: ImageFormat, device: str, *, writable: bool) -> list[str]:
    """The qemu-nbd command that attaches `image` to `device` as a raw disk."""
    argv = ["qemu-nbd", "--connect", device, "--format", fmt.value]
    if not writable:
        argv.append("--read-only")
    # writeback: the kernel sends flushes when it needs them (sync, umount), so qemu need
    # not write through on every request.
    return [*argv, "--discard=unmap", "--cache=writeback", str(image)]


@contextmanager
def nbd_view(image: Path, fmt: ImageFormat, *, writable: bool) -> Iterator[Path]:
    """`image` as a raw block device (`/dev/nbdN`) for as long as the context lasts."""
    with step(f"Attaching {image.name} to a network block device"):
        device = _connect(image, fmt, writable=writable)
        try:
            _wait_until_ready(device)
        except BaseException:
            _disconnect_logged(device)
            raise
    try:
        yield Path(device)
    except BaseException:
        _disconnect_logged(device)
        raise
    disconnect(device)


def _connect(image: Path, fmt: ImageFormat, *, writable: bool) -> str:
    # Another process may take the device between looking and connecting; qemu-nbd then
    # fails with "Device or resource busy" and the next free device is tried.
    attempt = 1
    while True:
        device = free_nbd_device()
        try:
            run.run(connect_argv(image, fmt, device, writable=writable), timeout=60)
            return device
        except run.CommandError as e:
            if "busy" not in e.stderr.lower() or attempt == _CONNECT_ATTEMPTS:
                raise
        log.debug("%s was taken meanwhile; trying another device", device)
        attempt += 1


def _sys(device: str) -> Path:
    return SYS_BLOCK / Path(device).name


def _wait_until_ready(device: str) -> None:
    # qemu-nbd may return before the kernel has learned the export's size; a device of
    # size 0 reads as empty and would look like a disk without partitions.
    size_file = _sys(device) / "size"
    deadline = time.monotonic() + _READY_TIMEOUT
    while int(size_file.read_text().strip() or "0") == 0:
        if time.monotonic() > deadline:
            raise CareenError(
                f"{device} did not come up within {_READY_TIMEOUT:.0f} s after qemu-nbd connected",
                "see dmesg for nbd errors",
            )
        time.sleep(0.05)


def _server_pid(device: str) -> int | None:
    """The process id of the qemu-nbd server behind `device`, when the kernel says."""
    try:
        # This names the thread that serves the device; its thread group is the server.
        tid = int((_sys(device) / "pid").read_text().strip())
        status = Path(f"/proc/{tid}/status").read_text()
    except (OSError, ValueError):
        return None
    found = re.search(r"^Tgid:\s*(\d+)", status, re.MULTILINE)
    return int(found.group(1)) if found else tid


def disconnect(device: str) -> None:
    """Flush and disconnect `device`, and wait until its qemu-nbd server has ended."""
    pid = _server_pid(device)
    try:
        _flush(device)
        flush_error = None
    except OSError as e:
        flush_error = e  # still disconnect: a device left behind helps nobody
    run.run(["qemu-nbd", "--disconnect", device], timeout=60)
    if pid is not None:
        _wait_for_exit(pid, device)
    if flush_error is not None:
        raise CareenError(
            f"could not flush {device} before disconnecting it: {flush_error.strerror}",
            "writes to the image may be lost; check it before using it",
        )


def _flush(device: str) -> None:
    # Writes that went to the device node (not through a filesystem) may still sit in the
    # page cache; a disconnect would drop them.
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO):  # no node, or never came up: nothing to flush
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _wait_for_exit(pid: int, device: str) -> None:
    deadline = time.monotonic() + _EXIT_TIMEOUT
    while _alive(pid):
        if time.monotonic() > deadline:
            raise CareenError(
                f"the qemu-nbd server of {device} (pid {pid}) is still running "
                f"{_EXIT_TIMEOUT:.0f} s after the disconnect",
                "the image may be incomplete; stop that process and check the image",
            )
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    # The server was reparented when qemu-nbd daemonized; a zombie that nobody has reaped
    # yet has finished all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state not in (["Z"], ["X"])


def _disconnect_logged(device: str) -> None:
    """Disconnect while another error unwinds: report a failure without replacing it."""
    try:
        disconnect(device)
    except Exception as e:
        log.error("could not disconnect %s: %s", device, e)
