"""Shared fixtures and the suite's rules.

- Under CI (CI=true) a skipped test fails the run unless its reason names something
  this kind of host lacks (HOST_LACKS below, also in the README): a missing service or
  a broken fixture must be red, not quietly skipped.
- `host_state` records what a refit must leave as it was on the host.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Reasons a test may be skipped even under CI: what this kind of host cannot provide.
HOST_LACKS = ("no nbd", "no device-mapper", "no krbd", "no working KVM")


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and is_ci() and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
        if not any(lack in reason for lack in HOST_LACKS):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI, and not for a listed host limit: {reason}"


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool in a test (tests may use tools careen does not)."""
    return subprocess.run(
        [str(a) for a in argv], check=check, capture_output=True, text=True, timeout=600
    )


@dataclass(frozen=True)
class HostState:
    mounts: tuple[str, ...]
    loops: str
    resolv_conf: bytes
    hostname: str
    run_entries: frozenset[str]


def host_state() -> HostState:
    mounts = tuple(
        " ".join(line.split()[3:5])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
    return HostState(
        mounts=mounts,
        loops=run("losetup", "-a").stdout,
        resolv_conf=Path("/etc/resolv.conf").read_bytes(),
        hostname=socket.gethostname(),
        run_entries=frozenset(os.listdir("/run")),
    )


@pytest.fixture
def unchanged_host() -> Iterator[HostState]:
    """Fails the test if the host's mounts, loops, resolver, hostname or /run changed."""
    before = host_state()
    yield before
    after = host_state()
    assert after == before
