"""What a guest needs around a run of its own programs, put back exactly afterwards.

- A working resolver: the guest's `/etc/resolv.conf` is often a symlink into `/run`,
  which is empty offline. careen puts a working resolver configuration there (the
  host's, or the appliance's) as a plain file for the run, then restores the original:
  a symlink stays the same symlink, a file keeps its bytes, mode and owner, a missing
  file is missing again.
- No service starts: on Debian-family guests a `policy-rc.d` that denies every start
  (a guest's own one is put back afterwards); elsewhere the sandbox has no init system
  for `systemctl` to talk to, and `SYSTEMD_OFFLINE=1` says so.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from careen.guest.base import Guest

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
POLICY_DENY_ALL = b"#!/bin/sh\n# careen: no service starts while the image is refitted\nexit 101\n"
_FALLBACK_RESOLVER = b"nameserver 127.0.0.53\n"


@dataclass(frozen=True)
class Saved:
    """A guest path's state, enough to put it back exactly."""

    path: str
    kind: str  # "missing", "symlink", "file"
    target: str = ""
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def save(guest: Guest, path: str) -> Saved:
    st = guest.lstat(path)
    if st is None:
        return Saved(path, "missing")
    if stat.S_ISLNK(st.st_mode):
        return Saved(path, "symlink", target=guest.readlink(path))
    if stat.S_ISREG(st.st_mode):
        data = guest.read_bytes(path)
        return Saved(
            path, "file", data=data, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid
        )
    raise OSError(f"the guest's {path} is neither a file nor a symlink; refusing to replace it")


def restore(guest: Guest, saved: Saved) -> None:
    guest.delete(saved.path)
    if saved.kind == "symlink":
        guest.symlink(saved.target, saved.path)
    elif saved.kind == "file":
        guest.write_bytes(saved.path, saved.data, saved.mode)
        guest.chown(saved.path, saved.uid, saved.gid)


@contextmanager
def replaced(guest: Guest, path: str, data: bytes, mode: int) -> Iterator[Saved]:
    """`path` holds `data` inside the block and its original state afterwards."""
    saved = save(guest, path)
    try:
        guest.write_bytes(path, data, mode)
        yield saved
    finally:
        restore(guest, saved)


def host_resolver() -> bytes:
    try:
        data = Path("/etc/resolv.conf").read_bytes()
    except OSError:
        return _FALLBACK_RESOLVER
    return data if b"nameserver" in data else _FALLBACK_RESOLVER


@contextmanager
def prepared(guest: Guest, debian_family: bool, resolver: bytes | None = None) -> Iterator[None]:
    """The guest ready to run package tools: resolver in place, services forbidden.

    `resolver` is the resolver file for the run; the host's by default, since the
    host backend shares the host's network, while an appliance has its own.
    """
    with replaced(guest, RESOLV_CONF, resolver or host_resolver(), 0o644):
        if not debian_family or guest.lstat(os.path.dirname(POLICY_RC_D)) is None:
            yield
            return
        with replaced(guest, POLICY_RC_D, POLICY_DENY_ALL, 0o755):
            yield
