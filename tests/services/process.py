"""Starting, watching and stopping the services' processes (test suite only).

A daemon runs in a session of its own, so that stopping it reaches every process it
started (a WSGI server's workers too), and the kernel sends it SIGTERM when the process
that started it dies, so a killed test run leaves no service behind. Each service gets
a small, explicit environment: nothing from the caller's `OS_*` variables or `$HOME`
leaks into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
# The pinned requirements of each service's venv; scripts/setup installs them.
REQUIREMENTS = TOP / "scripts" / "services"
STAMP = ".careen-requirements"
_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """A service could not be installed, started or stopped."""


class NotInstalled(ServiceError):
    """A service's venv is missing or older than its pinned requirements."""


def services_cache() -> Path:
    base = os.environ.get("CAREEN_CACHE") or Path.home() / ".cache" / "careen"
    return Path(base) / "services"


def service_venv(name: str) -> Path:
    """The venv of service `name`, checked against the pinned requirements in the repo."""
    venv = services_cache() / name
    stamp = venv / STAMP
    wanted = (REQUIREMENTS / f"{name}.txt").read_text()
    if not stamp.is_file() or stamp.read_text() != wanted:
        raise NotInstalled(f"{name} is not installed in {venv} (or is stale): run scripts/setup")
    return venv


def service_env(venv: Path, home: Path, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """A minimal environment for a service: its venv first on PATH, a private HOME."""
    return {
        "PATH": f"{venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


def write_ini(path: Path, sections: Mapping[str, Mapping[str, str]]) -> None:
    """Write an oslo.config / paste style INI file (no interpolation, values verbatim)."""
    lines: list[str] = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in options.items())
        lines.append("")
    path.write_text("\n".join(lines))


def merge_sections(
    base: Mapping[str, Mapping[str, str]], *overlays: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, str]]:
    """Sections of `base` with the options of each overlay added or replaced."""
    merged = {section: dict(options) for section, options in base.items()}
    for overlay in overlays:
        for section, options in overlay.items():
            merged.setdefault(section, {}).update(options)
    return merged


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_tools(
    commands: Sequence[tuple[Sequence[str | os.PathLike[str]], Path]],
    *,
    env: Mapping[str, str],
    timeout: float = 300,
    cwd: Path | None = None,
) -> None:
    """Run independent set-up commands side by side, each `(argv, log)` with its output
    appended to its own log; once all have ended, raise if any failed."""
    started = []
    for argv, log in commands:
        args = [os.fspath(a) for a in argv]
        with log.open("ab") as out:
            out.write(f"+ {shlex.join(args)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                args,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        started.append((args, log, process))
    deadline = time.monotonic() + timeout
    failures = []
    for args, log, process in started:
        try:
            returncode = process.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            failures.append(f"{shlex.join(args)} ran past {timeout} s; end of {log}:")
        else:
            if returncode == 0:
                continue
            failures.append(f"{shlex.join(args)} exited {returncode}; end of {log}:")
        failures.append(log_tail(log))
    if failures:
        raise ServiceError("\n".join(failures))


def run_tool(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str],
    log: Path,
    timeout: float = 300,
    cwd: Path | None = None,
) -> None:
    """Run a set-up command to completion, its output appended to `log`."""
    run_tools([(argv, log)], env=env, timeout=timeout, cwd=cwd)


@dataclass
class Daemon:
    """A long-running service process, leader of its own session and process group."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def start_daemon(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str],
    log: Path,
    cwd: Path | None = None,
) -> Daemon:
    args = [os.fspath(a) for a in argv]
    with log.open("ab") as out:
        out.write(f"+ {shlex.join(args)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            args,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Daemon(name, process, log)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_daemon(daemon: Daemon, timeout: float = 10) -> None:
    """SIGTERM to the daemon's whole process group; SIGKILL what is left after `timeout`.

    Raises if anything of the group is still alive at the end.
    """
    pgid = daemon.pid  # a session leader's process group has its PID
    _signal_group(pgid, signal.SIGTERM)
    try:
        daemon.process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        daemon.process.wait(timeout)
    # Workers that outlive their master (reparented, or slow to exit) are still in the group.
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
            if time.monotonic() > deadline + 5:
                raise ServiceError(f"{daemon.name}: processes of group {pgid} survive SIGKILL")
        time.sleep(0.05)


def wait_http(daemon: Daemon, url: str, *, timeout: float, ok: Sequence[int] = (200,)) -> None:
    """Poll `url` until it answers with a status in `ok`; raise with the log's tail if the
    daemon exits or the deadline passes first."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if daemon.process.poll() is not None:
            raise ServiceError(
                f"{daemon.name} exited {daemon.process.returncode} before {url} answered; "
                f"end of {daemon.log}:\n{log_tail(daemon.log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status = int(response.status)
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            status, last = 0, str(e)
        if status in ok:
            return
        if status:
            last = f"HTTP {status}"
        if time.monotonic() > deadline:
            raise ServiceError(
                f"{daemon.name} did not answer {url} within {timeout} s ({last}); "
                f"end of {daemon.log}:\n{log_tail(daemon.log)}"
            )
        time.sleep(0.1)


# One access-log line per request: method, the path as the client sent it (RAW_URI: the
# application may rewrite PATH_INFO, as Glance's version negotiation does), status,
# response body bytes and the request's Content-Length ("-" without one), user agent.
ACCESS_LOG_FORMAT = '%(m)s %({raw_uri}e)s %(s)s %(B)s %({content-length}i)s "%(a)s"'


def gunicorn_argv(
    venv: Path,
    app: str,
    port: int,
    state: Path,
    *,
    threads: int = 4,
    access_log: Path | None = None,
) -> list[str]:
    """A gunicorn serving `app` on 127.0.0.1:`port` with one threaded worker, its pid file
    and heartbeat files under `state`, and no control socket (it would go under $HOME).
    With `access_log`, every request is logged there in `ACCESS_LOG_FORMAT`."""
    access: list[str] = []
    if access_log is not None:
        access = ["--access-logfile", str(access_log), "--access-logformat", ACCESS_LOG_FORMAT]
    return [
        str(venv / "bin" / "gunicorn"),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--worker-class",
        "gthread",
        "--threads",
        str(threads),
        "--timeout",
        "300",
        "--graceful-timeout",
        "2",
        "--no-control-socket",
        "--worker-tmp-dir",
        str(state),
        "--pid",
        str(state / "gunicorn.pid"),
        "--error-logfile",
        "-",
        *access,
        app,
    ]
