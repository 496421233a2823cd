"""What goes wrong on the way to Glance leaves no image behind, and the other upload paths.

A run paused after the new image was created is interrupted (Ctrl-C: careen deletes it)
or killed (`careen cleanup` deletes it from the journal). A second Glance refuses the
upload (`image_size_cap`) or the metadata (a property quota of 2); careen reports it on
one line and the new image is gone. The glance-direct import with a conversion to raw
publishes as the plain PUT does.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.util import assert_fails, careen, careen_env, start_paused
from services.cloud import Cloud, disconnect, image_v2

from .conftest import delete_everywhere, download, listed, make_image, sha512_file, show

pytestmark = [
    pytest.mark.glance,
    pytest.mark.root,
    pytest.mark.images,
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
]

RECIPE = ["-r", "reset-identity", "--backend", "host"]


def _paused(
    tmp_path: Path, source_id: str, tag: str, stage: str
) -> tuple[subprocess.Popen[str], Path]:
    marker = tmp_path / "paused"
    env = {
        **careen_env(tmp_path),
        "CAREEN_STATE_DIR": str(tmp_path / "state"),
        "CAREEN_TEST_PAUSE": stage,
        "CAREEN_TEST_PAUSE_FILE": str(marker),
    }
    argv = ["refit", f"glance:{source_id}", "-o", f"glance:{tag}-new", *RECIPE]
    proc = start_paused([*argv, "--os-cloud", "careen-demo"], env, marker)
    return proc, marker


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("stage", "how"),
    [("glance-download", "interrupt"), ("glance-upload", "interrupt"), ("glance-upload", "kill")],
)
def test_a_stopped_publish_leaves_no_image(
    cloud: Cloud, sample_qcow2: Path, tmp_path: Path, tag: str, stage: str, how: str
) -> None:
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    try:
        proc, _ = _paused(tmp_path, src["id"], tag, stage)
        queued = listed(cloud, name=f"{tag}-new")
        assert [i["status"] for i in queued] == ["queued"]
        assert queued[0]["careen_run"]
        if how == "interrupt":
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 130, err
        else:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            assert listed(cloud, name=f"{tag}-new") != []
            done = careen(
                "cleanup",
                tmpdir=tmp_path,
                env={"CAREEN_STATE_DIR": str(tmp_path / "state")},
            )
            assert done.returncode == 0, done.stderr
            assert "deleted the unfinished Glance image" in done.stdout
            assert not list((tmp_path / "state" / "runs").glob("*.journal"))
        assert listed(cloud, name=f"{tag}-new") == []
        assert [p.name for p in tmp_path.glob("careen-*")] == []
        assert show(cloud.admin_images, src["id"])["checksum"] == src["checksum"]
    finally:
        delete_everywhere(cloud, tag=tag)
        delete_everywhere(cloud, name=f"{tag}-new")


@pytest.mark.timeout(600)
def test_a_glance_that_refuses(cloud: Cloud, sample_qcow2: Path, tmp_path: Path, tag: str) -> None:
    options = {"DEFAULT": {"image_size_cap": str(sample_qcow2.stat().st_size + 4096)}}
    with cloud.another_glance(tmp_path / "g2", image_property_quota=6, options=options) as g2:
        entry = yaml.safe_load(cloud.clouds_yaml.read_text())["clouds"]["careen-demo"]
        clouds = tmp_path / "clouds.yaml"
        clouds.write_text(
            yaml.safe_dump({"clouds": {"g2": {**entry, "image_endpoint_override": g2.url}}})
        )
        conn = cloud.connect(cloud.demo_cloud, image_endpoint_override=g2.url)
        images = image_v2(conn)
        try:
            src = make_image(images, sample_qcow2, name=tag, disk_format="qcow2")
            env = {"OS_CLIENT_CONFIG_FILE": str(clouds), "CAREEN_STATE_DIR": str(tmp_path / "s")}

            def run(*extra: str) -> Any:
                return careen(
                    "refit",
                    f"glance:{src['id']}",
                    "-o",
                    "glance:",
                    "--os-cloud",
                    "g2",
                    *extra,
                    tmpdir=tmp_path,
                    env=env,
                    timeout=400,
                )

            # Five careen_* keys, the run key and the recipe's: more than 6 properties.
            recipe = tmp_path / "props.yaml"
            recipe.write_text("properties: {set: {hw_qemu_guest_agent: 'yes'}}\nsteps: []\n")
            refused = run("-r", str(recipe), "--backend", "host")
            assert_fails(refused, 1, "number of allowed image properties. Attempted: 7", "unset")
            assert "<" not in refused.stderr
            # The raw data is bigger than image_size_cap: the upload is refused.
            big = run(*RECIPE, "--disk-format", "raw")
            # Glance answers 413, or (when it closes the connection before the client has
            # sent everything) the answer is lost and careen says what it knows.
            refusal = "refused to upload the data: HTTP 413|connection broke while sending"
            assert_fails(big, 1, refusal, "quota")
            assert "Deleted the unfinished new image" in big.stderr
            # Everything of the source's images named tag: only the source.
            after = images.get("/images", params={"name": tag}).json()["images"]
            assert [i["id"] for i in after] == [src["id"]]
        finally:
            disconnect(conn)


@pytest.mark.timeout(600)
def test_import_into_a_store_as_raw(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tmp_path: Path, tag: str
) -> None:
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    try:
        args = ["-o", "glance:", "--import", "--store", "file1", "--disk-format", "raw"]
        proc = run_careen(f"glance:{src['id']}", *args, *RECIPE, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        new_id = json.loads(proc.stdout)["glance"]["new_image"]["id"]
        new = show(cloud.admin_images, new_id)
        assert (new["status"], new["disk_format"], new["stores"]) == ("active", "raw", "file1")
        data = download(cloud.admin_images, new_id, tmp_path / "new.raw")
        assert new["os_hash_value"] == sha512_file(data)
        assert new["virtual_size"] == new["size"] == os.path.getsize(data)
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(300)
def test_content_must_match_glances_disk_format(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tag: str
) -> None:
    try:
        r = cloud.demo_images.post(
            "/images",
            json={"name": tag, "disk_format": "raw", "container_format": "bare", "tags": [tag]},
        )
        image_id = r.json()["id"]
        with sample_qcow2.open("rb") as f:
            up = cloud.demo_images.put(
                f"/images/{image_id}/file",
                data=f,
                headers={"Content-Type": "application/octet-stream"},
            )
        # The pinned Glance takes it: careen's own probe is what stands in the way.
        assert up.status_code == 204, up.text
        assert_fails(
            run_careen(f"glance:{image_id}", "-o", "glance:", *RECIPE),
            1,
            "recorded as raw but its content is qcow2",
            "",
        )
        assert [i["id"] for i in listed(cloud, tag=tag)] == [image_id]
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(600)
def test_an_image_without_hashes(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tmp_path: Path, tag: str
) -> None:
    """Images from before Glance kept os_hash_*, or registered by location, have none."""
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    try:
        with sqlite3.connect(cloud.glance.root / "glance.sqlite") as db:
            db.execute(
                "UPDATE images SET checksum = NULL, os_hash_algo = NULL, os_hash_value = NULL "
                "WHERE id = ?",
                (src["id"],),
            )
        assert show(cloud.demo_images, src["id"]).get("checksum") is None
        proc = run_careen(f"glance:{src['id']}", "-o", "glance:", *RECIPE, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        assert "has no checksum or os_hash_value: its data cannot be checked" in proc.stderr
        new = show(cloud.admin_images, json.loads(proc.stdout)["glance"]["new_image"]["id"])
        data = download(cloud.admin_images, new["id"], tmp_path / "new")
        assert (new["status"], new["os_hash_value"]) == ("active", sha512_file(data))
    finally:
        delete_everywhere(cloud, tag=tag)


@pytest.mark.timeout(300)
def test_no_room_for_the_download(
    cloud: Cloud, sample_qcow2: Path, run_careen: Any, tmp_path: Path, tag: str
) -> None:
    src = make_image(cloud.demo_images, sample_qcow2, name=tag, disk_format="qcow2", tags=[tag])
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        proc = run_careen(f"glance:{src['id']}", "-o", "glance:", "--workdir", str(small))
        assert_fails(proc, 1, "MiB free; image .* needs about", "--workdir")
        assert [i["id"] for i in listed(cloud, name=tag)] == [src["id"]]
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
        delete_everywhere(cloud, tag=tag)
