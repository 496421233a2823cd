"""A real Ceph on 127.0.0.1 for the tests: one mon, one mgr, one memstore OSD.

`start_ceph` builds a fresh cluster under one directory (configuration, keyrings, the
daemons' data, run files, logs and crash reports: nothing goes to /etc/ceph, /var/lib/ceph
or /var/log/ceph), starts it with Debian's Ceph binaries and waits until it is
HEALTH_OK with an rbd-initialised pool `images`. The OSD keeps its data in memory
(memstore), so it starts in seconds, loses everything when it stops, and must never be
restarted to simulate a failure: freeze it with SIGSTOP and SIGCONT instead.

Two users may use the pool the way OpenStack's do: `client.glance` and `client.careen`.
Clients find the cluster through the `ceph.conf` alone (`CEPH_CONF`, `--conf`,
`rados.Rados(conffile=...)`); it names every user's keyring and bounds librados' waits,
which are otherwise 300 s to connect and forever for an OSD operation.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .process import (
    Daemon,
    NotInstalled,
    ServiceError,
    free_port,
    log_tail,
    run_tool,
    run_tools,
    start_daemon,
    stop_daemon,
    write_ini,
)

GiB = 1 << 30
POOL = "images"
PG_NUM = 8
MON_ID = "a"
MGR_ID = "x"
OSD_ID = 0
# How long a client (CLI, librados, qemu) waits for the mon and for one operation.
CLIENT_TIMEOUT = 30
# Programs the cluster needs; a host without them cannot run it.
BINARIES = ("ceph", "ceph-mon", "ceph-mgr", "ceph-osd", "monmaptool", "rbd")
ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
# What the Ceph documentation gives OpenStack's services for their pool.
RBD_CAPS = {
    "mon": "profile rbd",
    "osd": f"profile rbd pool={POOL}",
    "mgr": f"profile rbd pool={POOL}",
}


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


@dataclass(frozen=True)
class CephUser:
    """A cephx client user: `id` is what `--id` and `rados_id` take (`careen`)."""

    id: str
    key: str
    keyring: Path

    @property
    def name(self) -> str:
        return f"client.{self.id}"


@dataclass(frozen=True)
class Ceph:
    """What `start_ceph` yields. `run` runs the ceph CLI tools against the cluster."""

    root: Path  # all of the cluster's files live under it
    conf: Path  # ceph.conf; it names every user's keyring
    fsid: str
    port: int  # the mon's (msgr2 only)
    admin_keyring: Path
    glance: CephUser
    careen: CephUser
    pool: str
    memstore_bytes: int
    mon: Daemon
    mgr: Daemon
    osd: Daemon

    @property
    def mon_addr(self) -> str:
        """The mon's address, as in `mon host`."""
        return f"v2:127.0.0.1:{self.port}"

    @property
    def daemons(self) -> list[Daemon]:
        return [self.mon, self.mgr, self.osd]

    @property
    def pids(self) -> list[int]:
        return [d.pid for d in self.daemons]

    @property
    def env(self) -> dict[str, str]:
        """For a client started by a test (added to its environment)."""
        return {"CEPH_CONF": str(self.conf)}

    def glance_env(self, root: Path) -> dict[str, str]:
        """What a Glance needs in its environment to use the cluster: this ceph.conf, and
        Debian's rados and rbd modules (linked under `root`) on its venv's path."""
        links = root / "ceph-bindings"
        links.mkdir(parents=True, exist_ok=True)
        for module in ("rados", "rbd"):
            found = sorted(DIST_PACKAGES.glob(f"{module}.cpython-*.so"))
            if not found:
                raise NotInstalled(f"no {module} module in {DIST_PACKAGES}: scripts/setup --tests")
            target = links / found[0].name
            if not target.exists():
                target.symlink_to(found[0])
        return {"PYTHONPATH": str(links), "CEPH_CONF": str(self.conf)}

    def glance_store_options(self, store: str) -> dict[str, dict[str, str]]:
        """Glance options that make `store` (an `rbd` backend) the pool, as client.glance,
        thin-provisioned, and the default store."""
        return {
            "glance_store": {"default_backend": store},
            store: {
                "rbd_store_pool": self.pool,
                "rbd_store_user": self.glance.id,
                "rbd_store_ceph_conf": str(self.conf),
                "rbd_thin_provisioning": "True",
                "rados_connect_timeout": "30",
            },
        }

    def rbd_uri(self, image: str, user: CephUser | None = None) -> str:
        """qemu's name for `image` in the pool, as `user` (client.careen by default)."""
        user = user or self.careen
        return f"rbd:{self.pool}/{image}:conf={self.conf}:id={user.id}:keyring={user.keyring}"

    def run(
        self,
        tool: str,
        *args: str,
        user: CephUser | None = None,
        input: bytes | None = None,
        timeout: float = 60,
    ) -> str:
        """Run `tool` (ceph, rbd, rados) with `args` as `user` (client.admin by default);
        its standard output. Raises `ServiceError` with the end of stderr on failure."""
        who = ["--id", user.id] if user else []
        return ceph_cli(self.conf, [tool, *who, *args], input=input, timeout=timeout)

    def ceph_json(self, *args: str, timeout: float = 60) -> Any:
        """`ceph ARGS --format json`, parsed."""
        return json.loads(self.run("ceph", *args, "--format", "json", timeout=timeout))


