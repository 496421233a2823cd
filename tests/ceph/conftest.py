"""A Glance whose default store is the session's Ceph (`ceph1`, thin provisioned), beside
the session's file-store Glance and against the same Keystone.

Glance's venv has no Ceph bindings of its own: Debian's `rados` and `rbd` modules (built
for the same interpreter) are put on its PYTHONPATH. careen reaches this Glance through
a clouds.yaml of its own (`ceph-admin`, `ceph-demo`), which overrides the image
endpoint.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.util import careen, careen_env, start_paused
from openstack.identity.v3._proxy import Proxy as IdentityV3
from services.ceph import Ceph
from services.cloud import Cloud, disconnect, image_v2
from services.glance import Glance

from careen.samples import Layout, sample_image

STORE = "ceph1"


@dataclass
class CephCloud:
    cloud: Cloud
    ceph: Ceph
    glance: Glance
    clouds_yaml: Path
    admin_images: Any
    demo_images: Any

    def images_in_pool(self) -> list[str]:
        return self.ceph.run("rbd", "ls", "-p", self.ceph.pool).split()

    def trash(self) -> list[str]:
        return self.ceph.run("rbd", "trash", "ls", "-p", self.ceph.pool).split()

    def snaps(self, image: str) -> list[dict[str, Any]]:
        out = self.ceph.run("rbd", "snap", "ls", f"{self.ceph.pool}/{image}", "--format", "json")
        return list(yaml.safe_load(out))


@contextmanager
def ceph_glance(
    cloud: Cloud,
    ceph: Ceph,
    root: Path,
    more: Mapping[str, Mapping[str, str]] = {},
) -> Iterator[CephCloud]:
    """A Glance on the session's Keystone whose default store is `ceph`'s pool, with
    `more` options, and a clouds.yaml for it: ceph-admin, ceph-demo, and ceph-service (the
    Glance service user, who has the service role)."""
    options = {**ceph.glance_store_options(STORE), **more}
    env = ceph.glance_env(root)
    with cloud.another_glance(
        root / "glance", backends={STORE: "rbd"}, options=options, env=env
    ) as glance:
        entries = yaml.safe_load(cloud.clouds_yaml.read_text())["clouds"]
        admin_entry = entries[cloud.admin_cloud]
        auth = {**admin_entry["auth"], **_operator_with_service_role(cloud)}
        clouds = {
            "ceph-admin": {**admin_entry, "image_endpoint_override": glance.url},
            "ceph-demo": {**entries[cloud.demo_cloud], "image_endpoint_override": glance.url},
            "ceph-service": {**admin_entry, "auth": auth, "image_endpoint_override": glance.url},
        }
        clouds_yaml = root / "clouds.yaml"
        clouds_yaml.write_text(yaml.safe_dump({"clouds": clouds}))
        clouds_yaml.chmod(0o600)
        admin = cloud.connect(cloud.admin_cloud, image_endpoint_override=glance.url)
        demo = cloud.connect(cloud.demo_cloud, image_endpoint_override=glance.url)
        try:
            yield CephCloud(cloud, ceph, glance, clouds_yaml, image_v2(admin), image_v2(demo))
        finally:
            disconnect(admin)
            disconnect(demo)


OPERATOR = "careen-operator"


def _operator_with_service_role(cloud: Cloud) -> dict[str, str]:
    """A user with the admin and service roles on project admin (made once): what the
    newer locations API wants for rbd:// URLs."""
    identity = cloud.admin.identity
    assert isinstance(identity, IdentityV3), identity
    password = "careen-" + OPERATOR
    if identity.find_user(OPERATOR) is None:
        user = identity.create_user(name=OPERATOR, password=password, domain_id="default")
        project = identity.find_project("admin")
        assert project is not None
        for role_name in ("admin", "service"):
            role = identity.find_role(role_name)
            assert role is not None, role_name
            identity.assign_project_role_to_user(project, user, role)
    return {"username": OPERATOR, "password": password, "project_name": "admin"}


@pytest.fixture(scope="session")
def ceph_cloud(
    cloud: Cloud, ceph: Ceph, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CephCloud]:
    with ceph_glance(cloud, ceph, tmp_path_factory.mktemp("glance-ceph")) as started:
        yield started


@pytest.fixture(scope="session")
def sample_raw() -> Path:
    """The MBR sample, raw: what an RBD store holds (read, never written)."""
    return sample_image(Layout.MBR)


@pytest.fixture
def tag() -> str:
    return f"careen-c-{uuid.uuid4().hex[:8]}"


def careen_ceph(
    cc: CephCloud,
    tmp_path: Path,
    *args: str,
    verb: str = "refit",
    cloud_name: str | None = "ceph-admin",
    ceph_conf: Path | None = None,
    env: Mapping[str, str] = {},
) -> subprocess.CompletedProcess[str]:
    """careen as a user of the Ceph-backed Glance, with client.careen's Ceph access
    (cleanup takes neither: its journal says where things are)."""
    return careen(
        verb,
        *args,
        *(_access(cc, cloud_name, ceph_conf) if verb != "cleanup" else []),
        tmpdir=tmp_path,
        timeout=400,
        env={**_env(cc, tmp_path), **env},
    )


def _access(cc: CephCloud, cloud_name: str | None, ceph_conf: Path | None) -> list[str]:
    ceph = cc.ceph
    out = ["--os-cloud", cloud_name] if cloud_name else []
    out += ["--ceph-conf", str(ceph_conf or ceph.conf), "--ceph-user", ceph.careen.id]
    return [*out, "--keyring", str(ceph.careen.keyring)]


def _env(cc: CephCloud, tmp_path: Path) -> dict[str, str]:
    return {
        "CAREEN_STATE_DIR": str(tmp_path / "state"),
        "OS_CLIENT_CONFIG_FILE": str(cc.clouds_yaml),
    }


def paused(
    cc: CephCloud, tmp_path: Path, stage: str, *args: str, ceph_conf: Path | None = None
) -> tuple[subprocess.Popen[str], Path]:
    """careen refit started in the background, waiting at `stage` until the returned
    marker file is removed (or a signal ends it)."""
    marker = tmp_path / "paused"
    env = {
        **careen_env(tmp_path),
        **_env(cc, tmp_path),
        "CAREEN_TEST_PAUSE": stage,
        "CAREEN_TEST_PAUSE_FILE": str(marker),
        "CAREEN_TEST_RESUME": "1",
    }
    argv = ["refit", *args, *_access(cc, "ceph-admin", ceph_conf)]
    proc = start_paused(argv, env, marker)
    return proc, marker


def impatient_conf(ceph: Ceph, dest: Path) -> Path:
    """A copy of the cluster's ceph.conf whose clients give up on an OSD after 3 s."""
    text = ceph.conf.read_text()
    assert "rados_osd_op_timeout" in text or "rados osd op timeout" in text, text
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip().replace(" ", "_")
        if key in ("rados_osd_op_timeout", "rados_mon_op_timeout"):
            line = f"{key} = 3"
        lines.append(line)
    dest.write_text("\n".join(lines) + "\n")
    os.chmod(dest, 0o644)
    return dest
