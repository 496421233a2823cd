"""Progress as nested, timed steps; the CLI decides how they are shown."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

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


def progress_bar(what: str, total: int, stack: ExitStack) -> Callable[[int], None] | None:
    """A transfer bar on a terminal (None elsewhere), closed with `stack`; call it with
    the bytes done so far."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    stack.enter_context(bar)
    task = bar.add_task(what, total=total)
    return lambda done: bar.update(task, completed=done)
