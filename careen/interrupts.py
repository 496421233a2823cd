"""Ctrl-C and SIGTERM as an exception, held back while a resource changes hands.

The CLI turns SIGINT and SIGTERM into `Interrupted`, so that every `with` block unwinds
and releases what it holds. Raised at an arbitrary point, though, it could land between
mounting a filesystem and registering its unmount, or halfway through putting back a
file in the guest. Code in such a window runs inside `critical()`: a signal arriving
there is remembered and raised when the window closes. Signals are process-wide, so
this state is too; it is only ever touched from the main thread.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; unwind and exit with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_depth = 0
_pending: int | None = None


def deliver(signum: int) -> None:
    """Called from the signal handler: raise now, or when the critical window closes."""
    global _pending
    if _depth:
        _pending = _pending or signum
        return
    raise Interrupted(signum)


@contextmanager
def critical() -> Iterator[None]:
    """Hold back `Interrupted` until the block is done."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


def uninterrupted(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run the whole function inside `critical()`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with critical():
            return fn(*args, **kwargs)

    return wrapper
