"""The five checks of a verification boot, in the order the guest reaches them.

    kernel      "Linux version" on the serial console
    cloud-init  its stages announce themselves and it prints "Cloud-init v. ... finished
                at"; after login, `cloud-init status --long` and result.json show no errors
    hostname    the login prompt says "HOSTNAME login:" with the metadata's hostname
    password    logging in on the console as the default user with the metadata's
                password makes the shell echo a nonce ("Login incorrect" fails it)
    ssh         the system ssh client logs in with the generated key (key only, batch
                mode) through the forwarded port and echoes a nonce ("Permission denied"
                fails it)

Every verdict comes from something the guest said; each stage also has a time limit,
and a stage that runs out of time fails with what was last seen. After such a silent
failure the console stages that follow are skipped, since they would only wait too.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from careen import run
from careen.verify import console as con
from careen.verify.console import Console, VMExited
from careen.verify.seed import KeyPair, Metadata

log = logging.getLogger(__name__)

_RESEND = 4.0  # seconds between nudges of a console that has not answered yet
_SSH_ATTEMPT = 45.0
_SSH_PAUSE = 3.0
_STATUS_TIMEOUT = 90.0


class Stage(StrEnum):
    KERNEL = "kernel"
    CLOUD_INIT = "cloud-init"
    HOSTNAME = "hostname"
    PASSWORD = "password"
    SSH = "ssh"


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StageResult:
    stage: Stage
    outcome: Outcome
    seconds: float
    detail: str


@dataclass
class Session:
    """What the checks need: the console, the metadata given, and how to reach SSH."""

    console: Console
    md: Metadata
    key: KeyPair
    ssh_port: int
    timeout: float  # per stage
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    mark: int = 0  # console position where the next stage starts looking
    prompt_end: int | None = None  # just after the login prompt the password stage uses
    logged_in: bool = False


class _Stop(Exception):
    """The stage failed in a way that leaves the later console stages nothing to see."""

    reason = "skipped: the system did not come up"


class _Silent(_Stop):
    """A stage ran out of time without a positive signal either way."""

    reason = "skipped: an earlier stage got no answer"


def run_stages(session: Session) -> list[StageResult]:
    """Run every check against the booting VM; the results in stage order."""
    checks: list[tuple[Stage, Callable[[Session], tuple[Outcome, str]]]] = [
        (Stage.KERNEL, _kernel),
        (Stage.CLOUD_INIT, _cloud_init),
        (Stage.HOSTNAME, _hostname),
        (Stage.PASSWORD, _password),
        (Stage.SSH, _ssh),
    ]
    results: list[StageResult] = []
    stop_reason = ""
    for stage, check in checks:
        if stop_reason:
            results.append(StageResult(stage, Outcome.SKIPPED, 0.0, stop_reason))
            continue
        start = time.monotonic()
        try:
            outcome, detail = check(session)
        except _Stop as e:
            outcome, detail = Outcome.FAIL, str(e)
            stop_reason = e.reason
        except VMExited:
            outcome, detail = Outcome.FAIL, "the VM stopped: " + _last_lines(session.console)
            stop_reason = "skipped: the VM stopped"
        results.append(StageResult(stage, outcome, time.monotonic() - start, detail))
        log.info("%s: %s (%s)", stage, outcome, detail)
    if session.logged_in:
        return _check_cloud_init_errors(session, results)
    return [
        replace(r, detail=r.detail + "; its errors were not checked (no login)")
        if r.stage is Stage.CLOUD_INIT and r.outcome is Outcome.PASS
        else r
        for r in results
    ]


def _deadline(session: Session) -> float:
    return time.monotonic() + session.timeout


def _last_lines(console: Console, count: int = 2) -> str:
    lines = [line.strip() for line in console.text.splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "nothing on the console"


def _silent(session: Session, what: str) -> _Silent:
    return _Silent(
        f"{what} in {session.timeout:.0f} s; last on the console: " + _last_lines(session.console)
    )


def _kernel(session: Session) -> tuple[Outcome, str]:
    patterns = {"banner": con.KERNEL_BANNER, "later": con.KERNEL_LATER, "off": con.POWERED_OFF}
    found = session.console.expect(patterns, start=0, deadline=_deadline(session))
    if found is None:
        raise _silent(session, "no kernel message on the serial console")
    session.mark = found.end
    if found.name == "off":
        raise _Stop(f"the guest stopped: {found.match.group(0)}")
    if found.name == "later":
        return Outcome.PASS, "the system runs (the kernel's banner was not on the console)"
    return Outcome.PASS, f"Linux {found.match.group(1)}"


def _cloud_init(session: Session) -> tuple[Outcome, str]:
    patterns = {
        "finished": con.CLOUD_INIT_FINISHED,
        "failed": con.CLOUD_INIT_UNIT_FAILED,
        "stuck": con.BOOT_FAILED,
        "off": con.POWERED_OFF,
    }
    found = session.console.expect(patterns, start=session.mark, deadline=_deadline(session))
    stages = con.cloud_init_stages(session.console.text)
    ran = f"stages {', '.join(stages)} ran" if stages else "no stage announced itself"
    if found is None:
        raise _silent(session, f"cloud-init did not finish ({ran})")
    session.mark = found.end
    if found.name in ("stuck", "off"):
        raise _Stop(f"the system did not come up: {found.match.group(0).strip()}")
    if found.name != "finished":
        return Outcome.FAIL, f"{found.match.group(0).strip()} ({ran})"
    return Outcome.PASS, f"cloud-init {found.match.group(1)}: {ran}, then finished"


def _hostname(session: Session) -> tuple[Outcome, str]:
    # The prompt may have come before cloud-init finished; an empty line brings a new one.
    found = _nudge_until(session, "\r", {"prompt": con.LOGIN_PROMPT}, start=session.mark)
    if found is None:
        raise _silent(session, "no login prompt on the serial console")
    session.prompt_end = found.end
    name = found.match.group(1)
    expected = session.md.hostname
    if name == expected or name.split(".")[0] == expected:
        return Outcome.PASS, f"login prompt: {name}"
    return Outcome.FAIL, f"the login prompt says {name!r}, not {expected!r}"


def _password(session: Session) -> tuple[Outcome, str]:
    console, md = session.console, session.md
    assert session.prompt_end is not None
    console.send(md.user + "\r")
    patterns = {"password": con.PASSWORD_PROMPT, "incorrect": con.LOGIN_INCORRECT}
    found = console.expect(patterns, start=session.prompt_end, deadline=_deadline(session))
    if found is None:
        raise _silent(session, f"no password prompt after the user name {md.user}")
    if found.name == "incorrect":
        return Outcome.FAIL, f"Login incorrect for {md.user} before any password"
    console.send(md.password + "\r")
    # Typed ahead and repeated until the shell answers: see nonce_command().
    patterns = {
        "nonce": re.compile(nonce_reply(session.nonce) + "\n"),
        "incorrect": con.LOGIN_INCORRECT,
    }
    command = nonce_command(session.nonce) + "\r"
    found = _nudge_until(session, command, patterns, start=found.end)
    if found is None:
        raise _silent(session, f"neither a shell nor a refusal after logging in as {md.user}")
    session.mark = found.end
    if found.name == "incorrect":
        return Outcome.FAIL, (
            f"Login incorrect: {md.user} does not have the password from the metadata"
        )
    session.logged_in = True
    return Outcome.PASS, f"logged in on the serial console as {md.user}; the shell echoed a nonce"


def nonce_command(nonce: str) -> str:
    """A shell line whose output, never its echo, shows the nonce (see nonce_reply()).

    Typed ahead while login still runs, its first characters may be swallowed before the
    shell reads the rest. So it has no quotes or brackets: whatever is left of it must
    never leave the shell waiting for a closing quote, or no later attempt gets through.
    """
    return f"echo careen-{nonce} | tr a-z A-Z"


def nonce_reply(nonce: str) -> str:
    return f"CAREEN-{nonce.upper()}"


def _nudge_until(
    session: Session, nudge: str, patterns: dict[str, re.Pattern[str]], *, start: int
) -> con.Found | None:
    """Send `nudge`, then again every few seconds, until a pattern appears after `start`."""
    deadline = _deadline(session)
    while time.monotonic() < deadline:
        session.console.send(nudge)
        step_deadline = min(deadline, time.monotonic() + _RESEND)
        found = session.console.expect(patterns, start=start, deadline=step_deadline)
        if found is not None:
            return found
    return None


def _ssh(session: Session) -> tuple[Outcome, str]:
    md = session.md
    argv = ssh_argv(session.key.private, session.ssh_port, md.user)
    argv.append(f"echo careen-ssh-{session.nonce}")
    deadline = _deadline(session)
    last = "no attempt"
    while time.monotonic() < deadline:
        timeout = max(5.0, min(_SSH_ATTEMPT, deadline - time.monotonic()))
        try:
            done = run.run(argv, timeout=timeout, check=False)
        except run.CommandError as e:
            if e.returncode == 127:
                raise
            last = f"ssh did not finish in {timeout:.0f} s"
            continue
        if done.returncode == 0 and f"careen-ssh-{session.nonce}" in done.stdout:
            return Outcome.PASS, f"key login as {md.user} through 127.0.0.1:{session.ssh_port}"
        err = " ".join(done.stderr.split())
        if "Permission denied" in err:
            return Outcome.FAIL, f"the key was refused: {err}"
        last = err or f"ssh exited {done.returncode}"
        session.console.pause(_SSH_PAUSE)  # keeps the serial log and notices a dead VM
    raise _Silent(f"no SSH login in {session.timeout:.0f} s; last: {last}")


def ssh_argv(key: object, port: int, user: str) -> list[str]:
    """The host's ssh client with the generated key only: no agent, no config, no prompts."""
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        str(key),
        "-p",
        str(port),
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "PreferredAuthentications=publickey",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "LogLevel=ERROR",
        f"{user}@127.0.0.1",
    ]


