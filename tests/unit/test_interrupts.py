"""A signal inside a critical window is held back until the window closes."""

from __future__ import annotations

import signal

import pytest

from careen import interrupts


def test_delivered_at_once_outside_a_window() -> None:
    with pytest.raises(interrupts.Interrupted) as e:
        interrupts.deliver(signal.SIGTERM)
    assert e.value.signum == signal.SIGTERM


def test_held_back_until_the_outermost_window_closes() -> None:
    done = []
    with pytest.raises(interrupts.Interrupted) as e, interrupts.critical():
        with interrupts.critical():
            interrupts.deliver(signal.SIGINT)
            interrupts.deliver(signal.SIGTERM)  # the first one counts
            done.append("inner")
        done.append("outer")
    assert done == ["inner", "outer"]
    assert e.value.signum == signal.SIGINT
    with interrupts.critical():  # nothing pending is left over
        pass


def test_uninterrupted_function_finishes_first() -> None:
    @interrupts.uninterrupted
    def release(log: list[str]) -> str:
        interrupts.deliver(signal.SIGINT)
        log.append("released")
        return "ok"

    log: list[str] = []
    with pytest.raises(interrupts.Interrupted):
        release(log)
    assert log == ["released"]
