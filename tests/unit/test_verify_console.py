"""Reading the serial console: recorded boots of the bootable samples, fed in pieces."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from careen.verify import console as con
from careen.verify.console import Console

pytestmark = pytest.mark.timeout(30)

DATA = Path(__file__).parent / "data"
GOOD = DATA / "verify_good_boot.log"  # a refitted sample: new instance, login, status
BROKEN = DATA / "verify_broken_boot.log"  # manual_cache_clean: old hostname, refused login
GOOD_NONCE = "474bb18db3cc2a5b"


def replay(path: Path, chunk: int) -> Console:
    """A console fed the recorded bytes `chunk` at a time, as a socket would deliver them."""
    a, b = socket.socketpair()
    a.close()
    log = io.BytesIO()
    c = Console(b, log)
    data = path.read_bytes()
    for i in range(0, len(data), chunk):
        c.feed(data[i : i + chunk])
    b.close()
    assert log.getvalue() == data  # the saved log keeps the bytes as they came
    return c


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_escapes_and_carriage_returns_are_removed_however_the_bytes_arrive(chunk: int) -> None:
    text = replay(GOOD, chunk).text
    assert "\x1b" not in text and "\r" not in text
    assert "[  OK  ] Reached target multi-user.target - Multi-User System." in text
    assert text == replay(GOOD, 100000).text


def test_kernel_banner() -> None:
    m = con.KERNEL_BANNER.search(replay(GOOD, 13).text)
    assert m is not None and m.group(1) == "6.1.0-50-cloud-amd64"


def test_a_banner_cut_in_the_middle_is_not_taken_yet() -> None:
    a, b = socket.socketpair()
    c = Console(b, io.BytesIO())
    c.feed(b"[    0.000000] Linux version 6")
    assert con.KERNEL_BANNER.search(c.text) is None
    c.feed(b".1.0-50-cloud-amd64 (debian-kernel@lists.debian.org)\r\n")
    m = con.KERNEL_BANNER.search(c.text)
    assert m is not None and m.group(1) == "6.1.0-50-cloud-amd64"
    a.close()
    b.close()


def test_cloud_init_stages_and_finished_line() -> None:
    text = replay(GOOD, 64).text
    assert con.cloud_init_stages(text) == ["init-local", "init", "modules:config", "modules:final"]
    m = con.CLOUD_INIT_FINISHED.search(text)
    assert m is not None and m.group(1) == "22.4.2"
    assert "DataSourceNoCloud [seed=/dev/sr0]" in m.group(0)
    assert con.CLOUD_INIT_UNIT_FAILED.search(text) is None


def test_login_prompts_show_the_hostname() -> None:
    assert con.login_hostnames(replay(GOOD, 64).text)[0] == "careen-verify-87097cfb"
    assert set(con.login_hostnames(replay(BROKEN, 64).text)) == {"sample-guest"}


def test_a_refused_login_is_seen() -> None:
    text = replay(BROKEN, 5).text
    assert con.LOGIN_INCORRECT.search(text)
    assert con.PASSWORD_PROMPT.search(text)


def test_cloud_init_status_after_login() -> None:
    status = con.parse_status(replay(GOOD, 32).text, GOOD_NONCE)
    assert status == con.CloudInitStatus(
        "done", (), "DataSourceNoCloud [seed=/dev/sr0][dsmode=net]"
    )


def test_the_typed_command_never_matches_its_own_markers() -> None:
    command = con.status_command("abc123")
    assert con.parse_status(con.clean(command), "abc123") is None


def test_cloud_init_errors_are_reported() -> None:
    text = (
        "careen-n1-status\nstatus: error\ndetail:\nDataSourceNoCloud\n"
        'careen-n1-result\n{"v1": {"datasource": "DataSourceNoCloud", "errors": '
        "[\"('users-groups', KeyError('x'))\"]}}\n\ncareen-n1-end\n"
    )
    status = con.parse_status(text, "n1")
    assert status is not None
    assert status.status == "error"
    assert status.errors == ("('users-groups', KeyError('x'))",)


def test_a_missing_result_file_is_an_error() -> None:
    text = (
        "careen-n1-status\nstatus: running\ncareen-n1-result\n"
        "cat: /run/cloud-init/result.json: No such file or directory\n\ncareen-n1-end\n"
    )
    status = con.parse_status(text, "n1")
    assert status is not None and status.status == "running"
    assert status.errors and "result.json" in status.errors[0]


@pytest.mark.parametrize(
    "line",
    [
        "[FAILED] Failed to start cloud-final.service - Execute cloud user/final scripts.\n",
        "[FAILED] Failed to start cloud-init… job (metadata service crawler).\n",
    ],
)
def test_failed_cloud_init_units(line: str) -> None:
    assert con.CLOUD_INIT_UNIT_FAILED.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "ALERT!  UUID=00a28f75 does not exist.  Dropping to a shell!\n",
        "Gave up waiting for root file system device.  Common problems:\n",
        "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block\n",
        'You are in emergency mode. After logging in, type "journalctl -xb"\n',
    ],
)
def test_a_system_that_will_not_come_up(line: str) -> None:
    assert con.BOOT_FAILED.search(line)
