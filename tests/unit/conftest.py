"""Unit tests run no real commands by accident: careen's process runner refuses here.

A test that means to run real commands says so with `@pytest.mark.real_commands`; a
test that records commands monkeypatches `careen.run.run` itself, over this guard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from careen import run


@pytest.fixture(autouse=True)
def no_real_commands(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.get_closest_marker("real_commands"):
        yield
        return

    def refuse(argv: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a unit test tried to run a real command: {list(argv)}")

    monkeypatch.setattr(run, "run", refuse)
    monkeypatch.setattr(run, "spawn", refuse)
    yield
