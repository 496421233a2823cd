"""Release what was acquired, in reverse order, and report every release that failed.

`Resources` is an ExitStack whose callbacks never raise through each other: a release
that fails is logged at once and collected, the remaining releases still run, and the
error that started the unwinding (if any) is the one that propagates. Each release runs
inside `critical()`, so Ctrl-C cannot cut one in half. When the body
succeeded but a release failed, a `CareenError` lists what is left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from types import TracebackType

from careen.errors import CareenError
from careen.interrupts import critical

log = logging.getLogger(__name__)


class ReleaseError(CareenError):
    def __init__(self, failures: list[str]) -> None:
        super().__init__(
            f"{len(failures)} resource(s) could not be released: " + "; ".join(failures),
            hint="see the log above; unmount or detach what is listed by hand",
        )
        self.failures = failures


class Resources(ExitStack):
    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def release(self, what: str, fn: Callable[[], object]) -> None:
        """Register `fn` to release `what` when the stack unwinds."""

        def guarded() -> None:
            # A signal during a release is held back until it is done; it then unwinds
            # the rest of the stack like any other interruption.
            with critical():
                try:
                    fn()
                except Exception as e:
                    log.error("could not release %s: %s", what, e)
                    self.failures.append(f"{what}: {e}")

        self.callback(guarded)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        suppressed = super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.failures:
            raise ReleaseError(self.failures)
        return bool(suppressed)
