"""SELinux labels for what a refit changed, set with the guest's own policy.

Files that careen or the guest's package manager wrote carry no label (the host and the
appliance run no SELinux), and a guest that boots enforcing would deny access to them.
So when the guest's /etc/selinux/config enables SELinux, `relabel()` runs the guest's
own `setfiles` over its tree with the file contexts of its SELINUXTYPE, through
`Guest.run`: a sandboxed chroot on the host backend, libguestfs's `command` in the
appliance. Where that cannot run (no setfiles, no file contexts, or setfiles fails) it
creates /.autorelabel, and the guest relabels itself on its next boot instead.

Without an SELinux kernel, setfiles writes the `security.selinux` attributes as plain
extended attributes, and it finds no "seclabel" mounts to leave out, so the pseudo
filesystems that the sandbox and guestfsd mount inside the guest root are excluded here.

While an appliance with a network runs a command, guestfsd moves the guest's
/etc/resolv.conf to a random name in /etc and puts the appliance's copy in its place
(`set_up_etc_resolv_conf` in libguestfs's daemon/command.c), so setfiles would label the
guest's file for the wrong name. The same command therefore finds that file again by
its inode and gives it the label of /etc/resolv.conf; on the host backend the inode is
at /etc/resolv.conf itself and nothing more happens.
"""

from __future__ import annotations

import logging
import re
import time

from careen.errors import CareenError
from careen.guest.base import Guest, exists, read_text
from careen.image.model import OSInfo
from careen.log import step

log = logging.getLogger(__name__)

AUTORELABEL = "/.autorelabel"
SETFILES = ("/usr/sbin/setfiles", "/sbin/setfiles")
# Mounted inside the guest root for a run (careen's sandbox; guestfsd's `command` binds
# /dev, /proc and /sys): their labels are the kernel's, never the policy's.
PSEUDO = ("/proc", "/sys", "/dev", "/run")
# libselinux's own default when the config names no type.
DEFAULT_TYPE = "targeted"
RESOLV_CONF = "/etc/resolv.conf"
_FIXUP_FAILED = 90
# Run as `sh -c SCRIPT careen-relabel INODE SETFILES ARGS...`; INODE is that of the
# guest's /etc/resolv.conf, or empty when it has none.
_SCRIPT = f"""
inode=$1; shift
"$@" || exit
[ -n "$inode" ] || exit 0
moved=$(find /etc -maxdepth 1 -inum "$inode" -print -quit)
[ -n "$moved" ] && [ "$moved" != {RESOLV_CONF} ] || exit 0
if [ -L "$moved" ]; then kind=lnk_file; else kind=file; fi
context=$(matchpathcon -n -m "$kind" {RESOLV_CONF}) && chcon -h "$context" "$moved" || {{
    echo "cannot label {RESOLV_CONF}, moved to $moved while commands run" >&2
    exit {_FIXUP_FAILED}
}}
"""


def enabled(os: OSInfo) -> bool:
    return os.selinux in ("enforcing", "permissive")


def policy_type(guest: Guest) -> str:
    """The guest's SELINUXTYPE, the name of its policy directory under /etc/selinux."""
    text = read_text(guest, "/etc/selinux/config") or ""
    match = re.search(r"^\s*SELINUXTYPE\s*=\s*[\"']?([^\s\"'#]*)", text, re.M)
    name = match.group(1) if match and match.group(1) else DEFAULT_TYPE
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise CareenError(f"the guest's SELINUXTYPE {name!r} is not a policy name")
    return name


def file_contexts(policy: str) -> str:
    return f"/etc/selinux/{policy}/contexts/files/file_contexts"


def relabel(guest: Guest, os: OSInfo, timeout: float | None) -> str | None:
    """Label the guest's files for its SELinux policy; the note saying how, or None."""
    if not enabled(os):
        return None
    try:
        policy = policy_type(guest)
        how = _run_setfiles(guest, policy, timeout)
    except CareenError as e:
        guest.write_bytes(AUTORELABEL, b"", 0o644)
        note = f"SELinux: created {AUTORELABEL}, the guest relabels on its next boot ({e})"
        log.warning("%s", note)
        return note
    note = f"SELinux: relabelled with the guest's setfiles ({how})"
    log.info("%s", note)
    return note


def _run_setfiles(guest: Guest, policy: str, timeout: float | None) -> str:
    """Run the guest's setfiles over its whole tree; raise saying why it could not."""
    setfiles = next((p for p in SETFILES if exists(guest, p)), None)
    if setfiles is None:
        raise CareenError("no setfiles in the guest")
    contexts = file_contexts(policy)
    if not exists(guest, contexts):
        raise CareenError(f"no {contexts} in the guest")
    excludes = [arg for path in PSEUDO if exists(guest, path) for arg in ("-e", path)]
    resolv = guest.lstat(RESOLV_CONF)
    inode = str(resolv.st_ino) if resolv is not None else ""
    argv = ["/bin/sh", "-c", _SCRIPT, "careen-relabel", inode, setfiles, *excludes, contexts, "/"]
    start = time.monotonic()
    with step(f"Relabelling the guest's files for SELinux policy {policy}"):
        done = guest.run(argv, timeout=timeout, check=False)
    for line in (done.stdout + done.stderr).splitlines():
        log.debug("  %s", line)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        what = "labelling" if done.returncode == _FIXUP_FAILED else "setfiles"
        raise CareenError(f"{what} exited {done.returncode}" + (f": {tail}" if tail else ""))
    return f"policy {policy}, {time.monotonic() - start:.1f} s"
