"""Shared fixtures and the suite's rules.

- Under CI (CI=true) a skipped test fails the run unless its reason names something
  this kind of host lacks (HOST_LACKS below, also in the README): a missing service or
  a broken fixture must be red, not quietly skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Reasons a test may be skipped even under CI: what this kind of host cannot provide.
HOST_LACKS = ("no nbd", "no device-mapper", "no krbd", "no working KVM")

# The session fixture `cloud` (a real Keystone and Glance), for any test that asks for it.
pytest_plugins = ["services.fixtures"]


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
