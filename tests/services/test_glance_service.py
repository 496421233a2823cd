"""The suite's Keystone and Glance are real, and the session fixture `cloud` works.

These prove the ground the Glance tests stand on: password auth from a clouds.yaml as
an admin and as an ordinary member, upload and download with Glance's own sha512, the
interoperable import, what an admin sees of a member's image, deletion, and a second
Glance with a low property quota. The fixture itself checks at the end of the session
that every service process is gone.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openstack
import pytest
from openstack import exceptions
from openstack.connection import Connection
from openstack.image.v2.image import Image

from .cloud import Cloud, disconnect, image_v2, token_roles

pytestmark = [
    pytest.mark.glance,
    # openstacksdk warns about its own internals (RemovedInSDK50Warning and the like).
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack"),
]

MiB = 1 << 20


def sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def shown(conn: Connection, image_id: str) -> dict[str, Any]:
    """The image as the API shows it (openstacksdk's Image leaves out fields it does not
    know, `stores` among them)."""
    response = image_v2(conn).get(f"/images/{image_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real qcow2 of a few MiB: Glance inspects uploads and refuses data that is not in
    the image's disk_format."""
    work = tmp_path_factory.mktemp("glance-data")
    raw = work / "disk.raw"
    raw.write_bytes(os.urandom(4 * MiB))
    out = work / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out], check=True)
    return out


@pytest.fixture
def demo_image(cloud: Cloud, qcow2: Path) -> Iterator[Image]:
    """An active private image of project demo, uploaded by demo (deleted afterwards)."""
    image = cloud.demo_images.create_image(
        "careen-test-upload",
        filename=str(qcow2),
        disk_format="qcow2",
        container_format="bare",
        allow_duplicates=True,
        wait=True,
        timeout=60,
    )
    yield image
    cloud.demo_images.delete_image(image, ignore_missing=True)


@pytest.mark.timeout(180)
def test_clouds_yaml_names_both_users(cloud: Cloud) -> None:
    assert os.environ["OS_CLIENT_CONFIG_FILE"] == str(cloud.clouds_yaml)
    # Through OS_CLIENT_CONFIG_FILE, the way careen and the openstack client find it.
    conn = openstack.connect(cloud=cloud.demo_cloud)
    try:
        assert str(image_v2(conn).get_endpoint()).rstrip("/") == f"{cloud.glance_url}/v2"
        assert "member" in token_roles(conn)
        assert "admin" not in token_roles(conn)
        assert conn.current_project_id == cloud.demo_project_id
    finally:
        disconnect(conn)
    assert "admin" in token_roles(cloud.admin)
    methods = cloud.demo_images.get_import_info().import_methods["value"]
    assert {"glance-direct", "web-download"} <= set(methods)
    assert [s.id for s in cloud.demo_images.stores()] == ["file1"]


@pytest.mark.timeout(180)
def test_upload_and_download_as_demo(
    cloud: Cloud, qcow2: Path, demo_image: Image, tmp_path: Path
) -> None:
    image = cloud.demo_images.get_image(demo_image.id)
    assert image.status == "active"
    assert image.owner == cloud.demo_project_id
    assert image.visibility == "shared"  # Glance's default for a new image
    assert image.size == qcow2.stat().st_size
    assert (image.hash_algo, image.hash_value) == ("sha512", sha512(qcow2))
    assert shown(cloud.demo, image.id)["stores"] == "file1"

    back = tmp_path / "back.qcow2"
    cloud.demo_images.download_image(image, output=str(back))
    assert sha512(back) == sha512(qcow2)

    # show_image_direct_url and show_multiple_locations: the data lies in the file store
    # under the cloud's own directory.
    stored = cloud.glance.file_store / image.id
    assert image.direct_url == f"file://{stored}"
    assert [loc["url"] for loc in image.locations] == [f"file://{stored}"]
    assert sha512(stored) == sha512(qcow2)


@pytest.mark.timeout(180)
def test_glance_direct_import(cloud: Cloud, qcow2: Path) -> None:
    images = cloud.demo_images
    image = images.create_image(
        "careen-test-import", disk_format="qcow2", container_format="bare", allow_duplicates=True
    )
    try:
        assert image.status == "queued"
        images.stage_image(image, filename=str(qcow2))
        assert images.get_image(image.id).status == "uploading"
        images.import_image(image, method="glance-direct")
        active = images.wait_for_status(
            image, status="active", failures=["killed", "deleted"], interval=0.5, wait=60
        )
        assert (active.hash_algo, active.hash_value) == ("sha512", sha512(qcow2))
        assert active.size == qcow2.stat().st_size
        assert shown(cloud.demo, image.id)["stores"] == "file1"
    finally:
        images.delete_image(image, ignore_missing=True)


@pytest.mark.timeout(180)
def test_admin_sees_a_members_private_image(cloud: Cloud, demo_image: Image) -> None:
    cloud.demo_images.update_image(demo_image, visibility="private")
    # Glance's v2 API has no all_projects: an admin's listing covers every project.
    every = {i.id: i for i in cloud.admin_images.images()}
    assert every[demo_image.id].visibility == "private"
    owned = {i.id: i.owner for i in cloud.admin_images.images(owner=cloud.demo_project_id)}
    assert demo_image.id in owned
    assert set(owned.values()) == {cloud.demo_project_id}

    mine = cloud.admin_images.create_image(
        "careen-test-admin", disk_format="qcow2", container_format="bare", allow_duplicates=True
    )
    try:
        cloud.admin_images.update_image(mine, visibility="private")
        assert mine.id not in {i.id for i in cloud.demo_images.images()}
        with pytest.raises(exceptions.NotFoundException):
            cloud.demo_images.get_image(mine.id)
    finally:
        cloud.admin_images.delete_image(mine)


@pytest.mark.timeout(180)
def test_delete(cloud: Cloud, demo_image: Image) -> None:
    stored = cloud.glance.file_store / demo_image.id
    assert stored.exists()
    cloud.demo_images.delete_image(demo_image, ignore_missing=False)
    with pytest.raises(exceptions.NotFoundException):
        cloud.demo_images.get_image(demo_image.id)
    assert demo_image.id not in {i.id for i in cloud.admin_images.images()}
    assert not stored.exists()


@pytest.mark.timeout(180)
def test_a_second_glance_with_a_low_property_quota(cloud: Cloud, tmp_path: Path) -> None:
    with cloud.another_glance(tmp_path / "glance", image_property_quota=2) as glance:
        conn = cloud.connect(cloud.demo_cloud, image_endpoint_override=glance.url)
        images = image_v2(conn)
        try:
            base = {"name": "careen-test-quota", "disk_format": "raw", "container_format": "bare"}
            # The raw API, so that nothing adds properties of its own.
            refused = images.post("/images", json={**base, "a": "1", "b": "2", "c": "3"})
            assert refused.status_code == 413, refused.text
            made = images.post("/images", json={**base, "a": "1", "b": "2"})
            assert made.status_code == 201, made.text
            assert made.json()["owner"] == cloud.demo_project_id
        finally:
            disconnect(conn)
    # The session's own Glance keeps the default quota (128).
    assert cloud.glance.daemon.process.poll() is None
