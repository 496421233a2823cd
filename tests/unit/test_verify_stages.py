"""The stage checks against a scripted guest on the other end of the serial socket."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from careen import run
from careen.verify import seed, stages
from careen.verify.console import Console
from careen.verify.stages import Outcome, Stage

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx0ZXN0a2V5dGVzdGtleXRlc3RrZXl0ZXN0a2V5 careen-verify"


class Guest(threading.Thread):
    """Prints a recorded boot, then answers the console as getty, login and a shell do."""

    def __init__(
        self, sock: socket.socket, boot: bytes, answer: Callable[[Guest, str], str]
    ) -> None:
        super().__init__(daemon=True)
        self.sock, self.boot, self.answer = sock, boot, answer
        self.state = "login"
        self.typed: list[str] = []
        self.swallow = 0  # characters of the first shell line that never reach the shell

    def run(self) -> None:
        for i in range(0, len(self.boot), 512):
            self.sock.sendall(self.boot[i : i + 512])
        buffer = ""
        try:
            while data := self.sock.recv(4096):
                buffer += data.decode()
                while "\r" in buffer:
                    line, buffer = buffer.split("\r", 1)
                    self.typed.append(line)
                    self.sock.sendall(self.answer(self, line).encode())
        except OSError:
            pass


def getty(hostname: str, password: str) -> Callable[[Guest, str], str]:
    def answer(guest: Guest, line: str) -> str:
        if guest.state == "login":
            if not line:
                return f"\r\n\r\n{hostname} login: "
            guest.state = "password"
            return f"{line}\r\nPassword: "
        if guest.state == "password":
            if line != password:
                guest.state = "login"
                return f"\r\n\r\nLogin incorrect\r\n{hostname} login: "
            guest.state = "shell"
            return "\r\nLinux guest\r\n$ "
        if guest.swallow:
            # What was typed while login still ran lost its start (seen on real boots).
            line, guest.swallow = line[guest.swallow :], 0
            if line.count('"') % 2:
                guest.state = "open quote"
        if guest.state == "open quote":
            return f"{line}\r\n> "  # bash waits for the closing quote, forever
        if m := re.fullmatch(r"echo careen-(\w+) \| tr a-z A-Z", line):
            return f"{line}\r\nCAREEN-{m.group(1).upper()}\r\n$ "
        if m := re.match(r'echo careen-"(\w+)"-status', line):
            n = m.group(1)
            return (
                f"{line}\r\ncareen-{n}-status\r\nstatus: done\r\ncareen-{n}-result\r\n"
                '{"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0]", "errors": []}}'
                f"\r\n\r\ncareen-{n}-end\r\n$ "
            )
        return f"{line}\r\n$ "

    return answer


@pytest.fixture
def ssh_answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, str]]]:
    """What the ssh client says, attempt by attempt (the last one repeats)."""
    answers: list[tuple[int, str]] = []

    def fake(argv: Any, *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert argv[0] == "ssh" and "BatchMode=yes" in argv
        code, text = answers.pop(0) if len(answers) > 1 else answers[0]
        nonce = argv[-1].split()[-1]
        out = nonce + "\n" if code == 0 else ""
        return subprocess.CompletedProcess(argv, code, out, "" if code == 0 else text)

    monkeypatch.setattr(run, "run", fake)
    monkeypatch.setattr(stages, "_SSH_PAUSE", 0.01)
    yield answers


def session(
    tmp_path: Path, boot_log: str, hostname: str | None, password: str | None, timeout: float = 10
) -> tuple[stages.Session, Guest]:
    md = seed.new_metadata("debian", KEY)
    ours, theirs = socket.socketpair()
    recorded = (DATA / boot_log).read_bytes()
    # Only the boot, up to cloud-init's last word: the scripted guest does the rest.
    boot = recorded[: recorded.index(b"Up ", recorded.index(b"finished at")) + 20] + b"\r\n"
    guest = Guest(theirs, boot, getty(hostname or md.hostname, password or md.password))
    guest.start()
    key = seed.KeyPair(tmp_path / "id", KEY)
    s = stages.Session(Console(ours, io.BytesIO()), md, key, 2222, timeout)
    return s, guest


def outcomes(results: list[stages.StageResult]) -> dict[Stage, Outcome]:
    return {r.stage: r.outcome for r in results}


def test_a_good_image_passes_every_stage(
    tmp_path: Path, ssh_answers: list[tuple[int, str]]
) -> None:
    ssh_answers += [(255, "kex_exchange_identification: Connection closed"), (0, "")]
    s, guest = session(tmp_path, "verify_good_boot.log", None, None)
    results = stages.run_stages(s)
    assert outcomes(results) == dict.fromkeys(Stage, Outcome.PASS)
    detail = {r.stage: r.detail for r in results}
    assert detail[Stage.KERNEL] == "Linux 6.1.0-50-cloud-amd64"
    assert "init-local, init, modules:config, modules:final" in detail[Stage.CLOUD_INIT]
    assert "status done, no errors" in detail[Stage.CLOUD_INIT]
    assert s.md.hostname in detail[Stage.HOSTNAME]
    assert guest.typed.count("debian") == 1 and s.md.password in guest.typed


def test_a_command_typed_ahead_survives_losing_its_start(
    tmp_path: Path, ssh_answers: list[tuple[int, str]]
) -> None:
    ssh_answers.append((0, ""))
    s, guest = session(tmp_path, "verify_good_boot.log", None, None)
    guest.swallow = 17
    results = stages.run_stages(s)
    assert outcomes(results)[Stage.PASSWORD] is Outcome.PASS
    assert guest.state == "shell"


def test_the_broken_image_fails_at_hostname_password_and_ssh(
    tmp_path: Path, ssh_answers: list[tuple[int, str]]
) -> None:
    ssh_answers.append((255, "debian@127.0.0.1: Permission denied (publickey,password)."))
    s, _guest = session(tmp_path, "verify_broken_boot.log", "sample-guest", "sample-password")
    results = stages.run_stages(s)
    assert outcomes(results) == {
        Stage.KERNEL: Outcome.PASS,
        Stage.CLOUD_INIT: Outcome.PASS,
        Stage.HOSTNAME: Outcome.FAIL,
        Stage.PASSWORD: Outcome.FAIL,
        Stage.SSH: Outcome.FAIL,
    }
    detail = {r.stage: r.detail for r in results}
    assert "'sample-guest'" in detail[Stage.HOSTNAME]
    assert "Login incorrect" in detail[Stage.PASSWORD]
    assert "Permission denied" in detail[Stage.SSH]
    assert "not checked" in detail[Stage.CLOUD_INIT]


def test_a_silent_console_fails_the_stage_and_skips_the_rest(
    tmp_path: Path, ssh_answers: list[tuple[int, str]]
) -> None:
    ours, theirs = socket.socketpair()
    md = seed.new_metadata("debian", KEY)
    s = stages.Session(
        Console(ours, io.BytesIO()), md, seed.KeyPair(tmp_path / "id", KEY), 2222, 0.5
    )
    theirs.sendall(b"SeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\n")
    results = stages.run_stages(s)
    assert results[0].outcome is Outcome.FAIL
    assert (
        "no kernel message" in results[0].detail and "Booting from Hard Disk" in results[0].detail
    )
    assert all(r.outcome is Outcome.SKIPPED for r in results[1:])
    theirs.close()


def test_a_vm_that_stops_fails_the_stage(
    tmp_path: Path, ssh_answers: list[tuple[int, str]]
) -> None:
    ours, theirs = socket.socketpair()
    md = seed.new_metadata("debian", KEY)
    s = stages.Session(
        Console(ours, io.BytesIO()), md, seed.KeyPair(tmp_path / "id", KEY), 2222, 10
    )
    theirs.sendall(b"[    0.000000] Linux version 6.1.0 (x)\r\nEnd of the world\r\n")
    theirs.close()
    results = stages.run_stages(s)
    assert results[0].outcome is Outcome.PASS
    assert results[1].outcome is Outcome.FAIL and "the VM stopped" in results[1].detail
    assert all(r.outcome is Outcome.SKIPPED for r in results[2:])