def ceph_env(conf: Path) -> dict[str, str]:
    """A minimal environment for the daemons and the CLI: nothing of the caller's
    `CEPH_ARGS` or home directory reaches them."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(conf.parent),
        "LANG": "C.UTF-8",
        "CEPH_CONF": str(conf),
    }


def ceph_cli(
    conf: Path, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60
) -> str:
    args = [argv[0], "--conf", str(conf), *argv[1:]]
    try:
        done = subprocess.run(
            args,
            env=ceph_env(conf),
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise ServiceError(f"{shlex.join(args)} ran past {timeout} s") from e
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()
        raise ServiceError(f"{shlex.join(args)} exited {done.returncode}: {stderr[-2000:]}")
    return done.stdout.decode(errors="replace")


def new_key() -> str:
    """A cephx secret, encoded the way keyrings hold it: type 1 (AES), creation time
    (seconds, nanoseconds), length, then 16 random bytes."""
    header = struct.pack("<HIIH", 1, int(time.time()), 0, 16)
    return base64.b64encode(header + os.urandom(16)).decode()


def write_keyring(path: Path, entities: Mapping[str, tuple[str, Mapping[str, str]]]) -> None:
    """A keyring of `entities` (name: (key, caps by service)), readable by us alone."""
    lines = []
    for name, (key, caps) in entities.items():
        lines += [f"[{name}]", f"\tkey = {key}"]
        lines += [f'\tcaps {service} = "{cap}"' for service, cap in caps.items()]
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")


def ceph_config(root: Path, fsid: str, port: int, memstore_bytes: int) -> dict[str, dict[str, str]]:
    # Each daemon's run files and log; clients get none (they would share one socket).
    daemon = {
        "log file": f"{root}/log/$cluster-$name.log",
        "admin socket": f"{root}/run/$cluster-$name.asok",
        "pid file": f"{root}/run/$cluster-$name.pid",
    }
    return {
        "global": {
            "fsid": fsid,
            "mon host": f"[v2:127.0.0.1:{port}]",
            # msgr2 only: one port per mon, and every client here speaks it.
            "ms bind msgr1": "false",
            "public addr": "127.0.0.1",
            "cluster addr": "127.0.0.1",
            "public network": "127.0.0.0/8",
            "auth allow insecure global id reclaim": "false",
            "run dir": f"{root}/run",
            "crash dir": f"{root}/crash",
            "mon data": f"{root}/mon/$cluster-$id",
            "mgr data": f"{root}/mgr/$cluster-$id",
            "osd data": f"{root}/osd/$cluster-$id",
            "osd objectstore": "memstore",
            "memstore device bytes": str(memstore_bytes),
            # One OSD: one replica, placed on it.
            "osd pool default size": "1",
            "osd pool default min size": "1",
            "mon allow pool size one": "true",
            "osd crush chooseleaf type": "0",
            "mon warn on pool no redundancy": "false",
            "osd pool default pg autoscale mode": "off",
            "osd pool default pg num": str(PG_NUM),
            "osd pool default pgp num": str(PG_NUM),
            "mon allow pool delete": "true",
            # Read by the mon when it makes the first MgrMap: no optional mgr modules
            # (restful, iostat, nfs), only the ones that are always on.
            "mgr initial modules": "",
            # The disk under a test's temporary directory may well be fuller than 30 %.
            "mon data avail warn": "2",
            "mon data avail crit": "1",
        },
        "mon": {
            **daemon,
            "mon cluster log file": f"{root}/log/$cluster.$channel.log",
            # Otherwise every change the mon makes waits about a second.
            "paxos propose interval": "0.01",
        },
        "mgr": daemon,
        "osd": daemon,
        "client": {
            "keyring": f"{root}/$cluster.$name.keyring",
            "client mount timeout": str(CLIENT_TIMEOUT),
            "rados mon op timeout": str(CLIENT_TIMEOUT),
            "rados osd op timeout": str(CLIENT_TIMEOUT),
        },
    }


def wait_port(daemon: Daemon, port: int, timeout: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`, while `daemon` lives."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon.process.poll() is not None:
            raise ServiceError(f"{daemon.name} exited {daemon.process.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise ServiceError(f"{daemon.name} did not listen on port {port} within {timeout} s")
        time.sleep(0.02)


def unhealthy(status: Mapping[str, Any]) -> str:
    """Why `ceph status` is not yet what the tests want ("" once it is): HEALTH_OK, the
    OSD up and in, and every placement group active+clean."""
    health = status["health"]
    if health["status"] != "HEALTH_OK":
        checks = health.get("checks", {})
        details = "; ".join(f"{name}: {c['summary']['message']}" for name, c in checks.items())
        return f"{health['status']} ({details})"
    if not status["mgrmap"]["available"]:
        return "no active mgr"
    osdmap = status["osdmap"]
    if (osdmap["num_up_osds"], osdmap["num_in_osds"]) != (1, 1):
        return f"OSDs up/in: {osdmap['num_up_osds']}/{osdmap['num_in_osds']}"
    pgmap = status["pgmap"]
    clean = sum(s["count"] for s in pgmap["pgs_by_state"] if s["state_name"] == "active+clean")
    if pgmap["num_pgs"] < PG_NUM or clean != pgmap["num_pgs"]:
        return f"{clean} of {pgmap['num_pgs']} placement groups active+clean"
    return ""


def wait_healthy(conf: Path, daemons: Sequence[Daemon], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for daemon in daemons:
            if daemon.process.poll() is not None:
                raise ServiceError(f"{daemon.name} exited {daemon.process.returncode}")
        status = json.loads(ceph_cli(conf, ["ceph", "status", "--format", "json"]))
        why = unhealthy(status)
        if not why:
            return
        if time.monotonic() > deadline:
            raise ServiceError(f"the cluster is not healthy after {timeout} s: {why}")
        time.sleep(0.1)


def logs(root: Path) -> str:
    """The end of every log under `root`/log, for an error message."""
    parts = [f"--- {log.name}:\n{log_tail(log, 15)}" for log in sorted((root / "log").glob("*"))]
    return "\n".join(parts)


def write_keyrings(root: Path, users: Sequence[CephUser]) -> dict[str, str]:
    """Every entity's keyring where it looks for it; the keys of the daemons and admin."""
    keys = {name: new_key() for name in ("mon.", "client.admin", f"mgr.{MGR_ID}", f"osd.{OSD_ID}")}
    mgr_caps = {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}
    # The mon imports every entity of its first keyring into its auth database, with
    # caps; the OSD's entity comes later, from `ceph osd new`.
    write_keyring(
        root / "initial.keyring",
        {
            "mon.": (keys["mon."], {"mon": "allow *"}),
            "client.admin": (keys["client.admin"], ADMIN_CAPS),
            f"mgr.{MGR_ID}": (keys[f"mgr.{MGR_ID}"], mgr_caps),
            **{user.name: (user.key, RBD_CAPS) for user in users},
        },
    )
    own = {
        root / "ceph.client.admin.keyring": "client.admin",
        root / "mgr" / f"ceph-{MGR_ID}" / "keyring": f"mgr.{MGR_ID}",
        root / "osd" / f"ceph-{OSD_ID}" / "keyring": f"osd.{OSD_ID}",
    }
    for path, name in own.items():
        write_keyring(path, {name: (keys[name], {})})
    for user in users:
        write_keyring(user.keyring, {user.name: (user.key, {})})
    return keys


