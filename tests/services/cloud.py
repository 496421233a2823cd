"""A small cloud for the tests: Keystone and Glance on 127.0.0.1, and a clouds.yaml.

Accounts, all in the default domain:

- `admin` (admin role on project `admin`), cloud `careen-admin`;
- `demo` (member role on project `demo`), cloud `careen-demo`, an ordinary user;
- `glance` (service role on project `service`), the user Glance validates tokens with.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openstack.config
import yaml
from keystoneauth1.identity import BaseIdentityPlugin
from openstack.connection import Connection
from openstack.image.v2._proxy import Proxy as ImageProxy

from .glance import Glance, ServiceAuth, start_glance
from .keystone import Keystone, add_project, add_service, add_user, start_keystone

ADMIN_CLOUD = "careen-admin"
DEMO_CLOUD = "careen-demo"


@dataclass
class Cloud:
    """What the `cloud` fixture yields: the clouds.yaml and its cloud names, the services,
    and open connections as admin and as demo (`admin_images` and `demo_images` are their
    image APIs)."""

    root: Path  # every service's state lives under it
    clouds_yaml: Path
    keystone: Keystone
    glance: Glance
    glance_auth: ServiceAuth
    admin: Connection
    demo: Connection
    demo_project_id: str
    admin_cloud: str = ADMIN_CLOUD
    demo_cloud: str = DEMO_CLOUD

    @property
    def glance_url(self) -> str:
        return self.glance.url

    @property
    def admin_images(self) -> ImageProxy:
        return image_v2(self.admin)

    @property
    def demo_images(self) -> ImageProxy:
        return image_v2(self.demo)

    @property
    def pids(self) -> list[int]:
        return [self.keystone.daemon.pid, self.glance.daemon.pid]

    def connect(self, cloud: str, **overrides: Any) -> Connection:
        """A new connection to `cloud` from this clouds.yaml; `overrides` as in clouds.yaml
        (`image_endpoint_override=URL` talks to another Glance)."""
        return connect(self.clouds_yaml, cloud, **overrides)

    @contextmanager
    def another_glance(
        self,
        root: Path,
        *,
        image_property_quota: int | None = None,
        options: Mapping[str, Mapping[str, str]] = {},
        backends: Mapping[str, str] = {},
        env: Mapping[str, str] = {},
        access_log: Path | None = None,
    ) -> Iterator[Glance]:
        """A second Glance against the same Keystone, with its own database and store, for
        a test that needs other settings (not in the catalog: connect with
        `image_endpoint_override`); `access_log` as in `start_glance`."""
        with start_glance(
            root,
            self.glance_auth,
            image_property_quota=image_property_quota,
            options=options,
            backends=backends,
            env=env,
            access_log=access_log,
        ) as glance:
            yield glance


def image_v2(conn: Connection) -> ImageProxy:
    """`conn.image`, typed as the v2 API it is here (openstacksdk types it v1 or v2)."""
    proxy = conn.image
    assert isinstance(proxy, ImageProxy), f"not Glance's v2 API: {proxy!r}"
    return proxy


def token_roles(conn: Connection) -> list[str]:
    """The role names in `conn`'s current token."""
    auth = conn.session.auth
    assert isinstance(auth, BaseIdentityPlugin)
    return list(auth.get_access(conn.session).role_names or [])


def disconnect(conn: Connection) -> None:
    """Close `conn` with its pooled HTTP connections: openstacksdk's `close()` leaves the
    pool of a session made from a config open, and a stopping gunicorn waits for those."""
    conn.close()
    conn.session.session.close()


def connect(clouds_yaml: Path, cloud: str, **overrides: Any) -> Connection:
    config = openstack.config.OpenStackConfig(
        config_files=[str(clouds_yaml)], vendor_files=[], secure_files=[], load_envvars=False
    )
    return Connection(config=config.get_one(cloud=cloud, **overrides))


def cloud_entry(keystone: Keystone, username: str, password: str, project: str) -> dict[str, Any]:
    return {
        "auth_type": "password",
        "auth": {
            "auth_url": keystone.auth_url,
            "username": username,
            "password": password,
            "project_name": project,
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        },
        "region_name": keystone.region,
        "identity_api_version": "3",
        "image_api_version": "2",
        "interface": "public",
    }


@contextmanager
def start_cloud(root: Path) -> Iterator[Cloud]:
    """Keystone, then the accounts, then Glance and its catalog entry; all under `root`."""
    with ExitStack() as stack:
        keystone = stack.enter_context(start_keystone(root / "keystone"))
        bootstrap = keystone.connect_admin()
        stack.callback(disconnect, bootstrap)

        service_project = add_project(bootstrap, "service")
        glance_auth = ServiceAuth(keystone.auth_url, "glance", secrets.token_urlsafe(16))
        add_user(bootstrap, "glance", glance_auth.password, service_project, ["service"])
        demo_project = add_project(bootstrap, "demo")
        demo_password = secrets.token_urlsafe(16)
        add_user(bootstrap, "demo", demo_password, demo_project, ["member"])

        glance = stack.enter_context(start_glance(root / "glance", glance_auth))
        add_service(bootstrap, "glance", "image", glance.url, keystone.region)

        clouds_yaml = root / "clouds.yaml"
        clouds = {
            ADMIN_CLOUD: cloud_entry(keystone, "admin", keystone.admin_password, "admin"),
            DEMO_CLOUD: cloud_entry(keystone, "demo", demo_password, "demo"),
        }
        clouds_yaml.write_text(yaml.safe_dump({"clouds": clouds}, sort_keys=False))
        clouds_yaml.chmod(0o600)
        admin = connect(clouds_yaml, ADMIN_CLOUD)
        stack.callback(disconnect, admin)
        demo = connect(clouds_yaml, DEMO_CLOUD)
        stack.callback(disconnect, demo)
        yield Cloud(root, clouds_yaml, keystone, glance, glance_auth, admin, demo, demo_project)
