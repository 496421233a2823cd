"""The session fixtures `cloud` (a real Keystone and Glance), `ceph` (a real Ceph) and
`rabbitmq` (a real RabbitMQ), each started on first request.

Registered for the whole suite from tests/conftest.py, so any test can ask for them; a
run that asks for one pays its start once (Keystone and Glance with fresh databases, a
fresh Ceph cluster), a run that does not pays nothing. While `cloud` lives,
`OS_CLIENT_CONFIG_FILE` points at its clouds.yaml, so careen started from a test finds
`--os-cloud careen-demo`, and the caller's own `OS_*` variables are out of the way; while
`ceph` lives, `CEPH_CONF` points at its ceph.conf and the caller's `CEPH_ARGS` is gone;
`rabbitmq` gives its URL (with the password) as `url`, for workers' and coordinators'
`CAREEN_BROKER`.

A missing or stale service venv, or missing Ceph or RabbitMQ programs, skip (under CI
that fails the run, by the suite's skip rule); a service that does not start is an error,
never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .ceph import Ceph, missing_binaries, start_ceph
from .process import NotInstalled, group_alive, service_venv
from .rabbitmq import RabbitMQ, start_rabbitmq
from .rabbitmq import missing_binaries as rabbitmq_missing

if TYPE_CHECKING:  # openstacksdk is imported only by a run that starts the cloud
    from .cloud import Cloud


def assert_stopped(pids: list[int]) -> None:
    """Every service process, and every process of its group, is gone."""
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() or group_alive(pid)]
    assert alive == [], f"service processes (or their groups) still alive: {alive}"


@pytest.fixture(scope="session")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """Keystone and Glance for the whole session (see `Cloud`). The session shares them:
    a test deletes the images it makes."""
    from .cloud import start_cloud

    try:
        service_venv("keystone")
        service_venv("glance")
    except NotInstalled as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("cloud")
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("OS_")]:
            env.delenv(name)
        with start_cloud(root) as started:
            env.setenv("OS_CLIENT_CONFIG_FILE", str(started.clouds_yaml))
            pids = started.pids
            yield started
    assert_stopped(pids)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """A Ceph cluster with an rbd pool `images` for the whole session (see `Ceph`). The
    session shares the pool: a test removes the RBD images it makes."""
    if missing := missing_binaries():
        pytest.skip(f"no ceph: run scripts/setup --tests (missing {', '.join(missing)})")
    root = tmp_path_factory.mktemp("ceph")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("CEPH_ARGS", raising=False)
        with start_ceph(root) as started:
            env.setenv("CEPH_CONF", str(started.conf))
            pids = started.pids
            yield started
    assert_stopped(pids)


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """A RabbitMQ node with the vhost `careen` for the whole session (see `RabbitMQ`).
    The session shares it: a test uses queues of its own."""
    if missing := rabbitmq_missing():
        pytest.skip(f"no rabbitmq: run scripts/setup --tests (missing {', '.join(missing)})")
    root = tmp_path_factory.mktemp("rabbitmq")
    with start_rabbitmq(root) as started:
        pids = started.pids
        yield started
    assert_stopped(pids)
