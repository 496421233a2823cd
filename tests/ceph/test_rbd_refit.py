"""`careen refit glance:ID -o glance:` for an image in Glance's RBD store, in the cluster.

The source is uploaded through Glance (so Glance's rbd driver writes it and its `snap`),
and a clone of `snap` stands in for a server's disk, as Nova would make it. Everything
is checked with the `rbd` tool, Glance's API and mount(8), not with careen's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from glance.conftest import download, make_image, show
from integration.util import assert_fails
from integration.verify import mounted_root
from services.process import service_venv

from .conftest import CephCloud, careen_ceph, impatient_conf, paused

pytestmark = [
    pytest.mark.glance,
    pytest.mark.ceph,
    pytest.mark.root,
    pytest.mark.images,
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
]

RECIPE = ["-r", "reset-identity", "--backend", "host"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def rbd_json(cc: CephCloud, *args: str) -> Any:
    return json.loads(cc.ceph.run("rbd", *args, "--format", "json"))


def exported(cc: CephCloud, spec: str, dest: Path) -> Path:
    cc.ceph.run("rbd", "export", spec, str(dest), timeout=300)
    return dest


def glance_images(cc: CephCloud, **query: str) -> list[dict[str, Any]]:
    out = []
    for hidden in ("false", "true"):
        r = cc.admin_images.get("/images", params={**query, "os_hidden": hidden})
        out += r.json()["images"]
    return out


def delete_all(cc: CephCloud, tag: str) -> None:
    for img in glance_images(cc, tag=tag) + glance_images(cc, name=f"{tag}-new"):
        cc.admin_images.patch(
            f"/images/{img['id']}",
            json=[{"op": "replace", "path": "/protected", "value": False}],
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        )
        cc.admin_images.delete(f"/images/{img['id']}")


def _source(cc: CephCloud, sample_raw: Path, tag: str) -> Iterator[dict[str, Any]]:
    """The sample in the RBD store, with a clone of its snap standing in for a server."""
    img = make_image(
        cc.demo_images,
        sample_raw,
        name=tag,
        disk_format="raw",
        visibility="shared",
        tags=[tag],
        os_distro="debian",
        hw_qemu_guest_agent="no",
    )
    child = f"{tag}-server-disk"
    cc.ceph.run("rbd", "clone", f"{cc.ceph.pool}/{img['id']}@snap", f"{cc.ceph.pool}/{child}")
    try:
        yield {**show(cc.admin_images, img["id"]), "child": child}
    finally:
        cc.ceph.run("rbd", "rm", f"{cc.ceph.pool}/{child}")
        delete_all(cc, tag)
        assert [i for i in cc.images_in_pool() if i.startswith(tag)] == []


@pytest.fixture
def rbd_source(ceph_cloud: CephCloud, sample_raw: Path, tag: str) -> Iterator[dict[str, Any]]:
    """A source of the test's own, for a test that retires it."""
    yield from _source(ceph_cloud, sample_raw, tag)


@pytest.fixture(scope="module")
def shared_source(ceph_cloud: CephCloud, sample_raw: Path) -> Iterator[dict[str, Any]]:
    """A source the failure tests share: none of them may change it."""
    yield from _source(ceph_cloud, sample_raw, f"careen-s-{uuid.uuid4().hex[:8]}")


def assert_nothing_left(cc: CephCloud, src: dict[str, Any], pool_before: list[str]) -> None:
    """Only the source in Glance; the pool as it was; the source's snap and clone as they
    were; nothing in the trash."""
    assert [i["id"] for i in glance_images(cc, name=src["name"])] == [src["id"]]
    assert glance_images(cc, name=f"{src['name']}-new") == []
    assert sorted(cc.images_in_pool()) == sorted(pool_before)
    assert cc.trash() == []
    assert [s["name"] for s in cc.snaps(src["id"])] == ["snap"]
    assert rbd_json(cc, "info", f"{cc.ceph.pool}/{src['child']}")["parent"]["image"] == src["id"]


