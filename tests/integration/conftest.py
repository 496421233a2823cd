"""Fixtures for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .verify import HostState, host_state


@pytest.fixture
def unchanged_host() -> Iterator[HostState]:
    """Fails the test if the host's mounts, loops, resolver, hostname or /run changed."""
    before = host_state()
    yield before
    assert host_state() == before
