"""The other ways in and out of Ceph: an rbd: source, a member without locations, the
service role's locations API, a Glance that refuses the location, and a qcow2 from a
file store published into the RBD store."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from glance.conftest import download, make_image, show
from integration.util import assert_fails
from integration.verify import mounted_root
from services.ceph import Ceph
from services.cloud import Cloud

from .conftest import CephCloud, careen_ceph, ceph_glance, paused
from .test_rbd_refit import RECIPE, assert_nothing_left, glance_images, rbd_json, shared_source

pytestmark = [
    pytest.mark.glance,
    pytest.mark.ceph,
    pytest.mark.root,
    pytest.mark.images,
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
]

__all__ = ["shared_source"]  # the module-scoped fixture, shared with this module


def _new(out: str) -> str:
    return str(json.loads(out)["glance"]["new_image"]["id"])


@pytest.mark.timeout(600)
def test_an_rbd_snapshot_refitted_into_a_file_through_the_appliance(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    """No Glance at all; the appliance reads the export, and the key is on no command line."""
    cc, pool = ceph_cloud, ceph_cloud.ceph.pool
    before = cc.images_in_pool()
    out = tmp_path / "out.qcow2"
    spec = f"rbd:{pool}/{shared_source['id']}@snap"
    args = [spec, "-o", str(out), "-r", "reset-identity", "--backend", "appliance"]
    proc, marker = paused(cc, tmp_path, "exported", *args)
    try:
        key = cc.ceph.careen.key
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert key.encode() not in cmdline, f"the Ceph key is on the command line of {pid}"
    finally:
        marker.unlink()
    _, err = proc.communicate(timeout=500)
    assert proc.returncode == 0, err
    assert "Backend: appliance" in err, err
    with mounted_root(out) as root:
        assert (root / "etc/machine-id").read_text() == ""
    assert_nothing_left(cc, shared_source, before)


@pytest.mark.timeout(300)
def test_an_rbd_source_refuses_what_it_cannot_do(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    cc, pool = ceph_cloud, ceph_cloud.ceph.pool
    before = cc.images_in_pool()
    snap = f"rbd:{pool}/{shared_source['id']}@snap"
    cases = [
        ([snap, "--in-place"], 2, "is a snapshot, which cannot change", "without @SNAP"),
        ([snap, "-o", "glance:"], 2, "refitted into a local file", "refit glance:ID"),
        ([f"rbd:{pool}/nothing-here", "-o", str(tmp_path / "x.qcow2")], 1, "no RBD image", ""),
        (["rbd:nopool/x", "-o", str(tmp_path / "x.qcow2")], 1, "has no pool 'nopool'", ""),
        (["rbd:images", "-o", str(tmp_path / "x.qcow2")], 2, "not an RBD image reference", ""),
    ]
    for args, status, message, hint in cases:
        proc = careen_ceph(cc, tmp_path, *args, cloud_name=None)
        assert_fails(proc, status, message, hint)
    assert list(tmp_path.glob("x.qcow2*")) == []
    assert_nothing_left(cc, shared_source, before)


@pytest.mark.timeout(600)
def test_a_member_refits_in_the_cluster(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    """Where members see locations (show_multiple_locations), they take the same path."""
    cc, src = ceph_cloud, shared_source
    before = cc.images_in_pool()
    assert show(cc.demo_images, src["id"])["locations"], "members see no locations here"
    name = f"{src['name']}-new"
    args = [f"glance:{src['id']}", "-o", f"glance:{name}", *RECIPE, "--format", "json"]
    proc = careen_ceph(cc, tmp_path, *args, cloud_name="ceph-demo")
    assert proc.returncode == 0, proc.stderr
    new = show(cc.admin_images, _new(proc.stdout))
    assert new["locations"][0]["url"].endswith(f"/{cc.ceph.pool}/{new['id']}/snap")
    assert new["owner"] == src["owner"]
    cc.admin_images.delete(f"/images/{new['id']}")
    assert_nothing_left(cc, src, before)


@pytest.mark.timeout(600)
def test_the_service_role_uses_the_locations_api(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    cc, src = ceph_cloud, shared_source
    before = cc.images_in_pool()
    name = f"{src['name']}-new"
    args = [f"glance:{src['id']}", "-o", f"glance:{name}", *RECIPE, "--format", "json"]
    proc = careen_ceph(cc, tmp_path, *args, cloud_name="ceph-service")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "the locations API" in " ".join(out["glance"]["notes"])
    new = show(cc.admin_images, out["glance"]["new_image"]["id"])
    assert new["status"] == "active"
    assert new["os_hash_value"] == out["glance"]["new_image"]["os_hash_value"]
    cc.admin_images.delete(f"/images/{new['id']}")
    assert_nothing_left(cc, src, before)


@pytest.fixture(scope="module")
def refusing(
    cloud: Cloud, ceph: Ceph, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CephCloud]:
    """A Ceph-backed Glance that shows no locations and lets nobody add one."""
    root = tmp_path_factory.mktemp("glance-refusing")
    policy = root / "policy.yaml"
    policy.write_text('"set_image_location": "!"\n"add_image_location": "!"\n')
    more = {
        "oslo_policy": {"policy_file": str(policy)},
        "DEFAULT": {"show_multiple_locations": "False", "show_image_direct_url": "False"},
    }
    with ceph_glance(cloud, ceph, root, more) as started:
        yield started


@pytest.mark.timeout(600)
def test_a_glance_that_hides_and_refuses_locations(
    refusing: CephCloud, sample_raw: Path, tmp_path: Path, tag: str
) -> None:
    """Without locations, --rbd-pool says where the image is; a refused location rolls
    everything back."""
    img = make_image(refusing.demo_images, sample_raw, name=tag, disk_format="raw", tags=[tag])
    child = f"{tag}-server-disk"
    pool = refusing.ceph.pool
    refusing.ceph.run("rbd", "clone", f"{pool}/{img['id']}@snap", f"{pool}/{child}")
    src = {**img, "child": child}
    try:
        assert "locations" not in show(refusing.admin_images, img["id"])
        before = refusing.images_in_pool()
        args = [f"glance:{img['id']}", "-o", f"glance:{tag}-new", *RECIPE]
        unknown = careen_ceph(refusing, tmp_path, *args)
        assert_fails(unknown, 1, "does not show where image .* is stored", "--rbd-pool")
        proc = careen_ceph(refusing, tmp_path, *args, "--rbd-pool", pool)
        assert_fails(proc, 1, "Glance refused to register the new image's location: HTTP 403", "")
        assert "Removed the RBD image" in proc.stderr
        assert_nothing_left(refusing, src, before)
    finally:
        refusing.ceph.run("rbd", "rm", f"{pool}/{child}")
        for found in glance_images(refusing, name=tag):
            refusing.admin_images.delete(f"/images/{found['id']}")


@pytest.mark.timeout(600)
def test_a_qcow2_from_a_file_store_is_published_into_rbd(
    ceph_cloud: CephCloud, tmp_path: Path, tag: str
) -> None:
    """Through the Glance API (the data has to move): converted to raw, stored in ceph1."""
    from careen.samples import Layout, sample_image

    cc = ceph_cloud
    src = make_image(cc.demo_images, None, name=tag, disk_format="qcow2", tags=[tag])
    with sample_image(Layout.MBR_QCOW2).open("rb") as f:
        up = cc.demo_images.put(
            f"/images/{src['id']}/file",
            data=f,
            headers={"Content-Type": "application/octet-stream", "X-Image-Meta-Store": "file1"},
        )
    assert up.status_code == 204, up.text
    try:
        assert show(cc.admin_images, src["id"])["stores"] == "file1"
        args = ["-o", "glance:", "--disk-format", "raw", "--store", "ceph1", *RECIPE]
        proc = careen_ceph(cc, tmp_path, f"glance:{src['id']}", *args, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        new = show(cc.admin_images, _new(proc.stdout))
        assert (new["disk_format"], new["stores"]) == ("raw", "ceph1")
        assert new["id"] in cc.images_in_pool()
        assert rbd_json(cc, "info", f"{cc.ceph.pool}/{new['id']}@snap")["protected"] == "true"
    finally:
        for found in glance_images(cc, tag=tag):
            cc.admin_images.delete(f"/images/{found['id']}")


@pytest.mark.timeout(600)
def test_a_qcow2_held_in_rbd_is_converted_in_the_cluster(
    ceph_cloud: CephCloud, tmp_path: Path, tag: str
) -> None:
    from careen.samples import Layout, sample_image

    cc = ceph_cloud
    src = make_image(
        cc.demo_images, sample_image(Layout.MBR_QCOW2), name=tag, disk_format="qcow2", tags=[tag]
    )
    try:
        assert src["stores"] == "ceph1"
        args = ["-o", "glance:", *RECIPE, "--format", "json"]
        proc = careen_ceph(cc, tmp_path, f"glance:{src['id']}", *args)
        assert proc.returncode == 0, proc.stderr
        assert "Converting" in proc.stderr
        new = show(cc.admin_images, _new(proc.stdout))
        assert (new["disk_format"], new["status"]) == ("raw", "active")
        assert new["locations"][0]["url"].endswith(f"/{new['id']}/snap")
        served = download(cc.admin_images, new["id"], tmp_path / "served.raw")
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(served)],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert info["format"] == "raw"
        with mounted_root(served) as root:
            assert (root / "etc/machine-id").read_text() == ""
        assert show(cc.admin_images, src["id"])["checksum"] == src["checksum"]
    finally:
        for found in glance_images(cc, tag=tag):
            cc.admin_images.delete(f"/images/{found['id']}")


@pytest.mark.timeout(300)
def test_a_fleet_plan_checks_the_pool_behind_the_store(
    ceph_cloud: CephCloud, shared_source: dict[str, Any], tmp_path: Path
) -> None:
    """`fleet plan --pool STORE=POOL` reads the pool's free space as client.careen."""
    cc = ceph_cloud
    df = json.loads(cc.ceph.run("ceph", "df", "--format", "json"))
    avail = {p["name"]: int(p["stats"]["max_avail"]) for p in df["pools"]}[cc.ceph.pool]
    assert avail > shared_source["virtual_size"]  # the 4 GiB OSD holds one more copy

    def plan(pool: str) -> list[str]:
        out = tmp_path / f"{pool}.json"
        proc = careen_ceph(
            cc,
            tmp_path,
            "plan",
            "-o",
            str(out),
            "-w",
            f"name={shared_source['name']}",
            "--pool",
            f"ceph1={pool}",
            "--format",
            "json",
            verb="fleet",
        )
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert [e["id"] for e in data["images"]] == [shared_source["id"]]
        return [w for w in data["warnings"] if "quota" not in w]

    assert plan(cc.ceph.pool) == []
    assert plan("nosuchpool") == ["pool nosuchpool does not exist in the cluster"]
