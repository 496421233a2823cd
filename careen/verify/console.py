"""Following the guest's serial console: what it printed, and what the lines mean.

`Console` reads the serial port's socket into the saved log (the bytes as they came)
and into `text`, the same output with terminal escapes and carriage returns removed,
which the stage checks search with the patterns below. `expect()` waits until one of
several patterns appears after a given position, the VM dies, or a deadline passes:
each verdict comes from something the guest printed, and the deadline only bounds the
wait.

The pure functions at the end read a stretch of console text; the unit tests feed them
a recorded boot.
"""

from __future__ import annotations

import codecs
import json
import re
import select
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

# The kernel's banner, its first line on the console. Patterns that capture to the end
# of a word or line insist on seeing that end: the console arrives in pieces.
KERNEL_BANNER = re.compile(r"Linux version (\S+)\s")
# Later signs that a kernel runs, for images whose kernel logs quietly.
KERNEL_LATER = re.compile(r"Welcome to .*!|Cloud-init v\. \S+ running|^\S+ login: ", re.M)
CLOUD_INIT_RUNNING = re.compile(r"Cloud-init v\. (\S+) running '([^']+)'")
CLOUD_INIT_FINISHED = re.compile(r"Cloud-init v\. (\S+) finished at [^\n]*\n")
# systemd's "[FAILED] Failed to start cloud-final.service - Execute cloud user/final
# scripts." (older systemd names only the description).
CLOUD_INIT_UNIT_FAILED = re.compile(
    r"Failed to start (?:cloud-\S+\.service|[^\n]*cloud-init|[^\n]*cloud-config)[^\n]*\n", re.I
)
# The system will not come up: the kernel or the initramfs gave up, or systemd did.
BOOT_FAILED = re.compile(
    r"(?:Kernel panic - not syncing|ALERT! |Gave up waiting for root|VFS: Unable to mount root"
    r"|You are in emergency mode|Give root password for maintenance)[^\n]*\n"
)
LOGIN_PROMPT = re.compile(r"^(\S+) login: ", re.M)
PASSWORD_PROMPT = re.compile(r"[Pp]assword: ")
LOGIN_INCORRECT = re.compile(r"Login incorrect")
POWERED_OFF = re.compile(r"reboot: (?:Power down|Restarting system)|System halted")

_ESCAPE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()][0-9A-Za-z]|[@-Z\\-_])"
)
_UNFINISHED_ESCAPE = 32  # an escape this close to the end may still be arriving


def clean(text: str) -> str:
    """Console output without terminal escapes, carriage returns and NULs."""
    return _ESCAPE.sub("", text).replace("\r", "").replace("\x00", "")


class VMExited(Exception):
    """The VM stopped while a stage waited on its console."""


@dataclass
class Found:
    name: str
    match: re.Match[str]

    @property
    def end(self) -> int:
        return self.match.end()


@dataclass
class Console:
    """The serial console of a running VM (or any socket that produces console output)."""

    sock: socket.socket
    log: BinaryIO
    alive: Callable[[], bool] = lambda: True
    text: str = ""
    _pending: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    @property
    def position(self) -> int:
        return len(self.text)

    def feed(self, data: bytes) -> None:
        """Add bytes read from the console (also used by tests to replay a log)."""
        self.log.write(data)
        self.log.flush()
        chunk = self._pending + self._decoder.decode(data)
        cut = chunk.rfind("\x1b")
        if cut >= 0 and len(chunk) - cut < _UNFINISHED_ESCAPE and not _ESCAPE.match(chunk, cut):
            chunk, self._pending = chunk[:cut], chunk[cut:]
        else:
            self._pending = ""
        self.text += clean(chunk)

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def read(self, timeout: float) -> bool:
        """Wait up to `timeout` for output; False when the console closed."""
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        if not ready:
            return True
        data = self.sock.recv(65536)
        if not data:
            return False
        self.feed(data)
        return True

    def expect(
        self, patterns: Mapping[str, re.Pattern[str]], *, start: int, deadline: float
    ) -> Found | None:
        """The earliest match of any pattern after `start`; None at the deadline."""
        while True:
            found = first_match(self.text, patterns, start)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not self.read(min(left, 1.0)) or not self.alive():
                raise VMExited("the VM stopped")

    def pause(self, seconds: float) -> None:
        """Keep reading (and logging) for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.read(left):
                raise VMExited("the VM stopped")


def first_match(text: str, patterns: Mapping[str, re.Pattern[str]], start: int = 0) -> Found | None:
    best: Found | None = None
    for name, pattern in patterns.items():
        m = pattern.search(text, start)
        if m and (best is None or m.start() < best.match.start()):
            best = Found(name, m)
    return best


def cloud_init_stages(text: str) -> list[str]:
    """The cloud-init stages that announced themselves, in order (init-local, init, ...)."""
    return [m.group(2) for m in CLOUD_INIT_RUNNING.finditer(text)]


def login_hostnames(text: str) -> list[str]:
    return [m.group(1) for m in LOGIN_PROMPT.finditer(text)]


@dataclass(frozen=True)
class CloudInitStatus:
    status: str  # done, error, running, degraded done, ... ("" when not reported)
    errors: tuple[str, ...]
    datasource: str = ""


def status_command(nonce: str) -> str:
    """A shell line that prints cloud-init's verdict between markers.

    The markers are quoted in the command, so the echo of the typed line never matches.
    """
    begin, middle, end = (f'careen-"{nonce}"-{part}' for part in ("status", "result", "end"))
    return (
        f"echo {begin}; cloud-init status --long 2>&1; echo {middle}; "
        f"cat /run/cloud-init/result.json 2>&1; echo; echo {end}\r"
    )


def parse_status(text: str, nonce: str) -> CloudInitStatus | None:
    """cloud-init's status and errors from the output of `status_command()`."""
    m = re.search(
        rf"careen-{nonce}-status\n(.*?)careen-{nonce}-result\n(.*?)careen-{nonce}-end", text, re.S
    )
    if not m:
        return None
    long_status, result_json = m.group(1), m.group(2)
    status = re.search(r"^status: (.+)$", long_status, re.M)
    errors: list[str] = []
    datasource = ""
    try:
        result = json.loads(result_json).get("v1", {})
    except ValueError:
        errors = [f"cannot read /run/cloud-init/result.json: {result_json.strip()[:200]}"]
    else:
        errors = [str(e) for e in result.get("errors") or []]
        datasource = str(result.get("datasource") or "")
    return CloudInitStatus(status.group(1).strip() if status else "", tuple(errors), datasource)
