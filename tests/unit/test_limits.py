"""The fleet's per-host limits, with real processes holding real locks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from careen import limits
from careen.errors import UsageError

HOLDER = """
import json, sys, time
from careen import limits
with limits.slot(sys.argv[1]):
    start = time.time()
    time.sleep(0.4)
    print(json.dumps([start, time.time()]))
"""

PACER = """
import json, sys, time
from careen import limits
times = []
for _ in range(int(sys.argv[1])):
    limits.pace()
    times.append(time.time())
print(json.dumps(times))
"""


def _run_all(code: str, args: list[str], n: int, env: dict[str, str]) -> list[Any]:
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env)
        for _ in range(n)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        out.append(json.loads(stdout))
    return out


def _most_at_once(spans: list[list[float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = most = 0
    for _, step in events:
        level += step
        most = max(most, level)
    return most


@pytest.mark.real_commands
@pytest.mark.timeout(60)
@pytest.mark.parametrize("count", [1, 2])
def test_slots_hold_processes_to_the_limit(tmp_path: Path, count: int) -> None:
    env = dict(os.environ)
    env |= limits.as_env({"downloads": count}, tmp_path / "limits")
    spans = _run_all(HOLDER, ["downloads"], 4, env)
    assert _most_at_once(spans) == count


@pytest.mark.real_commands
@pytest.mark.timeout(60)
def test_an_unlimited_kind_does_not_wait(tmp_path: Path) -> None:
    env = dict(os.environ)
    env |= limits.as_env({"downloads": 1}, tmp_path / "limits")
    spans = _run_all(HOLDER, ["appliances"], 3, env)
    assert _most_at_once(spans) == 3


@pytest.mark.real_commands
@pytest.mark.timeout(60)
def test_a_killed_holder_frees_its_slot(tmp_path: Path) -> None:
    env = dict(os.environ)
    env |= limits.as_env({"rbd-copies": 1}, tmp_path / "limits")
    sleeper = "from careen import limits\nimport time\nwith limits.slot('rbd-copies'):\n"
    sleeper += "    print('held', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", sleeper], stdout=subprocess.PIPE, env=env)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    holder.kill()
    holder.wait()
    start = time.time()
    (span,) = _run_all(HOLDER, ["rbd-copies"], 1, env)
    assert span[0] - start < 5


@pytest.mark.real_commands
@pytest.mark.timeout(60)
def test_the_glance_rate_is_shared_by_processes(tmp_path: Path) -> None:
    env = dict(os.environ)
    env |= limits.as_env({"glance-rate": 20}, tmp_path / "limits")
    runs = _run_all(PACER, ["5"], 3, env)
    times = sorted(t for run in runs for t in run)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.05 - 0.005  # 20 a second, whoever asks


def test_limits_are_checked() -> None:
    assert limits.parse(["downloads=2", "glance-rate=2.5"]) == {
        "downloads": 2,
        "glance-rate": 2.5,
    }
    for bad in ("downloads", "downloads=0", "uploads=1", "appliances=x", "rbd-copies=1.5"):
        with pytest.raises(UsageError):
            limits.parse([bad])
    assert limits.as_env({}, Path("/x")) == {}
