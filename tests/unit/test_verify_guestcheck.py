"""What verify reads from an image before it boots it: kernels and the default user."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from careen.guest.base import RootGuest
from careen.verify import guestcheck

pytestmark = pytest.mark.timeout(30)

DEBIAN_CFG = """
users:
   - default
system_info:
   distro: debian
   default_user:
     name: debian
     lock_passwd: True
"""


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, RootGuest]]:
    guest = RootGuest(tmp_path)
    yield tmp_path, guest
    guest.close()


def test_default_user_from_cloud_cfg() -> None:
    assert guestcheck.default_user_from([DEBIAN_CFG]) == "debian"


def test_later_files_override_the_default_user() -> None:
    later = "system_info:\n  default_user:\n    name: cloud-user\n"
    assert guestcheck.default_user_from([DEBIAN_CFG, later]) == "cloud-user"
    assert guestcheck.default_user_from([DEBIAN_CFG, "user: admin\n"]) == "admin"
    assert guestcheck.default_user_from([DEBIAN_CFG, "user: {name: ops}\n"]) == "ops"


def test_no_default_user_and_broken_files() -> None:
    assert guestcheck.default_user_from(["users: []\n", ":\n  - [unclosed", "just text"]) is None


def test_default_user_read_from_the_guest(root: tuple[Path, RootGuest]) -> None:
    path, guest = root
    (path / "etc/cloud/cloud.cfg.d").mkdir(parents=True)
    (path / "etc/cloud/cloud.cfg").write_text(DEBIAN_CFG)
    (path / "etc/cloud/cloud.cfg.d/50_user.cfg").write_text(
        "system_info: {default_user: {name: x}}"
    )
    assert guestcheck.default_user(guest) == "x"


def test_no_kernel_in_an_empty_boot(root: tuple[Path, RootGuest]) -> None:
    path, guest = root
    (path / "boot").mkdir()
    (path / "boot/config-6.1.0").write_text("CONFIG_X=y\n")
    assert guestcheck.find_kernels(guest) == ()


def test_kernels_and_links_to_them(root: tuple[Path, RootGuest]) -> None:
    path, guest = root
    (path / "boot").mkdir()
    (path / "boot/vmlinuz-6.1.0-50-cloud-amd64").write_bytes(b"MZ kernel")
    (path / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-50-cloud-amd64")
    assert guestcheck.find_kernels(guest) == ("/boot/vmlinuz-6.1.0-50-cloud-amd64", "/vmlinuz")


def test_dangling_and_empty_kernels_do_not_count(root: tuple[Path, RootGuest]) -> None:
    path, guest = root
    (path / "boot").mkdir()
    (path / "vmlinuz").symlink_to("boot/vmlinuz-gone")
    (path / "boot/vmlinuz-empty").write_bytes(b"")
    (path / "boot/vmlinuz-loop").symlink_to("vmlinuz-loop")
    assert guestcheck.find_kernels(guest) == ()


def test_a_link_out_of_the_guest_stays_inside(root: tuple[Path, RootGuest]) -> None:
    path, guest = root
    # An absolute link is the guest's own path; the host's /boot is never looked at.
    (path / "vmlinuz").symlink_to("/etc/passwd")
    assert guestcheck.find_kernels(guest) == ()
