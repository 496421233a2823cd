"""Helpers for the Glance tests: images made through the raw API, and careen as a user.

Images are created with the API's own fields (every property at the top level), so the
test, not openstacksdk, decides what the source carries. `careen_as` runs the CLI with
the session cloud's clouds.yaml and a private state directory.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.util import careen
from services.cloud import Cloud

from careen.samples import Layout, sample_image

MiB = 1 << 20


def sha512_file(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def show(images: Any, image_id: str) -> dict[str, Any]:
    r = images.get(f"/images/{image_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def make_image(images: Any, path: Path | None, **fields: Any) -> dict[str, Any]:
    """Create an image with exactly `fields` and, given `path`, upload its data."""
    body = {"container_format": "bare", **fields}
    r = images.post("/images", json=body)
    assert r.status_code == 201, r.text
    image_id = r.json()["id"]
    if path is not None:
        with path.open("rb") as f:
            up = images.put(
                f"/images/{image_id}/file",
                data=f,
                headers={"Content-Type": "application/octet-stream"},
            )
        assert up.status_code == 204, up.text
    return show(images, image_id)


def delete_everywhere(cloud: Cloud, **query: str) -> None:
    """Delete (as admin) every image matching `query`, hidden and protected ones too."""
    images = cloud.admin_images
    for hidden in ("false", "true"):
        listing = images.get("/images", params={**query, "os_hidden": hidden}).json()
        for img in listing["images"]:
            if img.get("protected"):
                images.patch(
                    f"/images/{img['id']}",
                    json=[{"op": "replace", "path": "/protected", "value": False}],
                    headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
                )
            images.delete(f"/images/{img['id']}")


def listed(cloud: Cloud, **query: str) -> list[dict[str, Any]]:
    """Every image matching `query`, seen by admin (all projects), hidden included."""
    out = []
    for hidden in ("false", "true"):
        listing = cloud.admin_images.get("/images", params={**query, "os_hidden": hidden})
        out += listing.json()["images"]
    return out


@pytest.fixture(scope="session")
def sample_qcow2() -> Path:
    return sample_image(Layout.MBR_QCOW2)


@pytest.fixture
def tag() -> str:
    """A unique tag and name prefix for this test's images."""
    return f"careen-t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def run_careen(tmp_path: Path) -> Iterator[Any]:
    state = tmp_path / "state"

    def run(
        *args: str, cloud_name: str = "careen-demo", timeout: float = 400, verb: str = "refit"
    ) -> Any:
        return careen(
            verb,
            *args,
            "--os-cloud",
            cloud_name,
            tmpdir=tmp_path,
            timeout=timeout,
            env={"CAREEN_STATE_DIR": str(state)},
        )

    yield run
    journals = list((state / "runs").glob("*.journal")) if (state / "runs").exists() else []
    assert journals == [], [j.read_text() for j in journals]


def download(images: Any, image_id: str, dest: Path) -> Path:
    r = images.get(f"/images/{image_id}/file", stream=True)
    assert r.status_code == 200, r.text
    with dest.open("wb") as f:
        for chunk in r.iter_content(chunk_size=MiB):
            f.write(chunk)
    return dest