def make_stores(
    root: Path, conf: Path, fsid: str, port: int, osd_uuid: str, timeout: float
) -> None:
    """The mon's store and the OSD's (side by side: with `--no-mon-config` the OSD's
    mkfs needs no mon), then check that the OSD really got memstore."""
    env = ceph_env(conf)
    monmap = root / "monmap"
    mon_addr = f"[v2:127.0.0.1:{port}]"
    monmaptool = ["monmaptool", "--create", "--clobber", "--enable-all-features", "--fsid", fsid]
    monmaptool += ["--addv", MON_ID, mon_addr, str(monmap)]
    run_tool(monmaptool, env=env, log=root / "log" / "mon-mkfs.log", timeout=timeout, cwd=root)
    mon = ["ceph-mon", "--conf", str(conf), "--mkfs", "-i", MON_ID, "--monmap", str(monmap)]
    mon += ["--keyring", str(root / "initial.keyring")]
    osd = ["ceph-osd", "--conf", str(conf), "--no-mon-config", "--mkfs", "-i", str(OSD_ID)]
    osd += ["--osd-uuid", osd_uuid]
    commands = [(mon, root / "log" / "mon-mkfs.log"), (osd, root / "log" / "osd-mkfs.log")]
    run_tools(commands, env=env, timeout=timeout, cwd=root)
    # An unknown `osd objectstore` would silently give bluestore.
    kind = (root / "osd" / f"ceph-{OSD_ID}" / "type").read_text().strip()
    if kind != "memstore":
        raise ServiceError(f"osd.{OSD_ID} has object store {kind!r}, not memstore")


