"""The spine, end to end: every sample layout refitted by both backends, checked from outside.

One refit per backend and layout (module-scoped) feeds every assertion about it. The
checks read the output with independent tools (see verify.py) and compare the host
before and after.

The host backend runs the default recipe on every layout, chosen by `--backend auto` as
root. The appliance costs a launch per image (about 45 s with a file-only recipe under
TCG, twice that with apt), so it does package work on one layout only and, on the
others, the default recipe's file-only steps (`-r empty --clean-caches
--reset-cloud-init`). The sample's apt sources name a repository inside the guest, so
the appliance's package run needs nothing beyond what the appliance test does already.
Each run refits a private copy of the sample in the test's own directory. While it goes
on, the host is watched: under the appliance no loop device or mount may name that
directory, and under the host backend no mount may (its mounts stay in its private
mount namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from appliance.conftest import host_entries

from careen.refit import Backend
from careen.samples import Layout, sample_image

from . import util, verify
from .util import HostTables, careen_env, copy_sample, sha256
from .verify import HostState, host_state

pytestmark = [pytest.mark.root, pytest.mark.images]

# The one layout where the appliance runs apt: qcow2, LVM and an xfs /boot at once.
APPLIANCE_APT_LAYOUT = Layout.LVM_QCOW2
APPLIANCE = ["--backend", "appliance", "--accel", "tcg", "--smp", "2"]
# cloud-init-refresh without its package steps.
FILE_ONLY = ["-r", "empty", "--clean-caches", "--reset-cloud-init"]
CAREEN = Path(os.environ.get("CAREEN", util.CAREEN))
REFIT_TIMEOUT = 900  # seconds: the first test of a case pays for its refit


@dataclass(frozen=True)
class Case:
    backend: Backend
    layout: Layout

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.layout}"

    @property
    def packages(self) -> bool:
        """Whether this run upgrades and installs packages."""
        return self.backend is Backend.HOST or self.layout is APPLIANCE_APT_LAYOUT

    @property
    def args(self) -> list[str]:
        if self.backend is Backend.HOST:
            return []  # auto: root, and the host can mount every sample
        return APPLIANCE if self.packages else [*FILE_ONLY, *APPLIANCE]


# The SELinux sample has its own tests on both backends (test_selinux.py and
# tests/appliance/test_selinux.py); its relabel would only slow this grid down.
SPINE_LAYOUTS = [layout for layout in Layout if layout is not Layout.SELINUX]
CASES = [
    *(pytest.param(Case(Backend.HOST, layout), id=f"host-{layout}") for layout in SPINE_LAYOUTS),
    *(
        pytest.param(
            Case(Backend.APPLIANCE, layout), id=f"appliance-{layout}", marks=pytest.mark.slow
        )
        for layout in SPINE_LAYOUTS
    ),
]


@dataclass
class Refit:
    case: Case
    source: Path
    output: Path
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any]
    sha_before: str
    sha_after: str
    host_before: HostState  # loop and mount tables aside: see table_changes
    host_after: HostState
    table_changes: list[str]  # loops and mounts, other runs' temporary directories aside
    seen_on_host: set[str]  # loops and mounts naming the test's directory, during the run

    @property
    def layout(self) -> Layout:
        return self.case.layout


def _entries(watched: Sequence[Path]) -> set[str]:
    return set().union(*(host_entries(path) for path in watched))


def run_watched(
    argv: Sequence[str], env: dict[str, str], watched: Sequence[Path], timeout: float
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `argv`, noting every loop device or mount naming `watched` that appears meanwhile."""
    already = _entries(watched)
    seen: set[str] = set()
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    ) as child:
        deadline = time.monotonic() + timeout
        while child.poll() is None:
            if time.monotonic() > deadline:
                child.kill()
                raise AssertionError(f"{argv} ran longer than {timeout} s")
            seen |= _entries(watched) - already
            time.sleep(0.5)
        stdout, stderr = child.communicate()
    seen |= _entries(watched) - already
    return subprocess.CompletedProcess(list(argv), child.returncode, stdout, stderr), seen


def _besides_tables(state: HostState) -> HostState:
    # Other sessions on this machine attach loops and mount under their own temporary
    # directories meanwhile; HostTables tells those apart.
    return replace(state, mounts=(), loops="")


