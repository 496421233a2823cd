"""Guest symlinks never lead careen to a host path.

Each case is a sample guest with one hostile link where careen reads, writes, deletes
or mounts: `/etc/resolv.conf` pointing at the host's `/etc/shadow` (absolute) or
climbing out with `../../../../../etc/hostname`, `/etc/machine-id`, `/var/lib/cloud`,
`/usr/sbin/policy-rc.d`, `/var/cache/apt/archives` and `/tmp` pointing at host
directories, and, on the LVM layout, `/boot -> ../../etc` with /boot in the fstab. The
host's sensitive files, the listings of /root and /etc and the mount table must be the
same after the refit as before, and every case must end in a correct refit (checked in
the output) or in one clear error. A FIFO at /etc/os-release must not hang careen.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from careen.samples import Layout, sample_root

from .util import (
    Guarded,
    bare_image,
    careen,
    copy_sample,
    debugfs,
    error_lines,
    ext4_cat,
    ext4_symlink_target,
    put_fifo,
    put_symlink,
    refit_json,
    sh,
    sha256,
    to_raw,
    variant_root,
)

pytestmark = [pytest.mark.root, pytest.mark.images]

HOST_FILES = ("/etc/shadow", "/etc/hostname", "/etc/passwd", "/etc/resolv.conf")
MOTD = "refitted despite hostile links\n"
STANDARD = [
    "--reset-cloud-init",
    "--reset-machine-id",
    "--remove-ssh-host-keys",
    "--clean-caches",
    "--write",
    f"/etc/motd:{MOTD}",
]
DEFAULT_RECIPE = ["-r", "cloud-init-refresh", "--write", f"/etc/motd:{MOTD}"]


@dataclass(frozen=True)
class HostView:
    """What a refit must never change on the host."""

    hashes: dict[str, str]
    listings: dict[str, tuple[tuple[str, int], ...]]

    @classmethod
    def take(cls) -> HostView:
        hashes = {p: sha256(Path(p)) for p in HOST_FILES if Path(p).exists()}
        listings = {d: _listing(d) for d in ("/root", "/etc")}
        return cls(hashes, listings)


def _listing(directory: str) -> tuple[tuple[str, int], ...]:
    out = []
    for name in sorted(os.listdir(directory)):
        mode = os.lstat(os.path.join(directory, name)).st_mode
        out.append((name, stat.S_IFMT(mode)))
    return tuple(out)


@dataclass
class Outcome:
    """What careen did with a hostile guest: a refit's JSON and output, or an error."""

    result: dict[str, Any] | None
    error: str
    raw: Path | None  # the output as raw, for debugfs
    seconds: float
    stderr: str = field(repr=False, default="")


