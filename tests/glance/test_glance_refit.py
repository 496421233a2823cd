"""`careen refit glance:ID -o glance:` against the suite's real Keystone and Glance.

The source is the MBR qcow2 sample, uploaded by the ordinary user demo with a rich set
of metadata; careen refits it with a file-only recipe on the host backend and publishes
a new image. Every expectation about the new image is written out literally here, and
checked through the API with the admin's eyes (all projects, hidden images included).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.util import assert_fails
from integration.verify import mounted_root
from services.cloud import Cloud

from .conftest import delete_everywhere, download, listed, make_image, sha512_file, show

pytestmark = [
    pytest.mark.glance,
    pytest.mark.root,
    pytest.mark.images,
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
]

RECIPE = ["-r", "reset-identity", "--backend", "host"]
# Snapshot bookkeeping, a signature and reserved keys: none of it may reach the new image.
DROPPED = {
    "image_type": "snapshot",
    "instance_uuid": "0b5b0e5c-0000-4000-8000-000000000001",
    "base_image_ref": "0b5b0e5c-0000-4000-8000-000000000002",
    "owner_user_name": "someone",
    "boot_roles": "member",
    "careen_recipe": "an older run's",
}
SIGNATURE = {
    "img_signature": "c2lnbmF0dXJl",
    "img_signature_hash_method": "SHA-256",
    "img_signature_key_type": "RSA-PSS",
    "img_signature_certificate_uuid": "0b5b0e5c-0000-4000-8000-000000000003",
}
KEPT = {
    "os_distro": "debian",
    "os_version": "12",
    "os_type": "linux",
    "os_admin_user": "debian",
    "os_require_quiesce": "yes",
    "hw_disk_bus": "scsi",
    "hw_scsi_model": "virtio-scsi",
    "site_note": "Grüße aus Köln - ünïcödé ✓",
}


@pytest.fixture
def source(cloud: Cloud, sample_qcow2: Path, tag: str) -> Iterator[dict[str, Any]]:
    images = cloud.demo_images
    img = make_image(
        images,
        sample_qcow2,
        name=tag,
        disk_format="qcow2",
        visibility="shared",
        min_ram=512,
        min_disk=3,
        os_hidden=True,
        tags=[tag, "golden"],
        **KEPT,
        **DROPPED,
    )
    # Glance verifies a signature on upload, so the signature comes afterwards.
    r = images.patch(
        f"/images/{img['id']}",
        json=[{"op": "add", "path": f"/{k}", "value": v} for k, v in SIGNATURE.items()],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    assert r.status_code == 200, r.text
    r = images.post(f"/images/{img['id']}/members", json={"member": "partner-project-id"})
    assert r.status_code == 200, r.text
    r = images.patch(
        f"/images/{img['id']}",
        json=[{"op": "replace", "path": "/protected", "value": True}],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    assert r.status_code == 200, r.text
    yield show(images, img["id"])
    delete_everywhere(cloud, tag=tag)
    delete_everywhere(cloud, name=tag)


@pytest.mark.timeout(600)
def test_publish_copies_metadata_and_keeps_the_old_image(
    cloud: Cloud, source: dict[str, Any], run_careen: Any, tmp_path: Path, tag: str
) -> None:
    before = sha512_file(download(cloud.admin_images, source["id"], tmp_path / "before"))
    proc = run_careen(f"glance:{source['id']}", "-o", "glance:", *RECIPE, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    new_id = out["glance"]["new_image"]["id"]
    new = show(cloud.admin_images, new_id)

    assert new["status"] == "active"
    data = download(cloud.admin_images, new_id, tmp_path / "new")
    assert (new["os_hash_algo"], new["os_hash_value"]) == ("sha512", sha512_file(data))
    assert out["glance"]["new_image"]["os_hash_value"] == new["os_hash_value"]
    assert new["os_hash_value"] != source["os_hash_value"]  # the recipe changed the data
    # The recipe's effects, read by mount(8) from the data Glance serves.
    with mounted_root(tmp_path / "before") as root:
        assert (root / "etc/machine-id").read_text().strip() != ""
        assert list((root / "etc/ssh").glob("ssh_host_*_key")) != []
    with mounted_root(data) as root:
        assert (root / "etc/machine-id").read_text() == ""
        assert list((root / "etc/ssh").glob("ssh_host_*")) == []
        assert not (root / "var/lib/cloud/instance").exists()

    assert new["name"] == tag
    assert new["disk_format"] == "qcow2"
    assert new["container_format"] == "bare"
    assert new["visibility"] == "shared"
    assert new["owner"] == cloud.demo_project_id
    assert new["min_ram"] == 512
    assert new["min_disk"] == 3
    assert sorted(new["tags"]) == sorted([tag, "golden"])
    assert new["protected"] is True
    assert new["os_hidden"] is True
    for key, value in KEPT.items():
        assert new[key] == value, key
    for key in [*DROPPED, *SIGNATURE]:
        if key != "careen_recipe":
            assert key not in new, key
    assert new["careen_source_image"] == source["id"]
    assert new["careen_recipe"] == "reset-identity"
    assert len(new["careen_recipe_digest"]) == 16
    assert new["careen_version"]
    assert new["careen_refitted_at"].endswith("Z")
    assert "careen_run" not in new
    members = cloud.demo_images.get(f"/images/{new_id}/members").json()["members"]
    assert [(m["member_id"], m["status"]) for m in members] == [("partner-project-id", "pending")]

    old = show(cloud.admin_images, source["id"])
    assert old == {**source, "updated_at": old["updated_at"]}
    assert old["updated_at"] == source["updated_at"]
    assert sha512_file(download(cloud.admin_images, source["id"], tmp_path / "after")) == before


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["rename", "hide", "deactivate", "delete"])
def test_retire(cloud: Cloud, sample_qcow2: Path, run_careen: Any, tag: str, mode: str) -> None:
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    try:
        args = ["-o", f"glance:{tag}-new", "--retire", mode, "--take-name"]
        proc = run_careen(f"glance:{tag}", *args, *RECIPE, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        new_id = json.loads(proc.stdout)["glance"]["new_image"]["id"]
        new = show(cloud.admin_images, new_id)
        assert (new["status"], new["name"]) == ("active", tag)
        r = cloud.admin_images.get(f"/images/{src['id']}")
        if mode == "delete":
            assert r.status_code == 404
            assert "lose rebuild" in proc.stderr or "no longer be rebuilt" in proc.stderr
            return
        old = r.json()
        assert old["checksum"] == src["checksum"]
        expected = {
            "rename": ("active", f"{tag}-retired", False),
            "hide": ("active", tag, True),
            "deactivate": ("deactivated", tag, False),
        }[mode]
        assert (old["status"], old["name"], old["os_hidden"]) == expected
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(300)
def test_dry_run_changes_nothing(cloud: Cloud, source: dict[str, Any], run_careen: Any) -> None:
    proc = run_careen(
        f"glance:{source['id']}",
        "-o",
        "glance:",
        *RECIPE,
        "--dry-run",
        "--retire",
        "delete",
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["download"]["id"] == source["id"]
    assert plan["create"]["os_distro"] == "debian"
    assert "instance_uuid" not in plan["create"]
    assert plan["retire"] == "delete"
    assert [i["id"] for i in listed(cloud, tag=source["tags"][0])] == [source["id"]]
    assert show(cloud.admin_images, source["id"]) == source


@pytest.mark.timeout(600)
def test_admin_keeps_owner_and_public_visibility(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tag: str
) -> None:
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    r = cloud.admin_images.patch(
        f"/images/{src['id']}",
        json=[{"op": "replace", "path": "/visibility", "value": "public"}],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    assert r.status_code == 200, r.text
    try:
        proc = run_careen(
            f"glance:{src['id']}",
            "-o",
            "glance:",
            *RECIPE,
            "--format",
            "json",
            cloud_name="careen-admin",
        )
        assert proc.returncode == 0, proc.stderr
        new = show(cloud.admin_images, json.loads(proc.stdout)["glance"]["new_image"]["id"])
        assert (new["visibility"], new["owner"]) == ("public", cloud.demo_project_id)
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(600)
def test_failed_recipe_rolls_the_new_image_back(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tag: str
) -> None:
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    try:
        proc = run_careen(
            f"glance:{src['id']}",
            "-o",
            "glance:",
            "-r",
            "empty",
            "--run",
            "exit 3",
            "--backend",
            "host",
        )
        assert proc.returncode == 1, proc.stderr
        assert "Deleted the unfinished new image" in proc.stderr
        assert [i["id"] for i in listed(cloud, name=tag)] == [src["id"]]
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(300)
def test_refusals_leave_nothing(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tag: str, tmp_path: Path
) -> None:
    demo = cloud.demo_images
    try:
        queued = make_image(demo, None, name=f"{tag}-queued", disk_format="qcow2", tags=[tag])
        assert_fails(
            run_careen(f"glance:{queued['id']}", "-o", "glance:"),
            1,
            "is queued, not active",
            "active",
        )

        deact = make_image(demo, sample_qcow2, name=f"{tag}-deact", disk_format="qcow2", tags=[tag])
        r = cloud.admin_images.post(f"/images/{deact['id']}/actions/deactivate")
        assert r.status_code == 204, r.text
        assert_fails(
            run_careen(f"glance:{deact['id']}", "-o", "glance:"), 1, "is deactivated", "reactivate"
        )

        ami = make_image(
            demo,
            sample_qcow2,
            name=f"{tag}-ami",
            disk_format="ami",
            container_format="ami",
            tags=[tag],
        )
        assert ami["status"] == "active"
        assert_fails(
            run_careen(f"glance:{ami['id']}", "-o", "glance:"),
            1,
            "disk_format 'ami', which careen cannot refit",
            "careen reads",
        )

        hidden = make_image(
            demo,
            sample_qcow2,
            name=f"{tag}-hidden",
            disk_format="qcow2",
            os_hidden=True,
            tags=[tag],
        )
        plan = run_careen(f"glance:{tag}-hidden", "-o", "glance:", "--dry-run", "--format", "json")
        assert plan.returncode == 0, plan.stderr
        assert json.loads(plan.stdout)["download"]["id"] == hidden["id"]

        for _ in range(2):
            make_image(demo, sample_qcow2, name=f"{tag}-twin", disk_format="qcow2", tags=[tag])
        assert_fails(
            run_careen(f"glance:{tag}-twin", "-o", "glance:"), 1, "2 images are named", "by its ID"
        )
        assert_fails(run_careen(f"glance:{tag}-nothing", "-o", "glance:"), 1, "no image named", "")
        assert_fails(
            run_careen("glance:0b5b0e5c-0000-4000-8000-00000000dead", "-o", "glance:"),
            1,
            "no image 0b5b0e5c",
            "check the ID",
        )

        public = make_image(
            cloud.admin_images,
            sample_qcow2,
            name=f"{tag}-pub",
            disk_format="qcow2",
            visibility="public",
            tags=[tag],
        )
        assert_fails(run_careen(f"glance:{public['id']}", "-o", "glance:"), 1, "is public", "admin")

        bad = make_image(demo, sample_qcow2, name=f"{tag}-bad", disk_format="qcow2", tags=[tag])
        stored = cloud.glance.file_store / bad["id"]
        with stored.open("r+b") as f:
            f.seek(1 << 20)
            f.write(b"careen was here")
        assert_fails(
            run_careen(f"glance:{bad['id']}", "-o", "glance:", *RECIPE),
            1,
            "does not match its sha512",
            "damaged",
        )

        names = sorted(i["name"] for i in listed(cloud, tag=tag))
        assert names == sorted(
            [
                f"{tag}-{n}"
                for n in ("queued", "deact", "ami", "hidden", "twin", "twin", "pub", "bad")
            ]
        )
        assert listed(cloud, name=tag) == []
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(600)
def test_refit_into_a_local_file(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tag: str, tmp_path: Path
) -> None:
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    try:
        out = tmp_path / "out.raw"
        proc = run_careen(f"glance:{tag}", "-o", str(out), "-O", "raw", *RECIPE)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(out)], capture_output=True, check=True
            ).stdout
        )
        assert info["format"] == "raw"
        assert [i["id"] for i in listed(cloud, name=tag)] == [src["id"]]
        assert [p.name for p in tmp_path.glob("careen-*")] == []
    finally:
        delete_everywhere(cloud, tag=tag)
