"""A fleet of real images in the session's Glance, made once for the fleet tests.

Every image has an ID fixed here, so that a test can write out which images a filter
must select. Good images carry the demo's used Debian 12 (qcow2); the broken ones are
broken on purpose: a qcow2 cut after 4 MiB (Glance checks only the header), a raw disk
holding only an empty ext4 (no Linux root), and a good image that was deactivated. Each
test refits with a recipe of its own (reset-identity plus a property naming the test),
so that the provenance of one test's new images never makes another's sources look
refitted.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from glance.conftest import delete_everywhere, listed, make_image, show
from integration.util import careen
from services.cloud import Cloud

from careen.recipe import load as load_recipe
from careen.samples import Layout, sample_image

TAG = "careen-fleet"
PREFIX = "f1ee7000-0000-4000-8000-0000000000"
IDS = {
    name: f"{PREFIX}{n:02d}"
    for n, name in enumerate(
        [
            "deb-private",  # 00
            "deb-public",  # 01
            "deb-demo",  # 02
            "cent-shared",  # 03
            "cent-community",  # 04
            "deb-hidden",  # 05
            "refit-product",  # 06: made by an earlier refit of deb-private
            "broken-corrupt",  # 07
            "broken-noroot",  # 08
            "broken-deactivated",  # 09
            "other",  # 10: not in the fleet's tag
        ]
    )
}
GOOD = ["deb-private", "deb-public", "deb-demo", "cent-shared", "cent-community", "deb-hidden"]
BROKEN = ["broken-corrupt", "broken-noroot", "broken-deactivated"]
OLD_DATE = "2001-01-01T00:00:00Z"


@dataclass
class Fleet:
    cloud: Cloud
    images: dict[str, dict[str, Any]]  # by the names above

    def id(self, name: str) -> str:
        return IDS[name]


def _noroot_image(path: Path) -> Path:
    if not path.exists():
        with path.open("wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def fleet(cloud: Cloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet-images")
    good = sample_image(Layout.MBR_QCOW2)
    corrupt = work / "corrupt.qcow2"  # the first 4 MiB: a header, and tables into the void
    with good.open("rb") as f:
        corrupt.write_bytes(f.read(4 << 20))
    noroot = _noroot_image(work / "noroot.raw")
    admin, demo = cloud.admin_images, cloud.demo_images
    digest = load_recipe("reset-identity").digest
    # name: (who makes it, its data, its fields besides the defaults below)
    table: dict[str, tuple[Any, Path, dict[str, Any]]] = {
        "deb-private": (admin, good, {"os_distro": "debian", "visibility": "private"}),
        "deb-public": (
            admin,
            good,
            {"os_distro": "debian", "visibility": "public", "tags": [TAG, "gold"]},
        ),
        "deb-demo": (
            demo,
            good,
            {"os_distro": "debian", "visibility": "private", "os_version": "12"},
        ),
        "cent-shared": (admin, good, {"os_distro": "centos", "visibility": "shared"}),
        "cent-community": (admin, good, {"os_distro": "centos", "visibility": "community"}),
        "deb-hidden": (
            admin,
            good,
            {"os_distro": "debian", "visibility": "private", "os_hidden": True},
        ),
        "refit-product": (
            admin,
            good,
            {
                "name": "fleet-deb-private-refit",
                "os_distro": "debian",
                "careen_source_image": IDS["deb-private"],
                "careen_recipe_digest": digest,
            },
        ),
        "broken-corrupt": (admin, corrupt, {}),
        "broken-noroot": (admin, noroot, {"disk_format": "raw"}),
        "broken-deactivated": (admin, good, {}),
        "other": (
            admin,
            noroot,
            {"name": "other-image", "os_distro": "debian", "disk_format": "raw", "tags": []},
        ),
    }
    made: dict[str, dict[str, Any]] = {}
    for name, (api, data, fields) in table.items():
        body = {
            "name": f"fleet-{name}",
            "disk_format": "qcow2",
            "visibility": "private",
            "tags": [TAG],
            **fields,
        }
        made[name] = make_image(api, data, id=IDS[name], **body)
    r = admin.post(f"/images/{IDS['broken-deactivated']}/actions/deactivate")
    assert r.status_code == 204, r.text
    made = {k: show(admin, v["id"]) for k, v in made.items()}
    yield Fleet(cloud, made)
    delete_everywhere(cloud, tag=TAG)
    delete_everywhere(cloud, name="other-image")


def fleet_recipe(tmp_path: Path, test: str) -> tuple[Path, str]:
    """reset-identity with a property naming the test: a digest of the test's own."""
    text = load_recipe_text("reset-identity")
    path = tmp_path / f"{test}.yaml"
    path.write_text(text + f"properties:\n  set:\n    site_fleet_test: {test}\n")
    return path, load_recipe(str(path)).digest


def load_recipe_text(name: str) -> str:
    from importlib import resources

    return resources.files("careen.recipes").joinpath(f"{name}.yaml").read_text()


@pytest.fixture
def fleet_careen(tmp_path: Path) -> Iterator[Any]:
    """careen as the admin, with a private state directory that must end up empty."""
    state = tmp_path / "state"

    def run(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> Any:
        return careen(
            *args,
            tmpdir=tmp_path,
            timeout=timeout,
            env={"CAREEN_STATE_DIR": str(state), "OS_CLOUD": "careen-admin", **(env or {})},
        )

    run.state = state  # type: ignore[attr-defined]
    yield run
    journals = list((state / "runs").glob("*.journal")) if (state / "runs").exists() else []
    assert journals == [], [j.read_text() for j in journals]


def new_images(cloud: Cloud, digest: str) -> list[dict[str, Any]]:
    """Every image (hidden too, any project) a recipe with this digest produced."""
    return listed(cloud, careen_recipe_digest=digest, visibility="all")
