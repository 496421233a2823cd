"""A real Keystone on 127.0.0.1 for the tests: SQLite, fernet tokens, one gunicorn worker.

`start_keystone` prepares a fresh database and key repositories under its directory,
runs `keystone-manage bootstrap` (admin user and project, the standard roles, region
and identity endpoint) and serves `keystone.wsgi.api:application`. The helpers below
add projects, users and catalog entries through the identity API with openstacksdk.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openstack.config
from openstack.connection import Connection
from openstack.identity.v3._proxy import Proxy as IdentityProxy

from .process import (
    Daemon,
    free_port,
    gunicorn_argv,
    run_tool,
    run_tools,
    service_env,
    service_venv,
    start_daemon,
    stop_daemon,
    wait_http,
    write_ini,
)

REGION = "RegionOne"
DOMAIN = "Default"
WSGI_SHIM = """\
import sys

sys.argv[1:] = []
from keystone.wsgi.api import application  # noqa: E402
"""


@dataclass(frozen=True)
class Keystone:
    url: str  # the identity endpoint, without a version: http://127.0.0.1:PORT
    admin_password: str
    region: str
    daemon: Daemon
    root: Path

    @property
    def auth_url(self) -> str:
        return f"{self.url}/v3"

    def connect(self, username: str, password: str, project: str) -> Connection:
        """A connection with password auth, scoped to `project` (all in the default domain)."""
        region = openstack.config.OpenStackConfig(
            load_yaml_config=False, load_envvars=False
        ).get_one(
            auth_type="password",
            auth={
                "auth_url": self.auth_url,
                "username": username,
                "password": password,
                "project_name": project,
                "user_domain_name": DOMAIN,
                "project_domain_name": DOMAIN,
            },
            region_name=self.region,
            identity_api_version="3",
        )
        return Connection(config=region)

    def connect_admin(self) -> Connection:
        return self.connect("admin", self.admin_password, "admin")


def keystone_config(root: Path) -> dict[str, dict[str, str]]:
    return {
        "DEFAULT": {"debug": "False"},
        "database": {"connection": f"sqlite:///{root / 'keystone.sqlite'}"},
        "token": {"provider": "fernet"},
        "fernet_tokens": {"key_repository": str(root / "fernet-keys")},
        # Receipts (multi-factor auth) are not used; they share the token keys.
        "fernet_receipts": {"key_repository": str(root / "fernet-keys")},
        "credential": {"key_repository": str(root / "credential-keys")},
        # bcrypt's default 12 rounds cost a quarter second for every password check.
        "identity": {"password_hash_rounds": "4"},
        "oslo_concurrency": {"lock_path": str(root / "locks")},
    }


@contextmanager
def start_keystone(root: Path, *, timeout: float = 60) -> Iterator[Keystone]:
    """Bootstrap and serve a Keystone with all of its state under `root` (created)."""
    venv = service_venv("keystone")
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "keystone.conf"
    write_ini(conf, keystone_config(root))
    env = service_env(venv, root, {"OS_KEYSTONE_CONFIG_DIR": str(root)})
    log = root / "keystone.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    password = secrets.token_urlsafe(16)

    manage = [str(venv / "bin" / "keystone-manage"), "--config-file", str(conf)]
    # The key repositories belong to whoever serves Keystone: that is us.
    owner = ["--keystone-user", pwd.getpwuid(os.getuid()).pw_name]
    owner += ["--keystone-group", grp.getgrgid(os.getgid()).gr_name]
    # Independent of each other: the database, and the two key repositories.
    steps = [["db_sync"], ["fernet_setup", *owner], ["credential_setup", *owner]]
    run_tools([([*manage, *step], root / f"{step[0]}.log") for step in steps], env=env, cwd=root)
    bootstrap_env = {**env, "OS_BOOTSTRAP_PASSWORD": password}  # kept off the command line
    bootstrap = [
        "bootstrap",
        "--bootstrap-username=admin",
        "--bootstrap-project-name=admin",
        "--bootstrap-role-name=admin",
        f"--bootstrap-region-id={REGION}",
        f"--bootstrap-admin-url={url}",
        f"--bootstrap-internal-url={url}",
        f"--bootstrap-public-url={url}",
    ]
    run_tool([*manage, *bootstrap], env=bootstrap_env, log=root / "bootstrap.log", cwd=root)

    # Keystone's WSGI entry point hands sys.argv to oslo.config, which refuses gunicorn's
    # options; a module of our own empties it first.
    (root / "careen_keystone_wsgi.py").write_text(WSGI_SHIM)
    argv = gunicorn_argv(venv, "careen_keystone_wsgi:application", port, root)
    argv[1:1] = ["--pythonpath", str(root)]
    daemon = start_daemon("keystone", argv, env=env, log=log, cwd=root)
    try:
        wait_http(daemon, f"{url}/v3", timeout=timeout)
        yield Keystone(url, password, REGION, daemon, root)
    finally:
        stop_daemon(daemon)


def identity_v3(conn: Connection) -> IdentityProxy:
    """`conn.identity`, typed as the v3 API it is here (openstacksdk types it v2 or v3)."""
    proxy = conn.identity
    assert isinstance(proxy, IdentityProxy), f"not Keystone's v3 API: {proxy!r}"
    return proxy


def add_project(conn: Connection, name: str) -> str:
    """Create project `name` in the default domain; its ID."""
    project = identity_v3(conn).create_project(name=name, domain_id="default")
    return str(project.id)


def add_user(conn: Connection, name: str, password: str, project_id: str, roles: list[str]) -> str:
    """Create user `name` with `roles` on the project; its ID."""
    identity = identity_v3(conn)
    user = identity.create_user(
        name=name, password=password, domain_id="default", default_project_id=project_id
    )
    for role_name in roles:
        role = identity.find_role(role_name, ignore_missing=False)
        identity.assign_project_role_to_user(project_id, user, role)
    return str(user.id)


def add_service(
    conn: Connection, name: str, service_type: str, url: str, region: str, *, description: str = ""
) -> str:
    """Put a service with the same public, internal and admin URL into the catalog."""
    identity = identity_v3(conn)
    service = identity.create_service(name=name, type=service_type, description=description)
    for interface in ("public", "internal", "admin"):
        identity.create_endpoint(
            service_id=service.id, interface=interface, url=url, region_id=region
        )
    return str(service.id)
