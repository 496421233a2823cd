"""The Guest interface, and its implementation over a guest root mounted on the host.

Every operation careen performs on a guest is written once against `Guest`. Paths are
always guest paths ("/etc/fstab"). `RootGuest` resolves each of them inside the mounted
root with `openat2(RESOLVE_IN_ROOT)`: a guest symlink such as `/etc/resolv.conf ->
/etc/shadow` or `-> ../../../../etc/hostname` resolves to the guest's own file, never to
the host's. Writes and deletes never follow a symlink in their last component; they
replace or remove the link itself.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Protocol

from careen import linux
from careen.errors import CareenError
from careen.guest import sandbox
from careen.interrupts import critical


class Guest(Protocol):
    """A guest's filesystem tree and a way to run its programs."""

    def read_bytes(self, path: str, limit: int = 16 << 20) -> bytes: ...
    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None: ...
    def lstat(self, path: str) -> os.stat_result | None: ...
    def readlink(self, path: str) -> str: ...
    def symlink(self, target: str, path: str) -> None: ...
    def chown(self, path: str, uid: int, gid: int) -> None: ...
    def delete(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def walk(self, path: str = "/") -> Iterator[tuple[str, str]]: ...
    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]: ...


def read_text(guest: Guest, path: str) -> str | None:
    """A guest file's text, or None when it does not exist."""
    try:
        return guest.read_bytes(path).decode(errors="replace")
    except FileNotFoundError:
        return None


def exists(guest: Guest, path: str) -> bool:
    return guest.lstat(path) is not None


def glob(guest: Guest, pattern: str) -> list[str]:
    """Expand wildcards in the last component of a guest path (sorted)."""
    parent, name = _split(pattern)
    if not any(c in name for c in "*?["):
        return [pattern] if exists(guest, pattern) else []
    try:
        names = guest.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [str(PurePosixPath(parent) / n) for n in sorted(names) if fnmatch.fnmatch(n, name)]


def _split(path: str) -> tuple[str, str]:
    p = PurePosixPath("/" + path.lstrip("/"))
    if p.name in ("", ".", ".."):
        raise CareenError(f"{path!r} does not name a file in the guest")
    return str(p.parent), p.name


class RootGuest:
    """A guest whose root filesystem tree is mounted at `root` on the host."""

    def __init__(self, root: Path, hostname: str = "localhost") -> None:
        self.root = root
        self.hostname = hostname
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """The guest directory holding `path`, resolved inside the root, and the name."""
        parent, name = _split(path)
        fd = linux.open_in_root(self._root_fd, parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def read_bytes(self, path: str, limit: int = 16 << 20) -> bytes:
        # O_NONBLOCK: a FIFO planted where careen reads must not hang it.
        fd = linux.open_in_root(self._root_fd, path, os.O_RDONLY | os.O_NONBLOCK)
        with linux.opened(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CareenError(f"the guest's {path} is not a regular file; refusing to read it")
            if st.st_size > limit:
                raise CareenError(f"the guest's {path} is larger than {limit} bytes")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a regular file; a symlink or special file in its place is replaced."""
        with self._parent(path) as (dfd, name):
            tmp = f".{name}.careen-tmp"
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd
            )
            try:
                with linux.opened(fd):
                    os.write(fd, data)
                    os.fchmod(fd, mode)
                    os.fsync(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            with self._parent(path) as (dfd, name):
                return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def readlink(self, path: str) -> str:
        with self._parent(path) as (dfd, name):
            return os.readlink(name, dir_fd=dfd)

    def symlink(self, target: str, path: str) -> None:
        with self._parent(path) as (dfd, name):
            os.symlink(target, name, dir_fd=dfd)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self._parent(path) as (dfd, name):
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)

    def delete(self, path: str) -> bool:
        """Remove a file, link or whole directory tree; False when it was not there."""
        try:
            with self._parent(path) as (dfd, name):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=dfd)  # symlink-safe with dir_fd
                else:
                    os.unlink(name, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        fd = linux.open_in_root(self._root_fd, path, os.O_RDONLY | os.O_DIRECTORY)
        with linux.opened(fd):
            return os.listdir(fd)

    def walk(self, path: str = "/") -> Iterator[tuple[str, str]]:
        """Yield (guest path, kind) for everything under `path`, not crossing symlinks.

        `kind` is "d" for directories, "l" for symlinks and "f" for everything else.
        """
        try:
            fd = linux.open_in_root(self._root_fd, path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return
            raise
        base = PurePosixPath("/" + path.lstrip("/"))
        found: list[tuple[str, str]] = []
        # Whole, and without Ctrl-C in the middle: an interrupted fwalk leaves directory
        # descriptors in the frames its exception keeps alive, and they keep the guest's
        # filesystem busy when careen unmounts it.
        with critical(), linux.opened(fd):
            for top, dirs, files, dfd in os.fwalk(".", dir_fd=fd):
                rel = base / top
                for name in dirs + files:
                    mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
                    kind = "l" if stat.S_ISLNK(mode) else "d" if stat.S_ISDIR(mode) else "f"
                    found.append((str(rel / name), kind))
        yield from found

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return sandbox.run_in_root(
            self.root, argv, hostname=self.hostname, env=env, timeout=timeout, check=check
        )