def _table_changes(before: HostTables, ours: Path, wait: float = 5.0) -> list[str]:
    """What changed in the loop and mount tables, allowing the kernel to autoclear loops."""
    deadline = time.monotonic() + wait
    while (changes := before.changes(ours)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return changes


@pytest.fixture(scope="module", params=CASES)
def refit(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Refit]:
    case: Case = request.param
    base = tmp_path_factory.mktemp(f"refit-{case.id}")
    # A private copy: careen refuses a second run on the same source, and another
    # session may be refitting the cached sample right now.
    source = copy_sample(case.layout, base / f"source.{case.layout.suffix}")
    out = base / "refitted.qcow2"
    sha_before = sha256(source)
    host_before, tables = host_state(), HostTables.take()
    argv = [str(CAREEN), "refit", str(source), "-o", str(out), "--format", "json", *case.args]
    proc, seen = run_watched(argv, careen_env(base), [base], timeout=REFIT_TIMEOUT - 60)
    host_after, table_changes = host_state(), _table_changes(tables, base)
    assert proc.returncode == 0, proc.stderr
    yield Refit(
        case,
        source,
        out,
        proc,
        json.loads(proc.stdout),
        sha_before,
        sha256(source),
        _besides_tables(host_before),
        _besides_tables(host_after),
        table_changes,
        seen,
    )
    # Fourteen outputs and sources of a few hundred MiB each would otherwise stay in
    # pytest's kept temporary directories.
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def output_root(refit: Refit) -> Iterator[Path]:
    with verify.mounted_root(refit.output) as root:
        yield root


@pytest.fixture(scope="module")
def source_root(refit: Refit) -> Iterator[Path]:
    with verify.mounted_root(refit.source) as root:
        yield root


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_source_is_unchanged(refit: Refit) -> None:
    assert refit.sha_after == refit.sha_before


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_backend_is_the_one_meant(refit: Refit) -> None:
    log = " ".join(refit.proc.stderr.split())
    if refit.case.backend is Backend.HOST:
        assert "Backend: host (running as root" in log
    else:
        assert "Backend: appliance (asked for)" in log
        assert "Launching the libguestfs appliance (TCG)" in log


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_host_is_unchanged(refit: Refit) -> None:
    assert refit.table_changes == []
    assert refit.host_after == refit.host_before


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_nothing_of_ours_appeared_on_the_host(refit: Refit) -> None:
    """The appliance attaches and mounts nothing on the host; the host backend's mounts
    live in its private mount namespace (its loop devices are the host's, autocleared)."""
    if refit.case.backend is Backend.APPLIANCE:
        assert refit.seen_on_host == set()
    else:
        assert {e for e in refit.seen_on_host if e.startswith("mount ")} == set()


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_output_is_a_sound_qcow2(refit: Refit) -> None:
    info = json.loads(verify.sh("qemu-img", "info", "--output=json", refit.output))
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info
    verify.sh("qemu-img", "check", refit.output)
    # Trimmed and sparse: no bigger than the sample's data plus what was installed.
    data = sample_image(refit.layout).stat().st_blocks * 512
    assert refit.output.stat().st_size < data + (64 << 20)


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_filesystems_are_clean(refit: Refit) -> None:
    with verify.as_raw(refit.output) as raw:
        vols = [v for v in verify.volumes(raw) if v.type in ("ext4", "xfs")]
        assert vols
        for vol in vols:
            verify.fsck(raw, vol)


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_packages_changed_as_asked(refit: Refit, output_root: Path, source_root: Path) -> None:
    before = verify.dpkg_version(source_root, "cloud-init")
    after = verify.dpkg_version(output_root, "cloud-init")
    assert verify.dpkg_version(source_root, "qemu-guest-agent") is None
    packages = refit.result["changes"]["packages"]
    if not refit.case.packages:
        assert before and after == before
        assert verify.dpkg_version(output_root, "qemu-guest-agent") is None
        assert not any(packages.values()), packages
        return
    assert before and after and verify.version_greater(after, before)
    assert verify.dpkg_version(output_root, "qemu-guest-agent") is not None
    changed = {p["name"]: p for p in packages["changed"]}
    assert changed["cloud-init"]["before"] == before
    assert changed["cloud-init"]["after"] == after


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_cloud_init_state_is_gone(output_root: Path, source_root: Path) -> None:
    assert (source_root / "var/lib/cloud/instances").is_dir()
    cloud = output_root / "var/lib/cloud"
    assert not os.path.lexists(cloud / "instance")
    for name in ("instances", "sem", "data"):
        assert not (cloud / name).exists(), name
    assert not (cloud / "seed/nocloud").exists()
    assert not (output_root / "var/log/cloud-init.log").exists()


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_caches_are_empty(output_root: Path, source_root: Path) -> None:
    assert list((source_root / "var/cache/apt/archives").glob("*.deb"))
    assert not list((output_root / "var/cache/apt/archives").glob("*.deb"))
    assert not list((output_root / "var/cache/apt").glob("*.bin"))
    lists = {p.name for p in (output_root / "var/lib/apt/lists").iterdir()}
    assert lists <= {"lock", "partial"}


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_resolv_conf_is_exactly_as_before(
    refit: Refit, output_root: Path, source_root: Path
) -> None:
    before = verify.describe(source_root / "etc/resolv.conf")
    assert verify.describe(output_root / "etc/resolv.conf") == before
    if refit.layout is Layout.GPT:
        assert before == ("link", "../run/systemd/resolve/stub-resolv.conf")


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_nothing_of_careens_is_left_inside(output_root: Path) -> None:
    assert not os.path.lexists(output_root / "usr/sbin/policy-rc.d")
    leftovers = [
        str(p)
        for top in ("etc", "usr/sbin", "tmp", "var/lib/cloud")
        for p in (output_root / top).rglob("*careen*")
    ]
    assert leftovers == []


@pytest.mark.timeout(REFIT_TIMEOUT)
def test_every_fstab_filesystem_was_mounted(refit: Refit) -> None:
    mounted = {m["guest"]: m for m in refit.result["mounts"]}
    assert "/" in mounted
    if refit.layout in (Layout.LVM, Layout.LVM_QCOW2):
        assert mounted["/"]["source"] == "LV centos/root"
        assert mounted["/boot"]["type"] == "xfs"
