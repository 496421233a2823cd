"""Run one command inside a mounted guest root, in namespaces of its own.

`run_in_root()` starts `unshare` with new mount, PID, UTS and IPC namespaces, and this
module's `main()` as the namespaces' first process. Before it chroots it gives the guest
a fresh `/proc`, a private `/dev` (a few device nodes and a devpts instance of its own),
a tmpfs `/run` and a read-only `/sys`: package scripts see neither the host's disks nor
its `/run`. Every mount target is resolved inside the guest root and must be a real
directory, so a guest whose `/proc` is a symlink cannot place a mount on a host path.
When the command ends, this process exits, the PID namespace takes every leftover
process of the guest with it (gpg-agent, dirmngr, daemons a postinst started), and the
mount namespace takes the API filesystems.

This is not a security boundary: root in a chroot can still reach the host. Untrusted
images belong to the appliance backend.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from careen import linux, run
from careen.errors import CareenError

log = logging.getLogger(__name__)

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The manual procedure sources the guest's profile; so does careen, quietly.
# A missing file given to `.` ends a POSIX shell, hence the test first.
_PROFILE_WRAPPER = '[ -r /etc/profile ] && . /etc/profile >/dev/null 2>&1; exec "$@"'

_NOSUID_NODEV = linux.MS_NOSUID | linux.MS_NODEV
_PREPARE_FAILED = 125
_SHOWN_LINES = 20
_PREPARE_PREFIX = "careen: cannot prepare the guest root: "
_DEV_NODES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
_DEV_LINKS = {
    "ptmx": "pts/ptmx",
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "DEBIAN_FRONTEND": "noninteractive",
        "SYSTEMD_OFFLINE": "1",
    }
    env.update(extra or {})
    return env


def sandbox_argv(
    root: Path, argv: Sequence[str], *, hostname: str, env: Mapping[str, str] | None = None
) -> list[str]:
    """The host command line that runs `argv` in the guest (exposed for tests)."""
    spec = {"root": str(root), "argv": list(argv), "hostname": hostname, "env": guest_env(env)}
    return [
        "unshare",
        "--mount",
        "--pid",
        "--uts",
        "--ipc",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
        "--",
        sys.executable,
        "-m",
        "careen.guest.sandbox",
        json.dumps(spec),
    ]


def run_in_root(
    root: Path,
    argv: Sequence[str],
    *,
    hostname: str = "localhost",
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    secrets: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside the guest mounted at `root` and wait for it."""
    hint = "the command ran inside the guest; the end of its output is shown above"
    try:
        done = run.run(
            sandbox_argv(root, argv, hostname=hostname, env=env),
            timeout=timeout,
            check=check,
            secrets=secrets,
            hint=hint,
        )
        for line in (done.stdout + done.stderr).splitlines():
            log.debug("  %s", run.redact(line, secrets))
        return done
    except run.CommandError as e:
        if e.returncode == _PREPARE_FAILED and _PREPARE_PREFIX in e.stderr:
            reason = e.stderr.strip().splitlines()[-1].removeprefix(_PREPARE_PREFIX)
            raise CareenError(
                f"cannot run {argv[0]} in the guest: {reason}",
                hint="the guest's /proc, /dev, /run and /sys must be real directories; "
                "this image is damaged or hostile",
            ) from e
        # What the command said is the explanation: show its last lines, then report
        # the guest command, not the sandbox's plumbing around it.
        lines = (e.stdout + e.stderr).strip().splitlines()
        for line in lines[-_SHOWN_LINES:]:
            log.error("  %s", run.redact(line, secrets))
        if e.returncode is None:
            e.hint = f"it ran longer than {timeout:.0f} s and was stopped; raise the timeout"
        raise run.CommandError(
            list(argv), e.returncode, e.stderr, e.stdout, hint=e.hint, secrets=secrets
        ) from e


# ---- inside the namespaces ------------------------------------------------------------


class SandboxError(Exception):
    pass


def _api_dir(root_fd: int, name: str) -> int:
    """Open /NAME of the guest, refusing anything but a real directory."""
    try:
        fd = linux.open_in_root(root_fd, name, os.O_PATH | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SandboxError(f"the guest has no /{name} directory") from None
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise SandboxError(f"the guest's /{name} is not a directory (a symlink?); refusing")
    return fd


def _mount_on(root_fd: int, name: str, fstype: str, flags: int, data: str = "") -> None:
    with linux.opened(_api_dir(root_fd, name)) as fd:
        linux.mount(fstype, linux.fd_path(fd), fstype, flags, data)


def _populate_dev(root_fd: int) -> None:
    with linux.opened(_api_dir(root_fd, "dev")) as dev:
        for name, (major, minor) in _DEV_NODES.items():
            os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev)
            os.chmod(name, 0o666, dir_fd=dev)
        for name, target in _DEV_LINKS.items():
            os.symlink(target, name, dir_fd=dev)
        os.mkdir("pts", 0o755, dir_fd=dev)
        os.mkdir("shm", 0o1777, dir_fd=dev)
    _mount_on(
        root_fd,
        "dev/pts",
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    _mount_on(root_fd, "dev/shm", "tmpfs", _NOSUID_NODEV, "mode=1777")


def _prepare(root: str, hostname: str) -> int:
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _mount_on(root_fd, "proc", "proc", _NOSUID_NODEV | linux.MS_NOEXEC)
    _mount_on(root_fd, "dev", "tmpfs", linux.MS_NOSUID, "mode=0755")
    _populate_dev(root_fd)
    _mount_on(root_fd, "run", "tmpfs", _NOSUID_NODEV, "mode=0755")
    _mount_on(root_fd, "sys", "sysfs", _NOSUID_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY)
    socket.sethostname(hostname)
    return root_fd


def _exec_as_init(argv: list[str], env: dict[str, str]) -> int:
    """Run the command as a child of this PID 1 and reap everything until it exits."""
    child = os.fork()
    if child == 0:
        try:
            os.execve("/bin/sh", ["/bin/sh", "-c", _PROFILE_WRAPPER, "careen", *argv], env)
        except OSError as e:
            print(f"careen: cannot run /bin/sh in the guest: {e}", file=sys.stderr)
        os._exit(127)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: os.kill(child, s))
    while True:
        pid, status = os.wait()
        if pid == child:
            if os.WIFEXITED(status):
                return os.WEXITSTATUS(status)
            return 128 + os.WTERMSIG(status)


def main() -> int:
    spec = json.loads(sys.argv[1])
    if os.getpid() != 1:
        # Outside its own namespaces this would mount over the host's view of the guest.
        print("careen: the sandbox must run as PID 1 of new namespaces", file=sys.stderr)
        return 125
    try:
        root_fd = _prepare(spec["root"], spec["hostname"])
    except (SandboxError, OSError) as e:
        print(f"{_PREPARE_PREFIX}{e}", file=sys.stderr)
        return _PREPARE_FAILED
    os.chroot(linux.fd_path(root_fd))
    os.chdir("/")
    return _exec_as_init(list(spec["argv"]), dict(spec["env"]))


if __name__ == "__main__":
    sys.exit(main())