@pytest.mark.timeout(600)
def test_refit_in_the_cluster(
    ceph_cloud: CephCloud, rbd_source: dict[str, Any], tmp_path: Path, tag: str
) -> None:
    cc, src = ceph_cloud, rbd_source
    pool, fsid = cc.ceph.pool, cc.ceph.fsid
    assert src["locations"][0]["url"] == f"rbd://{fsid}/{pool}/{src['id']}/snap"
    old_before = sha256(exported(cc, f"{pool}/{src['id']}@snap", tmp_path / "old-before"))

    proc = careen_ceph(
        cc,
        tmp_path,
        f"glance:{src['id']}",
        "-o",
        f"glance:{tag}-new",
        *RECIPE,
        "--retire",
        "hide",
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    new_id = out["glance"]["new_image"]["id"]
    new = show(cc.admin_images, new_id)

    # The location, the snapshot and the RBD image, as Nova and Glance expect them.
    url = f"rbd://{fsid}/{pool}/{new_id}/snap"
    assert [loc["url"] for loc in new["locations"]] == [url]
    assert out["glance"]["new_image"]["location"] == url
    assert (new["status"], new["disk_format"], new["name"]) == ("active", "raw", f"{tag}-new")
    snaps = rbd_json(cc, "snap", "ls", f"{pool}/{new_id}")
    assert [s["name"] for s in snaps] == ["snap"]
    assert rbd_json(cc, "info", f"{pool}/{new_id}@snap")["protected"] == "true"
    info = rbd_json(cc, "info", f"{pool}/{new_id}")
    old_info = rbd_json(cc, "info", f"{pool}/{src['id']}")
    assert "parent" not in info
    assert (info["order"], info["features"]) == (old_info["order"], old_info["features"])
    cc.ceph.run("rbd", "clone", f"{pool}/{new_id}@snap", f"{pool}/{tag}-next-disk")
    cc.ceph.run("rbd", "rm", f"{pool}/{tag}-next-disk")

    # Glance serves the snapshot's bytes, with hashes of those bytes.
    snap_file = exported(cc, f"{pool}/{new_id}@snap", tmp_path / "new-snap")
    served = download(cc.admin_images, new_id, tmp_path / "served")
    assert sha256(served) == sha256(snap_file)
    assert new["os_hash_algo"] == "sha512"
    assert new["os_hash_value"] == hashlib.sha512(served.read_bytes()).hexdigest()
    assert new["checksum"] == hashlib.md5(served.read_bytes()).hexdigest()
    assert new["size"] == os.path.getsize(served)

    # The recipe's effects, read by mount(8).
    with mounted_root(served) as root:
        assert (root / "etc/machine-id").read_text() == ""
        assert list((root / "etc/ssh").glob("ssh_host_*")) == []

    # Metadata as in the file-store case: literal values.
    assert (new["os_distro"], new["hw_qemu_guest_agent"]) == ("debian", "no")
    assert new["careen_source_image"] == src["id"]
    assert new["careen_recipe"] == "reset-identity"
    assert "careen_run" not in new

    # The old image: same bytes, same snap, its clone untouched, hidden.
    old_after = sha256(exported(cc, f"{pool}/{src['id']}@snap", tmp_path / "old-after"))
    assert old_after == old_before
    child = rbd_json(cc, "info", f"{pool}/{src['child']}")
    assert (child["parent"]["image"], child["parent"]["snapshot"]) == (src["id"], "snap")
    old = show(cc.admin_images, src["id"])
    assert (old["status"], old["os_hidden"], old["checksum"]) == ("active", True, src["checksum"])

    # Nothing crossed the Glance API but metadata; the figures say what happened.
    figures = out["glance"]["figures"]
    assert figures["copied_bytes"] == src["size"]
    assert set(figures["seconds"]) >= {"copy", "refit", "snapshot", "hash", "register"}
    assert "PATCH of locations" in " ".join(out["glance"]["notes"])

    # glance_store's own rbd driver parses the location the same way.
    parsed = glance_store_parse(cc, url)
    assert parsed == {"fsid": fsid, "pool": pool, "image": new_id, "snapshot": "snap"}


def glance_store_parse(cc: CephCloud, url: str) -> dict[str, str]:
    venv = service_venv("glance")
    code = (
        "import json, sys\n"
        "from glance_store._drivers import rbd\n"
        "loc = rbd.StoreLocation({}, None)\n"
        "loc.parse_uri(sys.argv[1])\n"
        "print(json.dumps({k: getattr(loc, k) for k in ('fsid', 'pool', 'image', 'snapshot')}))\n"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, url],
        capture_output=True,
        text=True,
        check=True,
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(cc.glance.root.parent / "ceph-bindings"),
        },
    )
    parsed: dict[str, str] = json.loads(done.stdout)
    return parsed


