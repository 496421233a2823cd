"""`careen verify` and `careen refit --verify` on real images, booted under QEMU.

Three boots in all (minutes under TCG): the broken bootable sample fails at the
password stage; `careen refit --verify` of it publishes an image that passed every
stage; that image passes again with a config drive instead of a NoCloud seed, and its
bytes are the same afterwards. The refusals (no kernel, Windows, --in-place) boot
nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from integration.util import assert_fails, careen, partial, sha256

from careen.samples import Layout, sample_image
from careen.samples.bootable import BootableKind, bootable_sample
from careen.samples.windows import WindowsKind, windows_sample

pytestmark = [pytest.mark.root, pytest.mark.images]

BOOT_TIMEOUT = 1100  # seconds for one careen run that boots: five stages, TCG, busy host


def stages(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["stage"]: s for s in data["stages"]}


def refused_without_a_boot(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """A refusal run with --debug (so a traceback is expected): its lines, and no qemu."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(line.startswith("careen: error: ") and message in line for line in lines), lines
    assert "careen: hint: " in proc.stderr and "nothing was booted" in proc.stderr
    # --debug logs every command: neither a boot nor the KVM probe started a qemu.
    assert "qemu-system" not in proc.stderr


def no_work_left(tmpdir: Path) -> None:
    assert not list(tmpdir.glob("careen-*")), list(tmpdir.iterdir())


@pytest.fixture(scope="module")
def broken() -> Path:
    return bootable_sample(BootableKind.BROKEN)


@pytest.fixture(scope="module")
def refitted(broken: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`careen refit BROKEN -o OUT --verify`: the run, its output, and the source's hash."""
    base = tmp_path_factory.mktemp("refit")
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    out = base / "refitted.qcow2"
    before = sha256(broken)
    proc = careen(
        "refit", broken, "-o", out, "--verify", "--format", "json",
        tmpdir=tmpdir, timeout=BOOT_TIMEOUT,
    )  # fmt: skip
    return {"proc": proc, "out": out, "tmpdir": tmpdir, "source_sha": before, "source": broken}


@pytest.mark.boot
@pytest.mark.slow
@pytest.mark.timeout(BOOT_TIMEOUT + 200)
def test_broken_sample_fails_at_the_password_stage(broken: Path, tmp_path: Path) -> None:
    before = sha256(broken)
    proc = careen("verify", broken, "--format", "json", tmpdir=tmp_path, timeout=BOOT_TIMEOUT)
    error = assert_fails(proc, 1, "failed boot verification at: .*password", "serial log")
    data = json.loads(proc.stdout)
    got = stages(data)
    assert got["kernel"]["result"] == "pass", got
    assert got["cloud-init"]["result"] == "pass", got
    assert got["password"]["result"] == "fail", got
    assert "Login incorrect" in got["password"]["detail"]
    # The previous instance's hostname: cloud-init never saw the new one either.
    assert "sample-guest" in got["hostname"]["detail"]
    assert data["passed"] is False
    log = Path(data["serial_log"])
    assert str(log) in proc.stderr and log.is_file()
    assert "Login incorrect" in log.read_text(errors="replace")
    assert "Linux version" in log.read_text(errors="replace")
    assert "password" in error
    assert sha256(broken) == before
    no_work_left(tmp_path)
    log.unlink()


@pytest.mark.boot
@pytest.mark.slow
@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_refit_with_verify_publishes_an_image_that_passed(refitted: dict[str, Any]) -> None:
    proc, out = refitted["proc"], refitted["out"]
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert any("boot verification passed" in note for note in result["notes"]), result["notes"]
    assert out.is_file() and not partial(out).exists()
    # What was verified is what was published: the temporary file, renamed.
    assert "Booting the image" in proc.stderr and ".careen-partial" in proc.stderr
    for stage in ("kernel", "cloud-init", "hostname", "password", "ssh"):
        assert f"INFO {stage}: pass" in proc.stderr, proc.stderr
    assert sha256(refitted["source"]) == refitted["source_sha"]
    no_work_left(refitted["tmpdir"])


@pytest.mark.boot
@pytest.mark.slow
@pytest.mark.timeout(BOOT_TIMEOUT + 200)
def test_refitted_image_passes_with_a_config_drive_and_is_unchanged(
    refitted: dict[str, Any], tmp_path: Path
) -> None:
    out: Path = refitted["out"]
    if refitted["proc"].returncode != 0:
        pytest.fail("the refit with --verify failed; see the test above")
    before = sha256(out)
    proc = careen(
        "verify", out, "--datasource", "configdrive", "--format", "json",
        tmpdir=tmp_path, timeout=BOOT_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    data = json.loads(proc.stdout)
    assert data["passed"] is True and data["datasource"] == "configdrive"
    assert {s["result"] for s in data["stages"]} == {"pass"}
    assert "DataSourceConfigDrive" in stages(data)["cloud-init"]["detail"]
    assert data["serial_log"] is None  # kept only when something failed
    assert sha256(out) == before
    no_work_left(tmp_path)


@pytest.mark.timeout(300)
def test_an_image_without_a_kernel_is_refused_without_a_boot(tmp_path: Path) -> None:
    image = sample_image(Layout.MBR)
    start = time.monotonic()
    proc = careen("--debug", "verify", image, tmpdir=tmp_path)
    took = time.monotonic() - start
    refused_without_a_boot(proc, "no bootable kernel")
    assert took < 120, f"took {took:.0f} s"
    no_work_left(tmp_path)


@pytest.mark.timeout(600)
def test_windows_is_refused_without_a_boot(tmp_path: Path) -> None:
    image = windows_sample(WindowsKind.CLEAN)
    proc = careen("--debug", "verify", image, tmpdir=tmp_path)
    refused_without_a_boot(proc, "boot verification is not supported for Windows images yet")
    assert "libguestfs" not in proc.stderr
    no_work_left(tmp_path)


@pytest.mark.timeout(60)
def test_verify_with_in_place_is_a_usage_error(tmp_path: Path) -> None:
    # Refused before the image is even opened: a name that does not exist will do.
    proc = careen("refit", tmp_path / "absent.raw", "--in-place", "--verify", tmpdir=tmp_path)
    assert_fails(proc, 2, "--verify needs -o", "careen verify")
