"""Progress as nested, timed steps; the CLI decides how they are shown."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("careen")


@contextmanager
def step(title: str) -> Iterator[None]:
    """Log a step at INFO when it starts and its duration at DEBUG when it ends."""
    log.info("%s", title)
    start = time.monotonic()
    try:
        yield
    finally:
        log.debug("%s: %.2f s", title, time.monotonic() - start)