@contextmanager
def start_ceph(
    root: Path,
    *,
    port: int | None = None,
    memstore_bytes: int = 4 * GiB,
    timeout: float = 60,
) -> Iterator[Ceph]:
    """Build and start a cluster with all of its files under `root` (created), its mon on
    127.0.0.1:`port` (a free one by default). `memstore_bytes` is what the OSD may hold;
    the OSD takes memory only as it fills, up to about twice what it holds. `timeout`
    bounds each step of the start. Raises `ServiceError` with the end of the logs if the
    cluster does not come up."""
    for sub in ("log", "run", "crash", "mon", f"mgr/ceph-{MGR_ID}", f"osd/ceph-{OSD_ID}"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    fsid = str(uuid.uuid4())
    osd_uuid = str(uuid.uuid4())
    conf = root / "ceph.conf"
    write_ini(conf, ceph_config(root, fsid, port, memstore_bytes))
    env = ceph_env(conf)
    glance, careen = (
        CephUser(name, new_key(), root / f"ceph.client.{name}.keyring")
        for name in ("glance", "careen")
    )
    keys = write_keyrings(root, [glance, careen])

    with ExitStack() as stack:

        def start(name: str, *args: str) -> Daemon:
            argv = [name, "--conf", str(conf), "-f", *args]
            daemon = start_daemon(name, argv, env=env, log=root / "log" / f"{name}.out", cwd=root)
            stack.callback(stop_daemon, daemon)
            return daemon

        try:
            make_stores(root, conf, fsid, port, osd_uuid, timeout)
            mon = start("ceph-mon", "-i", MON_ID)
            wait_port(mon, port, timeout)
            # The devicehealth module (always on) would add a pool of its own. The mgr reads
            # its modules' options from the mon, so this goes in before the mgr starts; the
            # mon accepts it only with --force until a mgr has told it the module's options.
            option = "mgr/devicehealth/enable_monitoring"
            ceph_cli(conf, ["ceph", "config", "set", "mgr", option, "false", "--force"])
            mgr = start("ceph-mgr", "-i", MGR_ID)
            secret = json.dumps({"cephx_secret": keys[f"osd.{OSD_ID}"]}).encode()
            ceph_cli(conf, ["ceph", "osd", "new", osd_uuid, str(OSD_ID), "-i", "-"], input=secret)
            osd = start("ceph-osd", "-i", str(OSD_ID))
            ceph_cli(conf, ["ceph", "osd", "pool", "create", POOL, str(PG_NUM), str(PG_NUM)])
            ceph_cli(conf, ["rbd", "pool", "init", POOL])
            wait_healthy(conf, [mon, mgr, osd], timeout)
        except ServiceError as e:
            raise ServiceError(f"Ceph under {root} did not start: {e}\n{logs(root)}") from e
        # The ExitStack stops them in reverse: the OSD first, the mon last.
        yield Ceph(
            root=root,
            conf=conf,
            fsid=fsid,
            port=port,
            admin_keyring=root / "ceph.client.admin.keyring",
            glance=glance,
            careen=careen,
            pool=POOL,
            memstore_bytes=memstore_bytes,
            mon=mon,
            mgr=mgr,
            osd=osd,
        )
