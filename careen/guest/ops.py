"""The operations a recipe can ask for, written once against the Guest interface."""

from __future__ import annotations

import logging
import re
import secrets
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from careen.errors import CareenError
from careen.guest import pkg, windows
from careen.guest.base import Guest, exists, glob, read_text
from careen.image.model import OSInfo
from careen.log import step
from careen.recipe import Op, Step

log = logging.getLogger(__name__)

# What a used image carries that would follow it to every new server: cloud-init's
# state (the rest of /var/lib/cloud except seed/) and logs, and the network identity
# that cloud-init or udev generated for the first server's NIC and DHCP lease.
CLOUD_INIT_LOGS = ("/var/log/cloud-init.log", "/var/log/cloud-init-output.log")
NETWORK_IDENTITY = (
    "/etc/netplan/50-cloud-init.yaml",
    "/etc/network/interfaces.d/50-cloud-init",
    "/etc/network/interfaces.d/50-cloud-init.cfg",
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/udev/rules.d/75-persistent-net-generator.rules",
    "/var/lib/dhcp/*.leases",
    "/var/lib/dhclient/*.lease*",
    "/var/lib/NetworkManager/*.lease",
    "/var/lib/NetworkManager/*.leases",
    "/var/lib/systemd/network/*",
    "/etc/NetworkManager/system-connections/cloud-init-*",
)
_CLOUD_INIT_IFCFG = "/etc/sysconfig/network-scripts/ifcfg-*"
SSH_HOST_KEYS = "/etc/ssh/ssh_host_*"


@dataclass
class Context:
    guest: Guest
    os: OSInfo
    timeout: float | None = None
    notes: list[str] = field(default_factory=list)
    _pm: pkg.PackageManager | None = None
    _refreshed: bool = False

    @property
    def packages(self) -> pkg.PackageManager:
        if self._pm is None:
            self._pm = pkg.get(self.os.package_manager)
        return self._pm

    def refresh_once(self) -> None:
        if not self._refreshed:
            with step("Refreshing the guest's package lists"):
                self.packages.refresh(self.guest)
            self._refreshed = True


def apply_steps(ctx: Context, steps: Sequence[Step]) -> None:
    for number, s in enumerate(steps, 1):
        with step(f"Step {number}/{len(steps)}: {s.describe()}"):
            try:
                apply_step(ctx, s)
            except OSError as e:
                where = f": {e.filename}" if e.filename else ""
                raise CareenError(
                    f"step {number} ({s.describe()}) failed: {e.strerror or e}{where}",
                    hint="paths are the guest's; check that the directory exists in the "
                    "guest and that the path is not a directory",
                ) from e


def apply_step(ctx: Context, s: Step) -> None:
    g = ctx.guest
    match s.op:
        case Op.UPDATE:
            ctx.refresh_once()
            ctx.packages.upgrade(g, s.packages)
        case Op.INSTALL:
            ctx.refresh_once()
            ctx.packages.install(g, s.packages)
        case Op.REMOVE:
            ctx.packages.remove(g, s.packages)
        case Op.RUN:
            _show(g.run(["/bin/sh", "-c", s.command], timeout=ctx.timeout))
        case Op.SCRIPT:
            assert s.source is not None
            _show(run_script(g, s.source.read_bytes(), ctx.timeout))
        case Op.UPLOAD:
            assert s.source is not None
            write_file(g, s.path, s.source.read_bytes(), s.mode)
        case Op.WRITE:
            write_file(g, s.path, s.content.encode(), s.mode)
        case Op.DELETE:
            delete_paths(g, s.path)
        case Op.CLEAN_CACHES:
            clean_caches(ctx)
        case Op.RESET_CLOUD_INIT:
            reset_cloud_init(ctx, machine_id=s.machine_id)
        case Op.RESET_MACHINE_ID:
            reset_machine_id(g)
        case Op.REMOVE_SSH_HOST_KEYS:
            delete_paths(g, SSH_HOST_KEYS)
        case Op.RESET_CLOUDBASE_INIT:
            ctx.notes.extend(windows.reset_cloudbase_init(g, ctx.os))


def write_file(guest: Guest, path: str, data: bytes, mode: int | None) -> None:
    old = guest.lstat(path)
    if mode is None:
        # Only a regular file's mode carries over: a symlink's own mode is 0777, and the
        # new file replaces the link rather than writing through it.
        regular = old is not None and stat.S_ISREG(old.st_mode)
        mode = stat.S_IMODE(old.st_mode) if old is not None and regular else 0o644
    guest.write_bytes(path, data, mode)


def delete_paths(guest: Guest, pattern: str) -> list[str]:
    removed = [p for p in glob(guest, pattern) if guest.delete(p)]
    log.debug("removed %s", removed or "nothing")
    return removed


def _show(done: subprocess.CompletedProcess[str]) -> None:
    """The user's own command: its output is what they asked to see."""
    for line in (done.stdout + done.stderr).splitlines():
        log.info("  %s", line)


def run_script(
    guest: Guest, script: bytes, timeout: float | None
) -> subprocess.CompletedProcess[str]:
    path = f"/tmp/careen-script-{secrets.token_hex(6)}"
    guest.write_bytes(path, script, 0o700)
    try:
        return guest.run([path], timeout=timeout)
    finally:
        guest.delete(path)


def clean_caches(ctx: Context) -> None:
    if ctx.os.package_manager is None:
        ctx.notes.append("no package manager in the guest: no package cache to clean")
        return
    ctx.packages.clean(ctx.guest)


def _has_cloud_init_clean(guest: Guest) -> bool:
    # `cloud-init clean` arrived in cloud-init 18.2; older ones have no such command.
    if not exists(guest, "/usr/bin/cloud-init"):
        return False
    return guest.run(["cloud-init", "clean", "--help"], check=False).returncode == 0


def reset_cloud_init(ctx: Context, *, machine_id: bool = False) -> None:
    """Make the next boot a first boot, the way `cloud-init clean --logs` does."""
    g = ctx.guest
    if _has_cloud_init_clean(g):
        g.run(["cloud-init", "clean", "--logs"])
    else:
        for path in glob(g, "/var/lib/cloud/*"):
            if path != "/var/lib/cloud/seed":
                g.delete(path)
        for path in CLOUD_INIT_LOGS:
            g.delete(path)
    # Some versions leave the instance link behind; a dangling one confuses the next boot.
    g.delete("/var/lib/cloud/instance")
    for pattern in NETWORK_IDENTITY:
        delete_paths(g, pattern)
    for path in glob(g, _CLOUD_INIT_IFCFG):
        if "cloud-init" in (read_text(g, path) or ""):
            g.delete(path)
    if machine_id:
        reset_machine_id(g)


def reset_machine_id(guest: Guest) -> None:
    """Empty /etc/machine-id (kept, zero length: every systemd makes a new ID from that)."""
    if guest.lstat("/etc/machine-id") is not None:
        write_file(guest, "/etc/machine-id", b"", None)
    dbus = "/var/lib/dbus/machine-id"
    st = guest.lstat(dbus)
    if st is not None and not stat.S_ISLNK(st.st_mode):
        guest.delete(dbus)


def check_package_names(steps: Sequence[Step]) -> None:
    for s in steps:
        for name in s.packages:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_:~*=-]*", name):
                raise CareenError(f"{name!r} is not a package name")
