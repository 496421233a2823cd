"""A connection to a Ceph cluster, with timeouts, and the few RBD calls careen makes.

The cluster is found as the `rbd` command finds it: `--ceph-conf` (else `CEPH_CONF`,
else /etc/ceph/ceph.conf), the client `--ceph-user` (default `admin`, as for `rbd`) and
its `--keyring` (else what the configuration says). librados waits five minutes to
connect and forever for an OSD by default; careen sets connect, monitor and OSD
timeouts so that a sick cluster is an error, not a hang.

A configuration that asks for shorter timeouts keeps them. The key itself reaches qemu
only through a secret file (careen.ceph.export), never on a command line.
"""

from __future__ import annotations

import configparser
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careen.errors import CareenError

log = logging.getLogger(__name__)

DEFAULT_CONF = Path("/etc/ceph/ceph.conf")
CONNECT_TIMEOUT = 30  # seconds
MON_OP_TIMEOUT = 30
OSD_OP_TIMEOUT = 120
TIMEOUTS = ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout")


@dataclass(frozen=True)
class CephAccess:
    """How to reach the cluster: what the user gave, or the defaults."""

    conf: Path
    user: str = "admin"  # without the "client." prefix
    keyring: Path | None = None

    @classmethod
    def from_options(cls, conf: Path | None, user: str | None, keyring: Path | None) -> CephAccess:
        path = conf or Path(os.environ.get("CEPH_CONF") or DEFAULT_CONF)
        if not path.is_file():
            raise CareenError(
                f"no Ceph configuration at {path}",
                hint="name it with --ceph-conf (and --ceph-user, --keyring)",
            )
        name = (user or "admin").removeprefix("client.")
        if keyring is not None and not keyring.is_file():
            raise CareenError(f"no keyring at {keyring}", hint="check --keyring")
        return cls(path.absolute(), name, keyring.absolute() if keyring else None)

    def as_record(self) -> dict[str, str]:
        """What a journal entry needs to reach the cluster again."""
        out = {"conf": str(self.conf), "user": self.user}
        if self.keyring:
            out["keyring"] = str(self.keyring)
        return out

    @classmethod
    def from_record(cls, entry: dict[str, Any]) -> CephAccess:
        keyring = entry.get("keyring")
        return cls(Path(entry["conf"]), str(entry["user"]), Path(keyring) if keyring else None)

    def rados_conf(self) -> dict[str, str]:
        conf = {
            "client_mount_timeout": str(CONNECT_TIMEOUT),
            "rados_mon_op_timeout": str(MON_OP_TIMEOUT),
            "rados_osd_op_timeout": str(OSD_OP_TIMEOUT),
        }
        if self.keyring:
            conf["keyring"] = str(self.keyring)
        return conf


class Cluster:
    """A connected cluster (`rados.Rados`) and its fsid."""

    def __init__(self, access: CephAccess, rados_handle: Any) -> None:
        self.access = access
        self.rados = rados_handle
        self.fsid: str = str(rados_handle.get_fsid())

    @contextmanager
    def pool(self, name: str) -> Iterator[Any]:
        """An I/O context on `name` (a `rados.Ioctx`)."""
        import rados

        try:
            ioctx = self.rados.open_ioctx(name)
        except rados.ObjectNotFound:
            raise CareenError(
                f"the Ceph cluster {self.fsid} has no pool {name!r}",
                hint="check the pool (--rbd-pool) and the cluster (--ceph-conf)",
            ) from None
        except rados.Error as e:
            raise ceph_error(e, f"open pool {name}") from e
        try:
            yield ioctx
        finally:
            ioctx.close()

    def close(self) -> None:
        self.rados.shutdown()

    def key(self) -> str:
        """The client's secret key, for qemu's secret object."""
        return read_key(self.access, self.rados)


@contextmanager
def connect(access: CephAccess) -> Iterator[Cluster]:
    import rados

    handle = rados.Rados(conffile=str(access.conf), rados_id=access.user)
    for key, value in access.rados_conf().items():
        if key in TIMEOUTS and 0 < float(handle.conf_get(key) or 0) <= float(value):
            continue  # the configuration asks for a shorter wait: keep it
        handle.conf_set(key, value)
    try:
        handle.connect(timeout=float(handle.conf_get("client_mount_timeout")))
    except rados.Error as e:
        handle.shutdown()
        raise CareenError(
            f"cannot connect to the Ceph cluster of {access.conf} as client.{access.user}: "
            f"{_describe(e)}",
            hint="check the monitors in the configuration, the user and its keyring "
            "(--ceph-conf, --ceph-user, --keyring)",
        ) from e
    cluster = Cluster(access, handle)
    try:
        yield cluster
    finally:
        cluster.close()


def read_key(access: CephAccess, rados_handle: Any) -> str:
    """The key of client.USER, from --keyring or the keyring the configuration names."""
    if access.keyring is not None:
        paths = [access.keyring]
    else:
        configured = rados_handle.conf_get("keyring") or ""
        paths = [Path(p.strip()) for p in configured.replace(";", ",").split(",") if p.strip()]
    section = f"client.{access.user}"
    for path in paths:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string(path.read_text())
        except (OSError, configparser.Error):
            continue
        if parser.has_option(section, "key"):
            return parser.get(section, "key").strip()
    raise CareenError(
        f"no key for {section} in {', '.join(map(str, paths)) or 'any keyring'}",
        hint="name the keyring with --keyring",
    )


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "timed out" in text.lower() or type(e).__name__ in ("TimedOut", "Timeout"):
        return f"timed out ({text})"
    return text


def ceph_error(e: BaseException, what: str) -> CareenError:
    """A librados/librbd failure as one line with a hint."""
    kind = type(e).__name__
    if kind in ("TimedOut", "Timeout") or "timed out" in str(e).lower():
        return CareenError(
            f"Ceph did not answer in time to {what}: {e}",
            hint="the cluster is slow or unhealthy (ceph -s); nothing of the old image changed",
        )
    if kind in ("PermissionError", "PermissionDeniedError"):
        return CareenError(
            f"Ceph refused to {what}: {e}",
            hint="the Ceph user needs the rbd profile on the pool (mon 'profile rbd', "
            "osd 'profile rbd pool=POOL')",
        )
    return CareenError(f"Ceph failed to {what}: {kind}: {e}", hint="see ceph -s and the logs")
