"""RootGuest keeps every path inside the guest root, whatever the guest's symlinks say."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from careen.errors import CareenError
from careen.guest import session
from careen.guest.base import RootGuest, glob


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Stands for the host's files that a hostile guest aims at."""
    h = tmp_path / "host"
    (h / "etc").mkdir(parents=True)
    (h / "etc" / "shadow").write_text("host secret\n")
    (h / "etc" / "hostname").write_text("the-host\n")
    return h


@pytest.fixture
def guest(tmp_path: Path, host: Path) -> Iterator[RootGuest]:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "shadow").write_text("guest shadow\n")
    (root / "etc" / "hostname").write_text("guest\n")
    # Absolute, and relative with more .. than the root has depth, at the host's files.
    (root / "etc" / "resolv.conf").symlink_to(host / "etc" / "shadow")
    (root / "etc" / "machine-id").symlink_to("../../../../../../../.." + str(host / "etc/hostname"))
    (root / "var").symlink_to(host)
    g = RootGuest(root)
    yield g
    g.close()


def test_reads_resolve_inside_the_root(guest: RootGuest, host: Path) -> None:
    # The absolute link names HOST/etc/shadow; inside the root that path does not exist.
    with pytest.raises(FileNotFoundError):
        guest.read_bytes("/etc/resolv.conf")
    with pytest.raises(FileNotFoundError):
        guest.read_bytes("/etc/machine-id")
    assert guest.read_bytes("/etc/../../../etc/shadow") == b"guest shadow\n"


def test_writes_replace_links_and_never_touch_the_host(guest: RootGuest, host: Path) -> None:
    guest.write_bytes("/etc/resolv.conf", b"nameserver 192.0.2.1\n")
    guest.write_bytes("/etc/machine-id", b"")
    assert (host / "etc" / "shadow").read_text() == "host secret\n"
    assert (host / "etc" / "hostname").read_text() == "the-host\n"
    st = guest.lstat("/etc/resolv.conf")
    assert st is not None and stat.S_ISREG(st.st_mode)
    assert guest.read_bytes("/etc/resolv.conf") == b"nameserver 192.0.2.1\n"


def test_writes_through_a_linked_directory_stay_inside(guest: RootGuest, host: Path) -> None:
    # /var -> HOST: a write to /var/etc/shadow must land in the guest's own tree or fail.
    with pytest.raises(FileNotFoundError):
        guest.write_bytes("/var/etc/shadow", b"owned\n")
    assert (host / "etc" / "shadow").read_text() == "host secret\n"


def test_delete_removes_the_link_not_its_target(guest: RootGuest, host: Path) -> None:
    assert guest.delete("/var")
    assert guest.delete("/etc/resolv.conf")
    assert (host / "etc" / "shadow").exists()
    assert not guest.delete("/etc/resolv.conf")


def test_glob_and_walk_stay_inside(guest: RootGuest, host: Path) -> None:
    assert glob(guest, "/etc/*") == [
        "/etc/hostname",
        "/etc/machine-id",
        "/etc/resolv.conf",
        "/etc/shadow",
    ]
    walked = dict(guest.walk("/"))
    assert walked["/var"] == "l"
    assert not any(p.startswith("/var/") for p in walked)


def test_fifo_is_refused_without_hanging(guest: RootGuest, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "guest" / "etc" / "os-release")
    result: list[BaseException] = []

    def read() -> None:
        try:
            guest.read_bytes("/etc/os-release")
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=read)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a FIFO hung"
    assert isinstance(result[0], CareenError)


def test_resolver_is_put_back_exactly(guest: RootGuest, tmp_path: Path) -> None:
    root = tmp_path / "guest"
    (root / "etc" / "resolv.conf").unlink()
    (root / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    with session.replaced(guest, "/etc/resolv.conf", b"nameserver 192.0.2.9\n", 0o644):
        assert (root / "etc" / "resolv.conf").read_bytes() == b"nameserver 192.0.2.9\n"
    assert os.readlink(root / "etc" / "resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"


def test_a_file_keeps_bytes_mode_and_owner(guest: RootGuest, tmp_path: Path) -> None:
    path = tmp_path / "guest" / "etc" / "hostname"
    path.chmod(0o600)
    os.chown(path, 1234, 5678) if os.geteuid() == 0 else None
    before = path.stat()
    with session.replaced(guest, "/etc/hostname", b"other\n", 0o644):
        assert path.read_bytes() == b"other\n"
    after = path.stat()
    assert path.read_bytes() == b"guest\n"
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )


def test_missing_file_is_missing_again(guest: RootGuest, tmp_path: Path) -> None:
    with session.replaced(guest, "/etc/new", b"x", 0o644):
        assert (tmp_path / "guest" / "etc" / "new").exists()
    assert not (tmp_path / "guest" / "etc" / "new").exists()