def _check_cloud_init_errors(session: Session, results: list[StageResult]) -> list[StageResult]:
    """After a console login, let cloud-init's own record confirm or overturn its stage."""
    console = session.console
    start = console.position
    console.send(con.status_command(session.nonce))
    end = re.compile(f"careen-{session.nonce}-end\n")
    try:
        found = console.expect(
            {"end": end}, start=start, deadline=time.monotonic() + _STATUS_TIMEOUT
        )
    except VMExited:
        found = None
    status = con.parse_status(console.text[start:], session.nonce) if found else None
    out = []
    for r in results:
        if r.stage is Stage.CLOUD_INIT and r.outcome is Outcome.PASS:
            r = _with_status(r, status)
        out.append(r)
    return out


def _with_status(result: StageResult, status: con.CloudInitStatus | None) -> StageResult:
    if status is None:
        return replace(result, detail=result.detail + "; its status could not be read")
    if status.errors or status.status.startswith("error"):
        problems = "; ".join(status.errors) or f"status {status.status}"
        return replace(result, outcome=Outcome.FAIL, detail=f"cloud-init reported: {problems}")
    where = f" from {status.datasource}" if status.datasource else ""
    return replace(
        result, detail=result.detail + f"; status {status.status or 'unknown'}, no errors{where}"
    )
