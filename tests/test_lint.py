"""The code stays typed and formatted: mypy --strict and ruff run with the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [
        ["mypy"],
        ["ruff", "check", "careen", "tests", "scripts"],
        ["ruff", "format", "--check", "careen", "tests", "scripts"],
    ],
    ids=["mypy", "ruff-check", "ruff-format"],
)
@pytest.mark.timeout(300)
def test_lint(argv: list[str]) -> None:
    tool = BIN / argv[0]
    done = subprocess.run([str(tool), *argv[1:]], cwd=TOP, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_place_starts_processes() -> None:
    offenders = [
        str(p.relative_to(TOP))
        for p in (TOP / "careen").rglob("*.py")
        if p.name != "run.py"
        and any(
            f"subprocess.{f}(" in p.read_text() for f in ("run", "Popen", "check_output", "call")
        )
    ]
    assert offenders == []
