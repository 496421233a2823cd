"""The spine, end to end: the default recipe on every sample layout, checked from outside.

One refit per layout (module-scoped) feeds every assertion about it. The checks read
the output with independent tools (see verify.py) and compare the host before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from careen.samples import Layout, sample_image

from . import verify
from .verify import HostState, host_state

pytestmark = [pytest.mark.root, pytest.mark.images]

CAREEN = Path(os.environ.get("CAREEN", Path(__file__).parents[2] / ".venv/bin/careen"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Refit:
    layout: Layout
    source: Path
    output: Path
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any]
    sha_before: str
    sha_after: str
    host_before: HostState
    host_after: HostState


@pytest.fixture(scope="module", params=list(Layout), ids=str)
def refit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Refit:
    layout: Layout = request.param
    source = sample_image(layout)
    out = tmp_path_factory.mktemp(f"refit-{layout}") / "refitted.qcow2"
    sha_before = sha256(source)
    host_before = host_state()
    proc = subprocess.run(
        [CAREEN, "refit", source, "-o", out, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    host_after = host_state()
    assert proc.returncode == 0, proc.stderr
    return Refit(
        layout,
        source,
        out,
        proc,
        json.loads(proc.stdout),
        sha_before,
        sha256(source),
        host_before,
        host_after,
    )


@pytest.fixture(scope="module")
def output_root(refit: Refit) -> Iterator[Path]:
    with verify.mounted_root(refit.output) as root:
        yield root


@pytest.fixture(scope="module")
def source_root(refit: Refit) -> Iterator[Path]:
    with verify.mounted_root(refit.source) as root:
        yield root


@pytest.mark.timeout(600)
def test_source_is_unchanged(refit: Refit) -> None:
    assert refit.sha_after == refit.sha_before


@pytest.mark.timeout(60)
def test_host_is_unchanged(refit: Refit) -> None:
    assert refit.host_after == refit.host_before


@pytest.mark.timeout(120)
def test_output_is_a_sound_qcow2(refit: Refit) -> None:
    info = json.loads(verify.sh("qemu-img", "info", "--output=json", refit.output))
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info
    verify.sh("qemu-img", "check", refit.output)
    # Trimmed and sparse: no bigger than the source's data plus what was installed.
    assert refit.output.stat().st_size < refit.source.stat().st_blocks * 512 + (64 << 20)


@pytest.mark.timeout(300)
def test_filesystems_are_clean(refit: Refit) -> None:
    with verify.as_raw(refit.output) as raw:
        vols = [v for v in verify.volumes(raw) if v.type in ("ext4", "xfs")]
        assert vols
        for vol in vols:
            verify.fsck(raw, vol)


@pytest.mark.timeout(60)
def test_packages_really_changed(refit: Refit, output_root: Path, source_root: Path) -> None:
    before = verify.dpkg_version(source_root, "cloud-init")
    after = verify.dpkg_version(output_root, "cloud-init")
    assert before and after and verify.version_greater(after, before)
    assert verify.dpkg_version(source_root, "qemu-guest-agent") is None
    assert verify.dpkg_version(output_root, "qemu-guest-agent") is not None
    changed = {p["name"]: p for p in refit.result["changes"]["packages"]["changed"]}
    assert changed["cloud-init"]["before"] == before
    assert changed["cloud-init"]["after"] == after


@pytest.mark.timeout(60)
def test_cloud_init_state_is_gone(output_root: Path, source_root: Path) -> None:
    assert (source_root / "var/lib/cloud/instances").is_dir()
    cloud = output_root / "var/lib/cloud"
    assert not os.path.lexists(cloud / "instance")
    for name in ("instances", "sem", "data"):
        assert not (cloud / name).exists(), name
    assert not (cloud / "seed/nocloud").exists()
    assert not (output_root / "var/log/cloud-init.log").exists()


@pytest.mark.timeout(60)
def test_caches_are_empty(output_root: Path, source_root: Path) -> None:
    assert list((source_root / "var/cache/apt/archives").glob("*.deb"))
    assert not list((output_root / "var/cache/apt/archives").glob("*.deb"))
    assert not list((output_root / "var/cache/apt").glob("*.bin"))
    lists = {p.name for p in (output_root / "var/lib/apt/lists").iterdir()}
    assert lists <= {"lock", "partial"}


@pytest.mark.timeout(60)
def test_resolv_conf_is_exactly_as_before(
    refit: Refit, output_root: Path, source_root: Path
) -> None:
    before = verify.describe(source_root / "etc/resolv.conf")
    assert verify.describe(output_root / "etc/resolv.conf") == before
    if refit.layout is Layout.GPT:
        assert before == ("link", "../run/systemd/resolve/stub-resolv.conf")


@pytest.mark.timeout(60)
def test_nothing_of_careens_is_left_inside(output_root: Path) -> None:
    assert not os.path.lexists(output_root / "usr/sbin/policy-rc.d")
    leftovers = [
        str(p)
        for top in ("etc", "usr/sbin", "tmp", "var/lib/cloud")
        for p in (output_root / top).rglob("*careen*")
    ]
    assert leftovers == []


@pytest.mark.timeout(60)
def test_every_fstab_filesystem_was_mounted(refit: Refit) -> None:
    mounted = {m["guest"]: m for m in refit.result["mounts"]}
    assert "/" in mounted
    if refit.layout in (Layout.LVM, Layout.LVM_QCOW2):
        assert mounted["/"]["source"] == "LV centos/root"
        assert mounted["/boot"]["type"] == "xfs"