def refit_hostile(tmp_path: Path, image: Path, args: list[str], timeout: float = 150) -> Outcome:
    """Refit `image`, checking that the host stayed as it was whatever happened."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    out = tmp_path / "out.qcow2"
    view = HostView.take()
    guard = Guarded.before(tmp_path, tmpdir, [])
    started = time.monotonic()
    proc = careen(
        "refit", image, "-o", out, "--format", "json", *args, tmpdir=tmpdir, timeout=timeout
    )
    seconds = time.monotonic() - started
    assert HostView.take() == view, "the refit changed the host's files"
    guard.assert_released(out)
    if proc.returncode != 0:
        assert proc.returncode == 1, proc.stderr
        error, _hint = error_lines(proc, need_hint=False)
        assert not out.exists()
        return Outcome(None, error, None, seconds, proc.stderr)
    result = refit_json(proc)
    return Outcome(result, "", to_raw(out, tmp_path / "out.raw"), seconds, proc.stderr)


def _bare_variant(tmp_path: Path, change: Callable[[Path], None]) -> Path:
    root = variant_root(tmp_path / "root")
    change(root)
    return bare_image(root, tmp_path / "hostile.raw")


def _sample_file(path: str) -> str:
    return (sample_root() / path.lstrip("/")).read_text()


def _assert_refitted(o: Outcome) -> Path:
    assert o.result is not None, f"refit failed: {o.error}\n{o.stderr}"
    assert o.raw is not None
    assert ext4_cat(o.raw, "/etc/motd") == MOTD
    return o.raw


# ---- /etc/resolv.conf: replaced for the run, then the same link again ------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("target", "guest_file"),
    [("/etc/shadow", "/etc/shadow"), ("../../../../../etc/hostname", "/etc/hostname")],
    ids=["absolute", "relative"],
)
def test_resolv_conf_link(tmp_path: Path, target: str, guest_file: str) -> None:
    # The sample builder writes resolv.conf itself, so the link goes in afterwards.
    image = _bare_variant(tmp_path, lambda root: None)
    debugfs(image, "rm /etc/resolv.conf", write=True)
    debugfs(image, f"symlink /etc/resolv.conf {target}", write=True)
    # The default recipe runs apt, which needs the resolver careen puts in place.
    raw = _assert_refitted(refit_hostile(tmp_path, image, DEFAULT_RECIPE))
    assert ext4_symlink_target(raw, "/etc/resolv.conf") == target
    assert ext4_cat(raw, guest_file) == _sample_file(guest_file)


# ---- identity and cloud-init state -----------------------------------------------------


@pytest.mark.timeout(180)
def test_machine_id_link(tmp_path: Path) -> None:
    image = _bare_variant(tmp_path, lambda r: put_symlink(r, "/etc/machine-id", "/etc/hostname"))
    raw = _assert_refitted(refit_hostile(tmp_path, image, STANDARD))
    # The link is replaced by an empty file; the guest's hostname stays.
    assert ext4_symlink_target(raw, "/etc/machine-id") is None
    assert ext4_cat(raw, "/etc/machine-id") == ""
    mode = int(_debugfs_field(raw, "/etc/machine-id", "Mode"), 8)
    assert mode & 0o022 == 0, f"/etc/machine-id became mode {mode:o}"
    assert ext4_cat(raw, "/etc/hostname") == _sample_file("/etc/hostname")


def _debugfs_field(raw: Path, path: str, name: str) -> str:
    out = debugfs(raw, f"stat {path}")
    match = re.search(rf"\b{name}:\s*(\S+)", out)
    assert match, f"no {name} in {out}"
    return match.group(1)


@pytest.mark.timeout(180)
def test_cloud_state_link_to_root(tmp_path: Path) -> None:
    image = _bare_variant(tmp_path, lambda r: put_symlink(r, "/var/lib/cloud", "/root"))
    raw = _assert_refitted(refit_hostile(tmp_path, image, STANDARD))
    assert ext4_symlink_target(raw, "/var/lib/cloud") == "/root"
    # The guest's own /root (where its cloud state lives through the link) is intact.
    listing = debugfs(raw, "ls /root")
    assert ".bashrc" in listing and ".ssh" in listing, listing


# ---- files careen puts in place for the run --------------------------------------------


@pytest.mark.timeout(240)
def test_policy_rc_d_link(tmp_path: Path) -> None:
    image = _bare_variant(
        tmp_path, lambda r: put_symlink(r, "/usr/sbin/policy-rc.d", "/etc/passwd")
    )
    # Inside the run, policy-rc.d is careen's deny-all script, not the link's target.
    check = "/usr/sbin/policy-rc.d; test $? -eq 101"
    raw = _assert_refitted(refit_hostile(tmp_path, image, [*DEFAULT_RECIPE, "--run", check]))
    assert ext4_symlink_target(raw, "/usr/sbin/policy-rc.d") == "/etc/passwd"
    assert ext4_cat(raw, "/etc/passwd") == _sample_file("/etc/passwd")


@pytest.mark.timeout(180)
def test_apt_archives_link_to_etc(tmp_path: Path) -> None:
    image = _bare_variant(tmp_path, lambda r: put_symlink(r, "/var/cache/apt/archives", "/etc"))
    o = refit_hostile(tmp_path, image, STANDARD)
    raw = _assert_refitted(o)
    assert ext4_symlink_target(raw, "/var/cache/apt/archives") == "/etc"
    # `apt-get clean` would have emptied the guest's /etc through the link.
    assert "instead of running apt-get clean" in o.stderr
    for path in ("/etc/passwd", "/etc/hostname", "/etc/fstab"):
        assert ext4_cat(raw, path), f"the guest lost {path}"


@pytest.mark.timeout(180)
def test_tmp_link_to_etc(tmp_path: Path) -> None:
    image = _bare_variant(tmp_path, lambda r: put_symlink(r, "/tmp", "/etc"))
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho from-script > /var/tmp/careen-script-ran\n")
    raw = _assert_refitted(refit_hostile(tmp_path, image, [*STANDARD, "--script", str(script)]))
    assert ext4_symlink_target(raw, "/tmp") == "/etc"
    assert ext4_cat(raw, "/var/tmp/careen-script-ran") == "from-script\n"
    assert "careen-script" not in debugfs(raw, "ls /etc"), "the script was left behind"


# ---- a mount point that is a link -------------------------------------------------------


def _root_lv_region(image: Path, tmp_path: Path) -> tuple[int, int]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    proc = careen("inspect", image, "--format", "json", tmpdir=tmpdir)
    assert proc.returncode == 0, proc.stderr
    for fs in json.loads(proc.stdout)["filesystems"]:
        if fs["lv"] and fs["lv"]["name"] == "root":
            return int(fs["region"]["offset"]), int(fs["region"]["size"])
    raise AssertionError("no root LV in the LVM sample")


@pytest.mark.timeout(240)
def test_boot_mount_point_link_lvm(tmp_path: Path) -> None:
    image = copy_sample(Layout.LVM, tmp_path / "lvm.raw")
    offset, size = _root_lv_region(image, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # In a private mount namespace, so the host never sees this mount.
    script = (
        f"mount -t xfs -o loop,nouuid,offset={offset},sizelimit={size} {image} {mnt} || exit 1; "
        f"rmdir {mnt}/boot && ln -s ../../etc {mnt}/boot; rc=$?; umount {mnt}; exit $rc"
    )
    sh("unshare", "--mount", "--propagation", "private", "sh", "-c", script, timeout=60)
    # In the run, the guest's /boot filesystem must sit on the guest's own /etc (grep,
    # not awk: /usr/bin/awk is an alternatives link into the /etc that is now covered).
    check = "grep -q ' /etc ' /proc/self/mountinfo"
    o = refit_hostile(tmp_path, image, [*STANDARD, "--run", check])
    assert o.result is not None, f"refit failed: {o.error}\n{o.stderr}"
    boot = [m for m in o.result["mounts"] if m["guest"] == "/boot"]
    assert boot and boot[0]["type"] == "xfs", o.result["mounts"]


# ---- a FIFO where careen reads ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_fifo_os_release(tmp_path: Path) -> None:
    image = _bare_variant(tmp_path, lambda r: put_fifo(r, "/etc/os-release"))
    assert "Type: FIFO" in debugfs(image, "stat /etc/os-release")
    o = refit_hostile(tmp_path, image, STANDARD, timeout=90)
    assert o.seconds < 60, f"careen took {o.seconds:.0f} s"
    if o.result is None:
        assert "os-release" in o.error, o.error
    else:
        assert o.result["os"]["distro"] == "unknown"


# ---- API directories that are links, and an fstab naming devices that do not exist ----


@pytest.mark.timeout(180)
@pytest.mark.parametrize("api_dir", ["/proc", "/dev"])
def test_api_directory_link(tmp_path: Path, api_dir: str) -> None:
    image = _bare_variant(tmp_path, lambda r: put_symlink(r, api_dir, "/etc"))
    o = refit_hostile(tmp_path, image, STANDARD)
    # Nothing may be mounted over the guest's /etc (or anywhere the link leads): careen
    # refuses to run the guest's programs at all.
    assert o.result is None, "a guest command ran with a linked API directory"
    assert f"guest's {api_dir} is not a directory" in o.error, o.error


@pytest.mark.timeout(180)
def test_fstab_naming_missing_devices(tmp_path: Path) -> None:
    image = _bare_variant(tmp_path, lambda r: None)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "LABEL=root / ext4 errors=remount-ro 0 1\n"
        "UUID=00000000-dead-beef-0000-000000000000 /boot ext4 defaults 0 2\n"
        "/dev/sdz9 /srv xfs defaults 0 0\n"
    )
    debugfs(image, "rm /etc/fstab", write=True)
    debugfs(image, f"write {fstab} /etc/fstab", write=True)
    o = refit_hostile(tmp_path, image, STANDARD)
    _assert_refitted(o)
    assert o.result is not None
    notes = " ".join(o.result["notes"])
    assert "/boot" in notes and "/srv" in notes and "not on this disk" in notes
    assert [m["guest"] for m in o.result["mounts"]] == ["/"]
