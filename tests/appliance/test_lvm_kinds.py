"""Striped and thin LVs: the appliance refits them; the host backend cannot assemble them.

The image (see lvm_images.py) has its root on a striped LV over two PVs and /srv on a
thin LV. One appliance refit with a file-only recipe that also writes and deletes on the
thin LV feeds the checks; a second, read-only libguestfs launch reads the output back
without careen. On a host without device-mapper the refit runs with `--backend auto`,
which must take the appliance, and `--backend host` must refuse the image by name.
"""

from __future__ import annotations

import json
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
from integration.util import CAREEN, assert_fails, careen, careen_env, sh, sha256

from careen.attach import dm
from careen.samples import sample_root

from .conftest import host_entries
from .lvm_images import ROOT_LV, SRV_LV, appliance, lv_types, shell, striped_thin_image

pytestmark = [pytest.mark.root, pytest.mark.images, pytest.mark.slow]

NO_DM = not dm.dm_available()
# Without device-mapper the host cannot assemble these LVs: auto must take the appliance.
APPLIANCE = ["--accel", "tcg", "--smp", "2", *(() if NO_DM else ("--backend", "appliance"))]
CHOICE = "the host cannot mount this image" if NO_DM else "asked for"
ROOT_PROOF = ("/etc/refit-proof", "written on the striped root")
SRV_PROOF = ("/srv/refit-proof", "written on the thin LV")
SRV_DELETED = "/srv/careen-repo/Release"
REFIT_TIMEOUT = 900  # a build of the image (first use) plus an appliance refit


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any]
    output: Path
    sha_before: str
    sha_after: str
    seen_on_host: set[str]  # loops and mounts naming our directory (the image's too)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="careen-lvm-kinds-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def image(base: Path) -> Path:
    """A private copy of the cached image: careen refuses two runs on one source, and
    another session may be refitting the cached one."""
    copy = base / "striped-thin.raw"
    sh("cp", "--sparse=always", striped_thin_image(), copy)
    return copy


def _watched(
    argv: list[str], env: dict[str, str], ours: Path
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `argv`, noting every loop device or mount naming `ours` that appears meanwhile."""
    already = host_entries(ours)
    seen: set[str] = set()
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    ) as child:
        deadline = time.monotonic() + REFIT_TIMEOUT - 120
        while child.poll() is None:
            if time.monotonic() > deadline:
                child.kill()
                raise AssertionError(f"{argv} ran longer than {REFIT_TIMEOUT - 120} s")
            seen |= host_entries(ours) - already
            time.sleep(0.5)
        stdout, stderr = child.communicate()
    seen |= host_entries(ours) - already
    return subprocess.CompletedProcess(argv, child.returncode, stdout, stderr), seen


@pytest.fixture(scope="module")
def refitted(image: Path, base: Path) -> Run:
    out = base / "refitted.qcow2"
    before = sha256(image)
    argv = [str(CAREEN), "refit", str(image), "-o", str(out), "--format", "json", *APPLIANCE]
    argv += ["-r", "reset-identity", "--delete", SRV_DELETED]
    argv += [arg for path, text in (ROOT_PROOF, SRV_PROOF) for arg in ("--write", f"{path}:{text}")]
    proc, seen = _watched(argv, careen_env(base), base)
    assert proc.returncode == 0, proc.stderr
    return Run(proc, json.loads(proc.stdout), out, before, sha256(image), seen)


@dataclass
class ReadBack:
    g: Any  # a read-only appliance with the output's root and /srv mounted read-only
    fsck: dict[str, str]  # LV -> e2fsck -fn's output, for those that reported problems


@pytest.fixture(scope="module")
def read_back(refitted: Run) -> Iterator[ReadBack]:
    """The output in a second, read-only appliance: checked, then mounted read-only."""
    with appliance(refitted.output, "qcow2", readonly=True) as g:
        problems = {}
        for lv in (ROOT_LV, SRV_LV):
            try:
                shell(g, f"e2fsck -fn {lv} 2>&1")
            except AssertionError as e:
                problems[lv] = str(e)
        g.mount_ro(ROOT_LV, "/")
        g.mount_ro(SRV_LV, "/srv")
        yield ReadBack(g, problems)


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_appliance_refits_striped_root_and_thin_srv(refitted: Run) -> None:
    log = " ".join(refitted.proc.stderr.split())
    assert f"Backend: appliance ({CHOICE}" in log, log
    mounted = {m["guest"]: m for m in refitted.result["mounts"]}
    assert mounted["/"]["source"] == "LV kinds/root"
    assert mounted["/srv"]["source"] == "LV kinds/srv"
    paths = refitted.result["changes"]["paths"]
    assert {ROOT_PROOF[0], SRV_PROOF[0]} <= set(paths["created"])
    assert {SRV_DELETED, "/var/lib/cloud/instances"} <= set(paths["removed"])
    assert refitted.sha_after == refitted.sha_before
    assert refitted.seen_on_host == set()
    verify.sh("qemu-img", "check", refitted.output)


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_read_back_shows_the_changes(read_back: ReadBack) -> None:
    g = read_back.g
    # Still the kinds of LV the image was made with: the refit went through them.
    kinds = lv_types(g)
    assert kinds["root"] == ("striped", 2)
    assert kinds["srv"][0] == "thin"
    assert g.read_file(ROOT_PROOF[0]).decode() == ROOT_PROOF[1]
    assert g.read_file(SRV_PROOF[0]).decode() == SRV_PROOF[1]
    assert not g.exists(SRV_DELETED)
    assert g.is_file("/srv/careen-repo/Packages")  # the rest of the thin LV is intact
    assert g.read_file("/etc/machine-id") == b""
    assert not [n for n in g.ls("/etc/ssh") if n.startswith("ssh_host_")]
    assert not g.exists("/var/lib/cloud/instances")
    assert not g.exists("/var/log/cloud-init.log")
    # What the source held, read from the root it was made from.
    assert (sample_root() / "var/lib/cloud/instances").is_dir()
    assert (sample_root() / SRV_DELETED.lstrip("/")).is_file()


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_read_back_filesystems_are_clean(read_back: ReadBack) -> None:
    assert read_back.fsck == {}


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not NO_DM,
    reason="the host has device-mapper: this is the refusal of a host with no device-mapper",
)
def test_host_backend_refuses(image: Path, base: Path) -> None:
    out = base / "host.qcow2"
    before = sha256(image)
    proc = careen(
        "refit", image, "-o", out, "--backend", "host", "-r", "reset-identity", tmpdir=base
    )
    assert_fails(proc, 1, r"no mountable Linux root found: .*kinds/root", "--backend appliance")
    assert not out.exists()
    assert sha256(image) == before
