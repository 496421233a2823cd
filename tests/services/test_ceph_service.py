"""The suite's Ceph is real, and the session fixture `ceph` works.

These prove the ground the RBD tests stand on: a healthy one-OSD cluster in memory with
an rbd pool `images`, the users Glance and careen get and what they may do there (RBD
images, snapshots, clones and flattening through Debian's python3-rbd, qemu's rbd
driver), librados' bounded waits, and a second, separate cluster that starts beside the
session's and leaves no process behind. The fixture itself checks at the end of the
session that every daemon is gone.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import rados
import rbd

from .ceph import CLIENT_TIMEOUT, Ceph, GiB, start_ceph
from .fixtures import assert_stopped
from .process import Daemon, ServiceError

pytestmark = pytest.mark.ceph

MiB = 1 << 20


def image_name() -> str:
    return f"careen-test-{secrets.token_hex(4)}"


@contextmanager
def pool_as(ceph: Ceph, rados_id: str, **conf: str) -> Iterator[Any]:
    """An I/O context on the `images` pool, connected with nothing but the ceph.conf (and
    `conf` on top of it)."""
    with rados.Rados(conffile=str(ceph.conf), rados_id=rados_id, conf=conf) as cluster:
        ioctx = cluster.open_ioctx(ceph.pool)
        try:
            yield ioctx
        finally:
            ioctx.close()


@contextmanager
def frozen(daemon: Daemon) -> Iterator[None]:
    """`daemon` stopped with SIGSTOP, and woken again however the block ends."""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def remove_everything(ioctx: Any, name: str) -> None:
    """Remove RBD image `name` with its snapshots, whatever state a failed test left."""
    try:
        with rbd.Image(ioctx, name) as image:
            for snap in list(image.list_snaps()):
                if image.is_protected_snap(snap["name"]):
                    image.unprotect_snap(snap["name"])
                image.remove_snap(snap["name"])
    except rbd.ImageNotFound:
        return
    rbd.RBD().remove(ioctx, name)


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"qemu-img {args[0]}: {done.stderr}"
    return done.stdout


@pytest.mark.timeout(120)
def test_the_cluster_is_healthy_and_in_memory(ceph: Ceph) -> None:
    assert os.environ["CEPH_CONF"] == str(ceph.conf)
    status = ceph.ceph_json("status")
    assert status["fsid"] == ceph.fsid
    assert status["health"]["status"] == "HEALTH_OK", status["health"]
    assert (status["osdmap"]["num_up_osds"], status["osdmap"]["num_in_osds"]) == (1, 1)
    assert status["mgrmap"]["available"]
    mons = ceph.ceph_json("mon", "dump")["mons"]
    assert [m["public_addrs"]["addrvec"][0]["addr"] for m in mons] == [f"127.0.0.1:{ceph.port}"]

    assert ceph.ceph_json("osd", "metadata", "0")["osd_objectstore"] == "memstore"
    total = ceph.ceph_json("osd", "df")["summary"]["total_kb"]
    assert total * 1024 == ceph.memstore_bytes
    assert ceph.ceph_json("mgr", "module", "ls")["enabled_modules"] == []

    # Logs, the mon's cluster log and the admin sockets are under the cluster's directory.
    logs = {p.name for p in (ceph.root / "log").iterdir()}
    assert {"ceph-mon.a.log", "ceph-mgr.x.log", "ceph-osd.0.log", "ceph.cluster.log"} <= logs
    sockets = {p.name for p in (ceph.root / "run").iterdir()}
    assert {"ceph-mon.a.asok", "ceph-mgr.x.asok", "ceph-osd.0.asok"} <= sockets


@pytest.mark.timeout(120)
def test_the_images_pool_is_rbd_and_its_users_are_confined_to_it(ceph: Ceph) -> None:
    pools = {p["pool_name"]: p for p in ceph.ceph_json("osd", "pool", "ls", "detail")}
    images = pools[ceph.pool]
    assert (images["size"], images["min_size"], images["pg_num"]) == (1, 1, 8)
    assert images["pg_autoscale_mode"] == "off"
    assert "rbd" in images["application_metadata"]

    for user in (ceph.glance, ceph.careen):
        (entity,) = ceph.ceph_json("auth", "get", user.name)
        assert entity["key"] == user.key
        assert entity["caps"] == {
            "mon": "profile rbd",
            "osd": f"profile rbd pool={ceph.pool}",
            "mgr": f"profile rbd pool={ceph.pool}",
        }
        assert user.keyring.stat().st_mode & 0o077 == 0
        # Through the CLI, as the user, with nothing but the ceph.conf.
        ceph.run("rbd", "ls", ceph.pool, user=user)
        with pytest.raises(ServiceError, match="EACCES"):
            ceph.run("ceph", "osd", "pool", "create", "careen-test-forbidden", user=user)


@pytest.mark.timeout(120)
def test_rbd_image_snapshot_clone_and_flatten_as_careen(ceph: Ceph) -> None:
    parent, child = image_name(), image_name()
    data = os.urandom(MiB)
    with pool_as(ceph, ceph.careen.id) as ioctx:
        try:
            rbd.RBD().create(
                ioctx, parent, 64 * MiB, old_format=False, features=rbd.RBD_FEATURE_LAYERING
            )
            with rbd.Image(ioctx, parent) as image:
                assert image.size() == 64 * MiB
                image.write(data, 3 * MiB)
                assert image.read(3 * MiB, MiB) == data
                assert image.read(0, 4096) == bytes(4096)  # thin: never written, reads zeros
                image.create_snap("base")
                image.protect_snap("base")
                assert image.is_protected_snap("base")
                image.write(bytes(MiB), 3 * MiB)  # the snapshot keeps the old data
            assert parent in rbd.RBD().list(ioctx)

            rbd.RBD().clone(ioctx, parent, "base", ioctx, child, features=rbd.RBD_FEATURE_LAYERING)
            with rbd.Image(ioctx, child) as clone:
                assert clone.parent_info() == (ceph.pool, parent, "base")
                assert clone.read(3 * MiB, MiB) == data
                clone.flatten()
                with pytest.raises(rbd.ImageNotFound):
                    clone.parent_info()
                assert clone.read(3 * MiB, MiB) == data
            with rbd.Image(ioctx, parent, snapshot="base") as snap:
                assert list(snap.list_children()) == []
            with rbd.Image(ioctx, parent) as image:
                image.unprotect_snap("base")
                image.remove_snap("base")
            rbd.RBD().remove(ioctx, child)
            rbd.RBD().remove(ioctx, parent)
            assert parent not in rbd.RBD().list(ioctx)
        finally:
            remove_everything(ioctx, child)
            remove_everything(ioctx, parent)


@pytest.mark.timeout(120)
def test_qemu_img_writes_and_reads_an_rbd_image(ceph: Ceph, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.write(os.urandom(MiB))
        f.seek(7 * MiB)
        f.write(os.urandom(MiB))
    name = image_name()
    uri = ceph.rbd_uri(name)
    try:
        qemu_img("convert", "-f", "raw", "-O", "raw", str(raw), uri)
        info = qemu_img("info", "--output=json", "-f", "raw", uri)
        assert '"virtual-size": 8388608' in info
        qemu_img("compare", "-f", "raw", "-F", "raw", str(raw), uri)
        listed = ceph.run("rbd", "ls", ceph.pool, user=ceph.careen).split()
        assert name in listed
    finally:
        ceph.run("rbd", "rm", f"{ceph.pool}/{name}", user=ceph.careen)


@pytest.mark.timeout(120)
def test_a_client_gives_up_on_a_frozen_osd(ceph: Ceph) -> None:
    """librados' waits are bounded by the ceph.conf; a tighter bound of this client's own
    shows that a frozen OSD fails an operation instead of blocking it."""
    with rados.Rados(conffile=str(ceph.conf), rados_id=ceph.careen.id) as cluster:
        for option in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
            assert float(cluster.conf_get(option)) == CLIENT_TIMEOUT, option
    name = f"careen-test-object-{secrets.token_hex(4)}"
    with pool_as(ceph, ceph.careen.id, rados_osd_op_timeout="2") as ioctx:
        ioctx.write_full(name, b"before")
        try:
            with frozen(ceph.osd):
                started = time.monotonic()
                with pytest.raises(rados.TimedOut):
                    ioctx.read(name)
                waited = time.monotonic() - started
            assert 1.5 < waited < 10
            assert ioctx.read(name) == b"before"  # awake again, nothing lost
        finally:
            ioctx.remove_object(name)
    assert ceph.ceph_json("health")["status"] == "HEALTH_OK"


@pytest.mark.timeout(120)
def test_a_second_cluster_starts_beside_and_stops_cleanly(ceph: Ceph, tmp_path: Path) -> None:
    with start_ceph(tmp_path / "ceph", memstore_bytes=GiB) as other:
        assert (other.fsid, other.port) != (ceph.fsid, ceph.port)
        assert other.ceph_json("health")["status"] == "HEALTH_OK"
        assert other.ceph_json("osd", "df")["summary"]["total_kb"] * 1024 == GiB
        # Only the pool of its own: no optional mgr module made one.
        assert other.ceph_json("osd", "pool", "ls") == [other.pool]
        # Its users are its own: the other cluster does not know them.
        other.run("rbd", "ls", other.pool, user=other.careen)
        assert other.careen.key != ceph.careen.key
        wrong_key = ["--keyring", str(other.careen.keyring)]
        with pytest.raises(ServiceError, match="Permission denied"):
            ceph.run("rbd", "ls", ceph.pool, *wrong_key, user=ceph.careen, timeout=20)
        pids = other.pids
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        stopping = time.monotonic()
    # Every daemon honours SIGTERM at once (stop_daemon would SIGKILL it after 10 s).
    assert time.monotonic() - stopping < 5
    assert_stopped(pids)
    # The session's cluster did not notice.
    assert ceph.ceph_json("health")["status"] == "HEALTH_OK"
    assert all(d.process.poll() is None for d in ceph.daemons)
