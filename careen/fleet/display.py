"""What a fleet run shows while it works: a line per event, and on a terminal a bar for
the fleet and one spinner per running image above them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class Lines:
    """One line per event, to `write` (stdout, or stderr when stdout carries JSON)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write

    def started(self, source_id: str, name: str, attempt: int) -> None:
        self.write(f"start   {source_id} {name!r} (attempt {attempt})")

    def ended(self, source_id: str, line: str) -> None:
        self.write(line)

    def say(self, line: str) -> None:
        self.write(line)

    def close(self) -> None:
        pass


class Live(Lines):
    """The lines, printed above a live display: the fleet's bar (images finished of the
    plan's) and each running image with its time so far."""

    def __init__(self, total: int, finished: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        super().__init__(lambda line: self.console.print(line, highlight=False))
        self.progress = Progress(
            SpinnerColumn(),
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.fleet = self.progress.add_task("fleet", total=total, completed=finished)
        self.running: dict[str, Any] = {}

    def started(self, source_id: str, name: str, attempt: int) -> None:
        super().started(source_id, name, attempt)
        self.running[source_id] = self.progress.add_task(f"  {name or source_id}", total=None)

    def ended(self, source_id: str, line: str) -> None:
        super().ended(source_id, line)
        task = self.running.pop(source_id, None)
        if task is not None:
            self.progress.remove_task(task)
        if not line.startswith(("again", "stopped")):
            self.progress.advance(self.fleet)

    def say(self, line: str) -> None:
        super().say(line)
        if line.startswith("skipped"):
            self.progress.advance(self.fleet)

    def close(self) -> None:
        self.progress.stop()


def for_run(fmt: str, total: int, finished: int) -> Lines:
    """The live display on a terminal with text output; plain lines otherwise."""
    if fmt == "json":
        return Lines(lambda line: print(line, file=sys.stderr, flush=True))
    if sys.stderr.isatty() and sys.stdout.isatty():
        return Live(total, finished)
    return Lines(lambda line: print(line, flush=True))
