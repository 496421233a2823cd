"""A real glance-api on 127.0.0.1 for the tests, behind keystonemiddleware.

`start_glance` writes a multi-store configuration (`file1`, a file store, is the
default), syncs a fresh SQLite database and serves `glance.wsgi.api:application` under
gunicorn with one worker. Locations and direct URLs are shown, and the interoperable
import is enabled with `glance-direct` and `web-download`. More stores come in through
`backends` and their sections through `options`; the Ceph work adds `ceph1: rbd` that way:

    start_glance(root, auth, backends={"ceph1": "rbd"},
                 options={"ceph1": {"rbd_store_pool": "images", ...}})
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .process import (
    Daemon,
    free_port,
    gunicorn_argv,
    merge_sections,
    run_tool,
    service_env,
    service_venv,
    start_daemon,
    stop_daemon,
    wait_http,
    write_ini,
)

FILE_STORE = "file1"


# Modules that run inside the service's process (see tests/services/inside).
INSIDE = Path(__file__).resolve().parent / "inside"


@dataclass(frozen=True)
class ServiceAuth:
    """How Glance's keystonemiddleware validates tokens: its own service user."""

    auth_url: str  # Keystone's, with /v3
    username: str
    password: str
    project: str = "service"
    region: str = "RegionOne"


@dataclass(frozen=True)
class Glance:
    url: str  # http://127.0.0.1:PORT, what the catalog lists
    root: Path
    daemon: Daemon

    @property
    def file_store(self) -> Path:
        """Where the `file1` store keeps image data."""
        return self.root / "images"


def glance_config(
    root: Path,
    url: str,
    venv: Path,
    auth: ServiceAuth,
    backends: Mapping[str, str],
    image_property_quota: int | None,
) -> dict[str, dict[str, str]]:
    stores = {FILE_STORE: "file", **backends}
    default: dict[str, str] = {
        "debug": "False",
        "enabled_backends": ", ".join(f"{name}:{kind}" for name, kind in stores.items()),
        # Both are deprecated, and both still work; careen reads locations through them.
        "show_multiple_locations": "True",
        "show_image_direct_url": "True",
        # A list option with bounds: the brackets are required.
        "enabled_import_methods": "[glance-direct,web-download]",
        # Where another worker would send a request for data this one staged.
        "worker_self_reference_url": url,
    }
    if image_property_quota is not None:
        default["image_property_quota"] = str(image_property_quota)
    return {
        "DEFAULT": default,
        "database": {"connection": f"sqlite:///{root / 'glance.sqlite'}"},
        "glance_store": {"default_backend": FILE_STORE},
        FILE_STORE: {"filesystem_store_datadir": str(root / "images")},
        # Reserved stores: data staged for import, and the tasks' work files.
        "os_glance_staging_store": {"filesystem_store_datadir": str(root / "staging")},
        "os_glance_tasks_store": {"filesystem_store_datadir": str(root / "tasks")},
        "keystone_authtoken": {
            "www_authenticate_uri": auth.auth_url,
            "auth_url": auth.auth_url,
            "auth_type": "password",
            "username": auth.username,
            "password": auth.password,
            "project_name": auth.project,
            "user_domain_name": "Default",
            "project_domain_name": "Default",
            "region_name": auth.region,
            "service_token_roles_required": "True",
        },
        "paste_deploy": {
            "flavor": "keystone",
            # The pipeline definitions ship with the package, in the venv's etc/.
            "config_file": str(venv / "etc" / "glance" / "glance-api-paste.ini"),
        },
        "oslo_concurrency": {"lock_path": str(root / "locks")},
    }


@contextmanager
def start_glance(
    root: Path,
    auth: ServiceAuth,
    *,
    backends: Mapping[str, str] = {},
    options: Mapping[str, Mapping[str, str]] = {},
    image_property_quota: int | None = None,
    env: Mapping[str, str] = {},
    timeout: float = 60,
    access_log: Path | None = None,
) -> Iterator[Glance]:
    """Serve a Glance with all of its state under `root` (created).

    `backends` adds stores to `enabled_backends` (name: kind); `options` adds or replaces
    options by section, after everything else (so it can also change `DEFAULT`);
    `image_property_quota` lowers the number of properties an image may have (Glance's
    default is 128); `env` adds to the service's environment (a `CEPH_CONF`, say);
    `access_log` is a file where gunicorn logs every request (see `gunicorn_argv`).
    """
    venv = service_venv("glance")
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "staging", "tasks", "locks"):
        (root / sub).mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = glance_config(root, url, venv, auth, backends, image_property_quota)
    conf = root / "glance-api.conf"
    write_ini(conf, merge_sections(config, options))
    # The WSGI shim and the SQLite lock fix come first on the path (see tests/services/inside).
    path = ":".join(p for p in (str(INSIDE), env.get("PYTHONPATH", "")) if p)
    service = service_env(
        venv, root, {"OS_GLANCE_CONFIG_DIR": str(root), **env, "PYTHONPATH": path}
    )
    log = root / "glance.log"

    run_tool(
        [venv / "bin" / "glance-manage", "--config-file", conf, "db_sync"],
        env=service,
        log=log,
        cwd=root,
    )
    argv = gunicorn_argv(
        venv, "glance_wsgi:application", port, root, threads=8, access_log=access_log
    )
    daemon = start_daemon("glance", argv, env=service, log=log, cwd=root)
    try:
        wait_http(daemon, f"{url}/healthcheck", timeout=timeout)
        yield Glance(url, root, daemon)
    finally:
        stop_daemon(daemon)