NEW = ["-o", "glance:{tag}-new", *RECIPE]


def _args(src: dict[str, Any]) -> list[str]:
    return [f"glance:{src['id']}", *(a.format(tag=src["name"]) for a in NEW)]


@pytest.mark.timeout(600)
def test_a_failing_recipe_leaves_nothing(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    before = ceph_cloud.images_in_pool()
    proc = careen_ceph(ceph_cloud, tmp_path, *_args(shared_source), "--run", "exit 3")
    assert proc.returncode == 1, proc.stderr
    assert "Removed the RBD image" in proc.stderr
    assert "Deleted the unfinished new image" in proc.stderr
    assert_nothing_left(ceph_cloud, shared_source, before)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("stage", "how"),
    [("rbd-copied", "interrupt"), ("rbd-register", "interrupt"), ("rbd-register", "kill")],
)
def test_a_stopped_run_leaves_nothing(
    ceph_cloud: CephCloud,
    shared_source: dict[str, Any],
    tmp_path: Path,
    stage: str,
    how: str,
) -> None:
    cc = ceph_cloud
    before = cc.images_in_pool()
    proc, _ = paused(cc, tmp_path, stage, *_args(shared_source))
    [queued] = glance_images(cc, name=f"{shared_source['name']}-new")
    assert queued["status"] == "queued"
    assert queued["id"] in cc.images_in_pool()
    if how == "interrupt":
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
    else:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert queued["id"] in cc.images_in_pool()
        done = careen_ceph(cc, tmp_path, verb="cleanup", cloud_name=None)
        assert done.returncode == 0, done.stderr
        assert f"removed the unfinished RBD image {cc.ceph.pool}/{queued['id']}" in done.stdout
        assert "deleted the unfinished Glance image" in done.stdout
    assert_nothing_left(cc, shared_source, before)
    assert [p.name for p in tmp_path.glob("careen-*")] == []


@pytest.mark.timeout(600)
def test_a_frozen_osd_fails_the_run_and_cleanup_finishes_the_job(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    """The OSD stops answering after the refit: the snapshot times out, the rollback
    cannot reach Ceph either, the journal keeps the RBD image, and cleanup removes it
    once the cluster is back."""
    cc = ceph_cloud
    before = cc.images_in_pool()
    conf = impatient_conf(cc.ceph, tmp_path / "ceph.conf")
    proc, marker = paused(cc, tmp_path, "rbd-snapshot", *_args(shared_source), ceph_conf=conf)
    [queued] = glance_images(cc, name=f"{shared_source['name']}-new")
    os.kill(cc.ceph.osd.pid, signal.SIGSTOP)
    try:
        marker.unlink()
        _, err = proc.communicate(timeout=200)
    finally:
        os.kill(cc.ceph.osd.pid, signal.SIGCONT)
    assert proc.returncode == 1, err
    assert "Ceph did not answer in time" in err, err
    assert "careen cleanup retries" in err
    assert "Ceph did not answer in time to snapshot and protect" in err
    assert glance_images(cc, name=f"{shared_source['name']}-new") == []
    assert queued["id"] in cc.images_in_pool()
    done = careen_ceph(cc, tmp_path, verb="cleanup", cloud_name=None, ceph_conf=conf)
    assert done.returncode == 0, done.stderr
    assert f"removed the unfinished RBD image {cc.ceph.pool}/{queued['id']}" in done.stdout
    assert_nothing_left(cc, shared_source, before)


@pytest.mark.timeout(300)
def test_deleting_an_image_with_clones_is_refused_before_any_work(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    before = ceph_cloud.images_in_pool()
    proc = careen_ceph(ceph_cloud, tmp_path, *_args(shared_source), "--retire", "delete")
    assert_fails(proc, 1, f"has 1 clone.*{shared_source['child']}", "--retire hide")
    assert_nothing_left(ceph_cloud, shared_source, before)
    plan = careen_ceph(ceph_cloud, tmp_path, *_args(shared_source), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert f"Would copy {ceph_cloud.ceph.pool}/{shared_source['id']}@snap" in plan.stdout
    assert_nothing_left(ceph_cloud, shared_source, before)
