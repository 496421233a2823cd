"""Thin ctypes wrappers for the Linux calls careen needs and Python lacks.

`openat2(RESOLVE_IN_ROOT)` resolves a guest path the way the guest would, so that no
symlink inside an untrusted image can lead outside its root; `mount(2)` then mounts on
the resolved descriptor instead of on a path string that `mount(8)` would resolve again.
Loop devices are configured with `LOOP_CONFIGURE` so that they carry the autoclear flag
(`losetup` cannot set it): the kernel detaches them by itself once the filesystem on
them is unmounted, even when careen was killed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)

_SYS_OPENAT2 = 437  # x86_64 and aarch64 share this number
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

CLONE_NEWNS = 0x00020000

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
_LOOP_CONFIG = struct.Struct("<II" + "QQQQQIIII64s64s32sQQ" + "8Q")


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """Open `path` relative to `dir_fd` with the given RESOLVE_* flags; returns an fd."""
    how = struct.pack("<QQQ", flags | os.O_CLOEXEC, mode, resolve)
    buf = ctypes.create_string_buffer(how)
    fd = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        buf,
        ctypes.c_size_t(len(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def open_in_root(root_fd: int, path: str, flags: int = os.O_PATH, mode: int = 0) -> int:
    """Open a guest path as the guest would see it: `..` and symlinks stay inside root."""
    rel = path.lstrip("/") or "."
    return openat2(root_fd, rel, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, mode)


def fd_path(fd: int) -> str:
    """A path naming exactly the object behind `fd`, for calls that take only paths."""
    return f"/proc/self/fd/{fd}"


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    res = _libc.mount(
        os.fsencode(source) if source else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype else None,
        ctypes.c_ulong(flags),
        os.fsencode(data) if data else None,
    )
    _check(res, f"mount {source} ({fstype or 'bind'}) on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


def syncfs(fd: int) -> None:
    """Flush the filesystem holding `fd`; raises if any writeback to it failed."""
    _check(_libc.syncfs(ctypes.c_int(fd)), "syncfs")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def enter_private_mount_namespace() -> bool:
    """Move this process into a mount namespace of its own, private to the host.

    Everything careen mounts afterwards is invisible to the host and disappears with the
    last process in the namespace, even after SIGKILL. Returns False where the kernel or
    the privileges do not allow it (careen then mounts in the host's namespace and
    unmounts everything itself).
    """
    try:
        unshare(CLONE_NEWNS)
        mount("", "/", None, MS_REC | MS_PRIVATE)
    except OSError:
        return False
    return True


PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent exits (a fleet's
    worker whose coordinator was killed rolls back instead of publishing unobserved)."""
    parent = os.getppid()
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0), "prctl")
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)


@contextmanager
def loop_device(backing: Path, offset: int, size: int, *, read_only: bool) -> Iterator[str]:
    """Attach `size` bytes of `backing` at `offset` to a free loop device, yield its path.

    The device carries autoclear, and careen holds it open only inside the `with` block:
    mount it there. Afterwards the mount keeps it; once that mount is gone (or if nothing
    mounted it) the kernel detaches the device by itself, even when careen was killed.
    """
    flags = _LO_FLAGS_AUTOCLEAR | (_LO_FLAGS_READ_ONLY if read_only else 0)
    file_fd = os.open(backing, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        device, dev_fd = _configure_free_loop(file_fd, offset, size, flags)
    finally:
        os.close(file_fd)
    try:
        yield device
    finally:
        os.close(dev_fd)


def _configure_free_loop(file_fd: int, offset: int, size: int, flags: int) -> tuple[str, int]:
    config = _LOOP_CONFIG.pack(
        file_fd, 0, 0, 0, 0, offset, size, 0, 0, 0, flags, b"", b"", b"", 0, 0, *([0] * 8)
    )
    for _ in range(100):
        with open("/dev/loop-control", "rb", buffering=0) as ctl:
            number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
        device = f"/dev/loop{number}"
        try:
            dev_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            time.sleep(0.05)  # the node has not appeared yet
            continue
        try:
            fcntl.ioctl(dev_fd, _LOOP_CONFIGURE, config)
        except OSError as e:
            os.close(dev_fd)
            if e.errno == errno.EBUSY:  # another process took it between the two calls
                continue
            raise
        return device, dev_fd
    raise OSError(errno.EBUSY, "no free loop device")


@contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def filesystems_supported() -> set[str]:
    """Filesystem types the running kernel can mount now (no module loading here)."""
    out = set()
    for line in Path("/proc/filesystems").read_text().splitlines():
        out.add(line.split()[-1])
    return out
