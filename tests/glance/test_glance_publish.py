"""`careen publish FILE --like glance:ID` against the suite's real Keystone and Glance.

The file is the MBR sample converted to raw; the --like image is a qcow2 upload of the
same sample with a few properties and a member. What Glance serves afterwards is
compared with the file by qemu-img, and the metadata by the literal values below.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from integration.util import assert_fails
from services.cloud import Cloud

from .conftest import delete_everywhere, download, listed, make_image, sha512_file, show

pytestmark = [
    pytest.mark.glance,
    pytest.mark.images,
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
]


@pytest.fixture(scope="module")
def raw_file(sample_qcow2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("publish") / "refitted.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(sample_qcow2), str(out)],
        check=True,
    )
    return out


def _like(cloud: Cloud, sample: Path, tag: str, **extra: Any) -> dict[str, Any]:
    img = make_image(
        cloud.demo_images,
        sample,
        name=tag,
        disk_format="qcow2",
        visibility="shared",
        min_ram=256,
        tags=[tag],
        os_distro="debian",
        hw_disk_bus="scsi",
        instance_uuid="0b5b0e5c-0000-4000-8000-000000000009",
        **extra,
    )
    r = cloud.demo_images.post(f"/images/{img['id']}/members", json={"member": "partner-2"})
    assert r.status_code == 200, r.text
    return img


BACKED = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]


def _same_data(a: Path, b: Path) -> None:
    done = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(600)
def test_publish_converts_and_takes_the_metadata(
    cloud: Cloud, sample_qcow2: Path, raw_file: Path, run_careen: Any, tmp_path: Path, tag: str
) -> None:
    like = _like(cloud, sample_qcow2, tag)
    recipe = tmp_path / "site.yaml"
    recipe.write_text(
        "name: site-fix\nproperties: {set: {hw_qemu_guest_agent: 'yes'}, unset: [hw_disk_bus]}\n"
        "steps: []\n"
    )
    try:
        args = [str(raw_file), "--like", f"glance:{tag}", "-r", str(recipe)]
        args += ["--retire", "hide", "--take-name", "--format", "json"]
        proc = run_careen(*args, verb="publish")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        new = show(cloud.admin_images, out["glance"]["new_image"]["id"])
        assert (new["status"], new["disk_format"], new["name"]) == ("active", "qcow2", tag)
        assert (new["visibility"], new["min_ram"]) == ("shared", 256)
        assert new["os_distro"] == "debian"
        assert new["hw_qemu_guest_agent"] == "yes"
        assert "hw_disk_bus" not in new
        assert "instance_uuid" not in new
        assert new["careen_source_image"] == like["id"]
        assert new["careen_recipe"] == "site-fix"
        assert len(new["careen_recipe_digest"]) == 16
        members = cloud.demo_images.get(f"/images/{new['id']}/members").json()["members"]
        assert [m["member_id"] for m in members] == ["partner-2"]
        served = download(cloud.admin_images, new["id"], tmp_path / "served.qcow2")
        assert new["os_hash_value"] == sha512_file(served)
        _same_data(served, raw_file)

        old = show(cloud.admin_images, like["id"])
        assert (old["status"], old["os_hidden"], old["checksum"]) == (
            "active",
            True,
            like["checksum"],
        )
        assert [p.name for p in tmp_path.glob("careen-*")] == []
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(600)
def test_publish_as_is_without_a_recipe(
    cloud: Cloud, sample_qcow2: Path, raw_file: Path, run_careen: Any, tmp_path: Path, tag: str
) -> None:
    like = _like(cloud, sample_qcow2, tag)
    try:
        args = [str(raw_file), "--like", f"glance:{like['id']}", "--name", f"{tag}-raw"]
        proc = run_careen(*args, "--disk-format", "raw", "--format", "json", verb="publish")
        assert proc.returncode == 0, proc.stderr
        new = show(cloud.admin_images, json.loads(proc.stdout)["glance"]["new_image"]["id"])
        assert (new["disk_format"], new["name"]) == ("raw", f"{tag}-raw")
        assert new["os_hash_value"] == sha512_file(raw_file)
        assert new["careen_source_image"] == like["id"]
        assert "careen_recipe" not in new
        assert show(cloud.admin_images, like["id"])["os_hidden"] is False
    finally:
        delete_everywhere(cloud, tag=tag)
        delete_everywhere(cloud, name=f"{tag}-raw")


@pytest.mark.timeout(300)
def test_publish_refusals_create_nothing(
    cloud: Cloud, sample_qcow2: Path, raw_file: Path, run_careen: Any, tmp_path: Path, tag: str
) -> None:
    like = _like(cloud, sample_qcow2, tag)
    try:
        ref = f"glance:{like['id']}"
        assert_fails(
            run_careen(str(raw_file), "--like", like["id"], verb="publish"),
            2,
            "--like takes a Glance image",
            "glance:ID",
        )
        overlay = tmp_path / "overlay.qcow2"
        subprocess.run(
            [*BACKED, str(sample_qcow2), str(overlay)],
            check=True,
        )
        assert_fails(run_careen(str(overlay), "--like", ref, verb="publish"), 1, "backing file", "")
        assert_fails(
            run_careen(str(tmp_path / "nothing.raw"), "--like", ref, verb="publish"),
            1,
            "nothing.raw",
            "",
        )
        public = make_image(
            cloud.admin_images,
            sample_qcow2,
            name=f"{tag}-pub",
            disk_format="qcow2",
            visibility="public",
            tags=[tag],
        )
        assert_fails(
            run_careen(str(raw_file), "--like", f"glance:{public['id']}", verb="publish"),
            1,
            "is public",
            "admin",
        )
        plan = run_careen(
            str(raw_file), "--like", ref, "--dry-run", "--format", "json", verb="publish"
        )
        assert plan.returncode == 0, plan.stderr
        body = json.loads(plan.stdout)
        assert body["file"] == {"path": str(raw_file), "format": "raw"}
        assert body["create"]["disk_format"] == "qcow2"
        assert sorted(i["name"] for i in listed(cloud, tag=tag)) == [tag, f"{tag}-pub"]
        assert listed(cloud, name=tag) == [show(cloud.admin_images, like["id"])]
    finally:
        delete_everywhere(cloud, tag=tag)
