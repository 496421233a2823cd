"""The one place that starts processes.

Every command careen runs goes through `run()` (wait for it) or `spawn()` (a daemon that
must die with careen). Both take an argv list, close stdin, log `+ cmd` at debug with
secrets redacted, and turn a failure into one `CommandError` carrying the command, its
exit status and the tail of its stderr.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from careen.errors import CareenError

log = logging.getLogger(__name__)

Arg = str | os.PathLike[str]

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Limits:
    """Resource limits for a child process (applied between fork and exec)."""

    address_space: int | None = None  # bytes
    cpu_seconds: int | None = None


class CommandError(CareenError):
    """A command exited non-zero, could not be started, or ran past its deadline."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stderr: str,
        stdout: str = "",
        hint: str = "",
        secrets: Sequence[str] = (),
    ):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        shown = redact(shlex.join(self.argv), secrets)
        tail = redact(_tail(stderr or stdout), secrets)
        status = "timed out" if returncode is None else f"exited {returncode}"
        message = f"{shown} {status}" + (f": {tail}" if tail else "")
        super().__init__(message, hint)


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _preexec(limits: Limits | None, die_with_parent: bool) -> Callable[[], None] | None:
    if limits is None and not die_with_parent:
        return None

    def setup() -> None:
        if die_with_parent:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if limits and limits.address_space:
            resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        if limits and limits.cpu_seconds:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))

    return setup


def _argv(argv: Sequence[Arg]) -> list[str]:
    return [os.fspath(a) for a in argv]


def run(
    argv: Sequence[Arg],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    limits: Limits | None = None,
    secrets: Sequence[str] = (),
    hint: str = "",
    capture: bool = True,
    text: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion and return its output (decoded as text)."""
    args = _argv(argv)
    log.debug("+ %s", redact(shlex.join(args), secrets))
    data: bytes | None = input.encode() if isinstance(input, str) else input
    try:
        proc = subprocess.run(
            args,
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            preexec_fn=_preexec(limits, die_with_parent=True),
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(
            args, 127, f"{args[0]}: command not found", hint=hint or _install_hint(args[0])
        ) from e
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        raise CommandError(args, None, err, hint=hint, secrets=secrets) from e
    stdout = proc.stdout.decode(errors="replace") if proc.stdout is not None else ""
    stderr = proc.stderr.decode(errors="replace") if proc.stderr is not None else ""
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, stderr, stdout, hint=hint, secrets=secrets)
    return result


def start_child(
    argv: Sequence[Arg], *, env: Mapping[str, str], stderr: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start another careen (a fleet's refit) whose stdout the caller reads and whose
    stderr goes to `stderr`. It stays in careen's process group, so Ctrl-C reaches it,
    and it sets its own death signal (CAREEN_DIE_WITH_PARENT): SIGTERM, so that it rolls
    back when its parent dies."""
    args = _argv(argv)
    log.debug("+ %s", shlex.join(args))
    return subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=dict(env)
    )


@dataclass
class Daemon:
    """A background process started by `spawn()`; it dies when careen dies."""

    argv: list[str]
    process: subprocess.Popen[bytes]
    secrets: Sequence[str] = field(default_factory=tuple)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.argv[0], timeout)
            self.process.kill()
            self.process.wait()

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            raise CommandError(self.argv, code, err, secrets=self.secrets)


def spawn(
    argv: Sequence[Arg],
    *,
    env: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
    hint: str = "",
) -> Daemon:
    """Start a helper daemon that receives SIGKILL if careen dies first."""
    args = _argv(argv)
    log.debug("+ %s &", redact(shlex.join(args), secrets))
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            preexec_fn=_preexec(None, die_with_parent=True),
            # Out of the terminal's process group: Ctrl-C is careen's to handle, and
            # careen still needs its daemons while it unwinds.
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise CommandError(
            args, 127, f"{args[0]}: command not found", hint=hint or _install_hint(args[0])
        ) from e
    return Daemon(args, proc, secrets)


_PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-nbd": "qemu-utils",
    "sfdisk": "fdisk",
    "mkfs.xfs": "xfsprogs",
    "xfs_repair": "xfsprogs",
    "lvs": "lvm2",
    "pvs": "lvm2",
    "mmdebstrap": "mmdebstrap",
    "apt-ftparchive": "apt-utils",
    "virt-customize": "guestfs-tools",
}


def _install_hint(program: str) -> str:
    package = _PACKAGES.get(Path(program).name)
    if package:
        return f"install it: apt-get install {package} (or run scripts/setup)"
    return "install it, or run scripts/setup"


def have(program: str) -> bool:
    """Whether a program is on PATH (without running it)."""
    from shutil import which

    return which(program) is not None
