"""The one error type that reaches the user, with a hint on what to do."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    ID_TAKEN = 3  # the new image ID asked for is another image's (careen fleet)
    INTERRUPTED = 130


class CareenError(Exception):
    """A failure the user can act on: what went wrong, and what to do about it."""

    def __init__(self, message: str, hint: str = "", exit_code: ExitCode = ExitCode.FAILURE):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(CareenError):
    """The command line or a recipe asked for something that cannot be done."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint, ExitCode.USAGE)
