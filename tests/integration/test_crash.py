"""Fault injection: careen stopped at each stage of a refit, by SIGKILL, SIGINT and SIGTERM.

At each stage the test first checks that the stage's resource really exists (the
export daemon, a loop device over the export, the guest's command, the partial output),
then stops careen. The source must be unchanged. After SIGINT or SIGTERM careen must
have released everything itself and exited 130 or 143; after SIGKILL, `careen cleanup`
must release the rest. Either way the host must look as it did before: loop devices,
mount table, careen's processes, the work directory and careen's state directory.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from careen.samples import Layout, sample_image

from .verify import HostState, host_state, sh

pytestmark = [pytest.mark.root, pytest.mark.images]

CAREEN = Path(os.environ.get("CAREEN", Path(__file__).parents[2] / ".venv/bin/careen"))
GUEST_SLEEP = "sleep 4242"


def _procs(pattern: str, *, exact: bool = False) -> list[int]:
    flags = "-xf" if exact else "-f"
    out = subprocess.run(["pgrep", flags, pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@dataclass(frozen=True)
class World:
    host: HostState
    daemons: int
    guest_sleeps: int
    work: tuple[str, ...]
    state: tuple[str, ...]


def world(work: Path, state: Path) -> World:
    return World(
        host=host_state(),
        daemons=len(_procs("qemu-storage-daemon")),
        guest_sleeps=len(_procs(GUEST_SLEEP, exact=True)),
        work=tuple(sorted(str(p.relative_to(work)) for p in work.rglob("*"))),
        state=tuple(sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file())),
    )


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _has_loop_over(work: Path) -> bool:
    return str(work) in sh("losetup", "-a")


def _has_daemon_for(work: Path) -> bool:
    return bool(_procs(f"qemu-storage-daemon.*{work}"))


STAGES: dict[str, tuple[str | None, Callable[[Path], bool]]] = {
    # stage: (pause point or None, the resource that must exist there)
    "exported": ("exported", _has_daemon_for),
    "mounted": ("mounted", _has_loop_over),
    "guest-command": (None, lambda work: bool(_procs(GUEST_SLEEP, exact=True))),
    "writing-output": ("written", lambda work: bool(list(work.glob(".out.qcow2.careen-partial")))),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=str)
@pytest.mark.parametrize("stage", list(STAGES))
def test_stopped_run_leaves_nothing(stage: str, sig: signal.Signals, tmp_path: Path) -> None:
    source = sample_image(Layout.BARE)
    work = tmp_path / "work"
    state = tmp_path / "state"
    work.mkdir()
    state.mkdir()
    pause, exists = STAGES[stage]
    env = {**os.environ, "CAREEN_STATE_DIR": str(state)}
    if pause:
        env |= {"CAREEN_TEST_PAUSE": pause, "CAREEN_TEST_PAUSE_FILE": str(tmp_path / "paused")}
    before = world(work, state)
    sha_before = sha256(source)
    argv = [str(CAREEN), "-q", "refit", str(source), "-o", str(work / "out.qcow2")]
    argv += ["--reset-machine-id"]
    if stage == "guest-command":
        argv += ["--run", GUEST_SLEEP]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if pause:
            _wait(lambda: (tmp_path / "paused").exists(), f"careen to pause at {pause}")
        _wait(lambda: exists(work), f"the resource of stage {stage}")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sha256(source) == sha_before
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        _wait(
            lambda: not _procs(GUEST_SLEEP, exact=True) and not _has_daemon_for(work),
            "leftovers to die",
        )
        cleanup = subprocess.run(
            [str(CAREEN), "cleanup"], env=env, capture_output=True, text=True, timeout=120
        )
        assert cleanup.returncode == 0, cleanup.stderr
    else:
        assert proc.returncode == 128 + sig, err
        assert "Traceback" not in err
    assert world(work, state) == before


@pytest.mark.timeout(120)
def test_cleanup_leaves_live_runs_alone(tmp_path: Path) -> None:
    source = sample_image(Layout.BARE)
    state = tmp_path / "state"
    env = {
        **os.environ,
        "CAREEN_STATE_DIR": str(state),
        "CAREEN_TEST_PAUSE": "mounted",
        "CAREEN_TEST_PAUSE_FILE": str(tmp_path / "paused"),
    }
    proc = subprocess.Popen(
        [str(CAREEN), "-q", "refit", str(source), "-o", str(tmp_path / "out.qcow2"), "-r", "empty"],
        env=env,
    )
    try:
        _wait(lambda: (tmp_path / "paused").exists(), "careen to pause")
        for argv in (["cleanup", "--dry-run"], ["cleanup"], ["cleanup"]):
            done = subprocess.run(
                [str(CAREEN), *argv], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            assert "still running; left alone" in done.stdout
        assert _has_loop_over(tmp_path)
        assert proc.poll() is None
        # A second run on the same source is refused while the first holds it.
        second = subprocess.run(
            [str(CAREEN), "refit", str(source), "-o", str(tmp_path / "other.qcow2")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "is in use by careen run" in second.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 130
    assert not list((state / "runs").glob("*.journal"))
