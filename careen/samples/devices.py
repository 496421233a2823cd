"""Loop devices, mounts and a throwaway namespace, as context managers for the sample builder.

The kernel here may create no partition devices and have no device-mapper, so every
region of a disk file (a partition, an LVM logical volume) is reached through its own
loop device with an offset and a size limit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from careen.run import Arg, run

log = logging.getLogger(__name__)

# A plain environment for commands run inside the guest: the host's (a venv's PATH, a
# pyenv shim, the host locale) means nothing there.
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


@contextmanager
def _releasing(resource: str, release: Callable[[], object]) -> Iterator[str]:
    """Yield `resource`; release it afterwards without hiding an error already raised."""
    try:
        yield resource
    except BaseException:
        try:
            release()
        except Exception as e:  # the error that started the unwinding matters more
            log.error("could not release %s while unwinding: %s", resource, e)
        raise
    release()


@contextmanager
def loop_device(file: Path, offset: int, size: int, *, read_only: bool = False) -> Iterator[Path]:
    """Attach the byte range [offset, offset + size) of `file` as a loop device."""
    argv: list[Arg] = ["losetup", "--find", "--show", "--offset", str(offset)]
    argv += ["--sizelimit", str(size), *(["--read-only"] if read_only else []), file]
    device = run(argv).stdout.strip()
    with _releasing(device, lambda: run(["losetup", "--detach", device])):
        yield Path(device)


@contextmanager
def mounted(device: Path, mountpoint: Path, fstype: str) -> Iterator[Path]:
    """Mount `device` on `mountpoint` for the duration of the block."""
    run(["mount", "-t", fstype, device, mountpoint])
    with _releasing(os.fspath(mountpoint), lambda: run(["umount", mountpoint])):
        yield mountpoint


def in_guest(root: Path, argv: Sequence[Arg], *, check: bool = True) -> str:
    """Run a command chrooted into `root`, in fresh UTS, network, mount and PID namespaces.

    The private UTS namespace keeps a guest tool that sets the hostname (cloud-init)
    from renaming the host; the private mount namespace holds /proc, which vanishes
    with it; the PID namespace kills anything the command leaves running.
    """
    sandbox: list[Arg] = ["unshare", "--uts", "--net", "--mount", "--pid", "--fork"]
    sandbox += [f"--mount-proc={root / 'proc'}", "chroot", root]
    result = run([*sandbox, *argv], env=GUEST_ENV, check=check)
    if result.returncode != 0:
        log.debug("%s exited %d: %s", argv[0], result.returncode, result.stderr.strip())
    return result.stdout
