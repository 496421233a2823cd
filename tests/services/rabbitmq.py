"""A real RabbitMQ (Debian's rabbitmq-server) on 127.0.0.1 for the tests.

`start_rabbitmq` keeps everything under one directory: the node's data
(`RABBITMQ_MNESIA_BASE`), its logs, its configuration (`RABBITMQ_CONFIG_FILE`, an empty
`RABBITMQ_CONF_ENV_FILE`, its own plugins and advanced-config paths) and a HOME for the
Erlang cookie. The node has a name of its own, listens on free ports of 127.0.0.1 only
(AMQP and Erlang distribution) and registers with an epmd the test starts on a free
port, so it never meets a broker the host runs (Debian's service, on 5672 and epmd's
4369). The broker's `consumer_timeout` must outlast the longest refit a test runs, or
the broker takes a running task back.

It runs `/usr/lib/rabbitmq/bin/rabbitmq-server`: the one in /usr/sbin is a wrapper that,
as root, switches to the `rabbitmq` user and its files under /var/lib/rabbitmq.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .process import (
    Daemon,
    ServiceError,
    free_port,
    group_alive,
    log_tail,
    start_daemon,
    stop_daemon,
)

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
EPMD = "epmd"
CONSUMER_TIMEOUT = 900.0  # seconds; the tests' refits take well under a minute each
USER = "careen"
VHOST = "careen"


def missing_binaries() -> list[str]:
    missing = [] if SERVER.is_file() else [str(SERVER)]
    return missing + ([] if shutil.which(EPMD) else [EPMD])


@dataclass(frozen=True)
class RabbitMQ:
    url: str  # amqp://careen:PASSWORD@127.0.0.1:PORT/careen
    root: Path
    node: str
    epmd: Daemon
    server: Daemon

    @property
    def pids(self) -> list[int]:
        return [self.epmd.pid, self.server.pid]

    @property
    def log(self) -> Path:
        return self.server.log

    @property
    def transport_url(self) -> str:
        """The same broker as oslo.messaging names it."""
        return self.url.replace("amqp://", "rabbit://", 1)


def rabbitmq_conf(port: int, password: str, consumer_timeout: float) -> str:
    return "\n".join(
        [
            f"listeners.tcp.1 = 127.0.0.1:{port}",
            f"consumer_timeout = {int(consumer_timeout * 1000)}",
            f"default_user = {USER}",
            f"default_pass = {password}",
            f"default_vhost = {VHOST}",
            "log.console = true",
            "log.console.level = info",
            "log.file = false",
            "",
        ]
    )


def _environment(root: Path, node: str, dist_port: int, epmd_port: int) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(root / "home"),  # the Erlang cookie goes there
        "LANG": "C.UTF-8",
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_CRASH_DUMP": str(root / "erl_crash.dump"),
    }


def processes_with(variable: str, value: str) -> list[int]:
    """Processes whose environment has `variable=value`: what a daemon started, even
    the programs that left its process group (Erlang's port programs)."""
    wanted = f"{variable}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if wanted in environ:
                found.append(int(entry))
    return found


def wait_amqp(server: Daemon, url: str, *, timeout: float) -> None:
    """Wait until the broker accepts an AMQP login to the vhost; raise with the log's
    tail if it exits or the deadline passes first."""
    from kombu import Connection

    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if server.process.poll() is not None:
            raise ServiceError(
                f"rabbitmq-server exited {server.process.returncode} before it answered; "
                f"end of {server.log}:\n{log_tail(server.log)}"
            )
        try:
            with Connection(url, connect_timeout=2) as connection:
                connection.connect()
                return
        except Exception as e:  # refused, reset, or not yet ready for logins
            last = str(e)
        if time.monotonic() > deadline:
            raise ServiceError(
                f"rabbitmq-server did not answer within {timeout} s ({last}); "
                f"end of {server.log}:\n{log_tail(server.log)}"
            )
        time.sleep(0.2)


def _stop_leftovers(mnesia: Path) -> None:
    """Programs the node started in sessions of their own must be gone with it."""
    deadline = time.monotonic() + 10
    while pids := processes_with("RABBITMQ_MNESIA_BASE", str(mnesia)):
        if time.monotonic() > deadline:
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise ServiceError(f"rabbitmq: processes {pids} outlived the node (killed)")
        time.sleep(0.1)


@contextmanager
def start_rabbitmq(
    root: Path, *, consumer_timeout: float = CONSUMER_TIMEOUT, timeout: float = 120
) -> Iterator[RabbitMQ]:
    """Serve a RabbitMQ node with all of its state under `root` (created), and stop it,
    its epmd and everything they started at the end."""
    for sub in ("home", "mnesia", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    password = secrets.token_hex(12)
    node = f"careen-test-{uuid.uuid4().hex[:8]}@localhost"
    (root / "rabbitmq.conf").write_text(rabbitmq_conf(port, password, consumer_timeout))
    (root / "rabbitmq-env.conf").write_text("")
    (root / "enabled_plugins").write_text("[].\n")
    env = _environment(root, node, dist_port, epmd_port)
    epmd = start_daemon(
        "epmd",
        [EPMD, "-port", str(epmd_port), "-address", "127.0.0.1"],
        env={"PATH": env["PATH"], "HOME": env["HOME"], "LANG": env["LANG"]},
        log=root / "epmd.log",
        cwd=root,
    )
    try:
        server = start_daemon("rabbitmq", [SERVER], env=env, log=root / "rabbitmq.log", cwd=root)
        try:
            url = f"amqp://{USER}:{password}@127.0.0.1:{port}/{VHOST}"
            wait_amqp(server, url, timeout=timeout)
            yield RabbitMQ(url, root, node, epmd, server)
        finally:
            stop_daemon(server, timeout=30)
            _stop_leftovers(root / "mnesia")
    finally:
        stop_daemon(epmd)
    if group_alive(epmd.pid) or group_alive(server.pid):
        raise ServiceError("rabbitmq: a process group survived the stop")
