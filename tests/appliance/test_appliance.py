"""The appliance backend end to end: libguestfs mounts and edits, the host mounts nothing.

Launches are the slow part (about 15 s each under TCG), so each refit below is one
module-scoped fixture shared by every assertion about it: the default recipe on the
MBR layout, `reset-identity` on LVM, `reset-identity` on GPT run as an unprivileged
user with `--backend auto`, and `reset-identity` on a multi-segment LV that the host
backend refuses, where `--backend auto` must choose the appliance. The outputs are read
back with the same independent tools as the host backend's spine test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration import verify
from integration.util import CAREEN, copy_sample, put_file, sh, sha256

from careen.samples import Layout, sample_image, sample_root

from .conftest import host_entries, writable_by

pytestmark = [pytest.mark.root, pytest.mark.images]

NOBODY = 65534
APPLIANCE = ["--backend", "appliance", "--accel", "tcg", "--smp", "2"]
MiB = 1 << 20
LVM_CONFIG = (
    'global{activation=0} backup{backup=0 archive=0} devices{use_devicesfile=0 hints="none"}'
)


@dataclass
class Run:
    source: Path
    output: Path
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any]
    sha_before: str
    sha_after: str
    host_entries: set[str]


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    # Not under pytest's own temporary root: that one is 0700, and every pytest session
    # on this machine resets it so, which would lock the unprivileged user out.
    holder = Path(tempfile.mkdtemp(prefix="careen-appliance-test-", dir="/var/tmp"))
    holder.chmod(0o755)
    path = holder / "appliance"
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(holder)


def _refit(
    base: Path,
    source: Path,
    name: str,
    *args: str,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Run:
    """Run careen refit, watching the host for loops and mounts of our files meanwhile."""
    out = base / f"{name}.qcow2"
    before = sha256(source)
    ours = base.parent  # every test file of this module lives under it
    already = host_entries(ours)  # the checks' own read-only mounts of earlier outputs
    argv = [*prefix, str(CAREEN), "refit", str(source), "-o", str(out), "--format", "json", *args]
    seen: set[str] = set()
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(base), "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
    ) as child:
        deadline = time.monotonic() + 900
        while child.poll() is None and time.monotonic() < deadline:
            seen |= host_entries(ours) - already
            time.sleep(0.5)
        stdout, stderr = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
    seen |= host_entries(ours) - already
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr
    return Run(source, out, proc, json.loads(proc.stdout), before, sha256(source), seen)


@pytest.fixture(scope="module")
def spine(base: Path) -> Run:
    source = copy_sample(Layout.MBR, base / "mbr.raw")
    return _refit(base, source, "spine", *APPLIANCE)


@pytest.fixture(scope="module")
def lvm(base: Path) -> Run:
    source = copy_sample(Layout.LVM, base / "lvm.raw")
    return _refit(base, source, "lvm", "-r", "reset-identity", *APPLIANCE)


@pytest.fixture(scope="module")
def unprivileged(base: Path) -> Run:
    """GPT, reset-identity, as nobody with --backend auto (which must pick the appliance)."""
    home = base / "nobody-home"
    home.mkdir()
    writable_by(home, NOBODY, NOBODY)
    source = copy_sample(Layout.GPT, base / "gpt.raw")
    writable_by(source, NOBODY, NOBODY)
    work = base / "nobody-out"
    work.mkdir()
    writable_by(work, NOBODY, NOBODY)
    prefix = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    env = {"HOME": str(home), "CAREEN_STATE_DIR": str(home / "state"), "TMPDIR": str(home)}
    return _refit(
        work, source, "gpt", "-r", "reset-identity", "--accel", "tcg", prefix=prefix, env=env
    )


def _multi_segment_image(path: Path, scratch: Path) -> Path:
    """A disk whose root LV has two segments: the host path refuses it without dm."""
    size = 2048 * MiB
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
        input="type=8e\n",
        text=True,
        check=True,
        capture_output=True,
    )
    part = verify.Volume("partition 1", MiB, size - MiB, "LVM2_member")
    with verify.ro_loop(path, part.offset, part.size, writable=True) as dev:
        lvm = ["--devices", dev, "--config", LVM_CONFIG]
        sh("pvcreate", "-q", *lvm, dev)
        sh("vgcreate", "-q", *lvm, "-s", "4M", "segs", dev)
        sh("lvcreate", "-q", *lvm, "-an", "-Zn", "-L", "700M", "-n", "root", "segs")
        sh("lvcreate", "-q", *lvm, "-an", "-Zn", "-L", "8M", "-n", "pad", "segs")
        sh("lvextend", "-q", *lvm, "-L", "1400M", "segs/root")
        common = [*lvm, "--reportformat", "json", "--units", "b", "--nosuffix"]
        pvs = json.loads(sh("pvs", *common, "-o", "pe_start").stdout)
        lvs = json.loads(
            sh("lvs", *common, "-o", "lv_name,seg_pe_ranges,vg_extent_size", "segs/root").stdout
        )
    pe_start = int(pvs["report"][0]["pv"][0]["pe_start"])
    rows = lvs["report"][0]["lv"]
    extent = int(rows[0]["vg_extent_size"])
    ranges = [
        (int(a), int(b)) for r in rows for a, b in re.findall(r":(\d+)-(\d+)", r["seg_pe_ranges"])
    ]
    assert len(ranges) == 2, ranges
    # The root filesystem, written whole into a file, then laid out segment by segment.
    root = scratch / "root"
    sh("cp", "-al", sample_root(), root)
    put_file(root, "/etc/fstab", "/dev/segs/root / ext4 errors=remount-ro 0 1\n")
    fs = scratch / "root.ext4"
    total = sum(b - a + 1 for a, b in ranges) * extent
    sh("mke2fs", "-q", "-t", "ext4", "-d", root, fs, f"{total // 1024}k")
    pos = 0
    with fs.open("rb") as src, path.open("r+b") as dst:
        for first, last in ranges:
            length = (last - first + 1) * extent
            dst.seek(part.offset + pe_start + first * extent)
            src.seek(pos)
            left = length
            while left:
                chunk = src.read(min(left, 4 * MiB))
                dst.write(chunk)
                left -= len(chunk)
            pos += length
    sh("rm", "-rf", root, fs)
    return path


@pytest.fixture(scope="module")
def multi_segment(base: Path) -> Run:
    scratch = base / "build"
    scratch.mkdir()
    source = _multi_segment_image(base / "segments.raw", scratch)
    return _refit(base, source, "segments", "-r", "reset-identity", "--accel", "tcg")


@pytest.fixture(scope="module")
def spine_root(spine: Run) -> Iterator[Path]:
    with verify.mounted_root(spine.output) as root:
        yield root


@pytest.fixture(scope="module")
def spine_source_root(spine: Run) -> Iterator[Path]:
    with verify.mounted_root(spine.source) as root:
        yield root


def _cloud_state_gone(root: Path) -> None:
    cloud = root / "var/lib/cloud"
    assert not os.path.lexists(cloud / "instance")
    for name in ("instances", "sem", "data"):
        assert not (cloud / name).exists(), name
    assert not (root / "var/log/cloud-init.log").exists()


# ---- the spine's default recipe --------------------------------------------------------


@pytest.mark.timeout(900)
def test_spine_packages_changed(spine: Run, spine_root: Path, spine_source_root: Path) -> None:
    before = verify.dpkg_version(spine_source_root, "cloud-init")
    after = verify.dpkg_version(spine_root, "cloud-init")
    assert before and after and verify.version_greater(after, before)
    assert verify.dpkg_version(spine_source_root, "qemu-guest-agent") is None
    assert verify.dpkg_version(spine_root, "qemu-guest-agent") is not None
    changed = {p["name"]: p for p in spine.result["changes"]["packages"]["changed"]}
    assert changed["cloud-init"]["after"] == after
    assert "Backend: appliance (asked for)" in " ".join(spine.proc.stderr.split())


@pytest.mark.timeout(120)
def test_spine_cloud_state_and_caches(spine_root: Path, spine_source_root: Path) -> None:
    assert (spine_source_root / "var/lib/cloud/instances").is_dir()
    _cloud_state_gone(spine_root)
    assert list((spine_source_root / "var/cache/apt/archives").glob("*.deb"))
    assert not list((spine_root / "var/cache/apt/archives").glob("*.deb"))
    assert not list((spine_root / "var/cache/apt").glob("*.bin"))
    lists = {p.name for p in (spine_root / "var/lib/apt/lists").iterdir()}
    assert lists <= {"lock", "partial"}
    assert not os.path.lexists(spine_root / "usr/sbin/policy-rc.d")


@pytest.mark.timeout(120)
def test_spine_resolv_conf_exactly_as_before(spine_root: Path, spine_source_root: Path) -> None:
    before = verify.describe(spine_source_root / "etc/resolv.conf")
    assert verify.describe(spine_root / "etc/resolv.conf") == before


@pytest.mark.timeout(300)
def test_spine_source_unchanged_and_output_sound(spine: Run) -> None:
    assert spine.sha_after == spine.sha_before
    verify.sh("qemu-img", "check", spine.output)
    info = json.loads(verify.sh("qemu-img", "info", "--output=json", spine.output))
    assert info["format"] == "qcow2" and "backing-filename" not in info
    with verify.as_raw(spine.output) as raw:
        for vol in verify.volumes(raw):
            verify.fsck(raw, vol)


# ---- file-only recipes -----------------------------------------------------------------


@pytest.mark.timeout(900)
def test_lvm_reset_identity(lvm: Run) -> None:
    assert lvm.sha_after == lvm.sha_before
    mounted = {m["guest"]: m for m in lvm.result["mounts"]}
    assert mounted["/"]["source"] == "LV centos/root"
    assert mounted["/boot"]["type"] == "xfs"
    verify.sh("qemu-img", "check", lvm.output)
    with verify.mounted_root(lvm.output) as root:
        _cloud_state_gone(root)
        assert (root / "etc/machine-id").read_bytes() == b""
        assert not list((root / "etc/ssh").glob("ssh_host_*"))
    with verify.as_raw(lvm.output) as raw:
        for vol in verify.volumes(raw):
            verify.fsck(raw, vol)


@pytest.mark.timeout(900)
def test_unprivileged_gpt(unprivileged: Run) -> None:
    err = " ".join(unprivileged.proc.stderr.split())
    assert "Backend: appliance (not running as root" in err
    assert unprivileged.sha_after == unprivileged.sha_before
    assert unprivileged.output.stat().st_uid == NOBODY
    verify.sh("qemu-img", "check", unprivileged.output)
    with verify.mounted_root(unprivileged.output) as root:
        _cloud_state_gone(root)
        assert verify.describe(root / "etc/resolv.conf") == (
            "link",
            "../run/systemd/resolve/stub-resolv.conf",
        )


# ---- what only the appliance can do ----------------------------------------------------


@pytest.mark.timeout(900)
def test_multi_segment_lv_goes_to_the_appliance(multi_segment: Run, base: Path) -> None:
    err = " ".join(multi_segment.proc.stderr.split())
    assert "Backend: appliance (the host cannot mount this image" in err
    assert multi_segment.sha_after == multi_segment.sha_before
    mounted = {m["guest"]: m for m in multi_segment.result["mounts"]}
    assert mounted["/"]["source"] == "LV segs/root"
    removed = multi_segment.result["changes"]["paths"]["removed"]
    assert "/var/lib/cloud/instances" in removed
    verify.sh("qemu-img", "check", multi_segment.output)
    # The host backend, asked explicitly, refuses it and points at the appliance.
    refused = subprocess.run(
        [str(CAREEN), "inspect", str(multi_segment.source), "--backend", "host"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(base)},
    )
    assert refused.returncode != 0
    assert "--backend appliance" in refused.stderr


@pytest.mark.timeout(60)
def test_no_loop_or_mount_of_our_files_on_the_host(
    base: Path, spine: Run, lvm: Run, unprivileged: Run, multi_segment: Run
) -> None:
    for run in (spine, lvm, unprivileged, multi_segment):
        assert run.host_entries == set(), run.host_entries
    assert sample_image(Layout.MBR).exists()
