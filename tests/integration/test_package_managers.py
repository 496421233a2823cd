"""dnf, yum, zypper and apk, driven through stand-ins inside a real guest.

Each case is the Debian sample root dressed up as another distribution: its
/etc/os-release names that distribution, and the package manager's binary is a shell
script that appends its command line to /var/log/careen-standin.log and succeeds. rpm
is a stand-in too, printing a fixed package list (for apk, a small installed database).
After a refit the log is read back from the output with debugfs, so the test sees the
exact command lines careen ran in the guest, in order. A guest without any package
manager must refuse package steps before changing anything, and refit without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from .util import (
    Guarded,
    assert_fails,
    bare_image,
    careen,
    debugfs,
    ext4_cat,
    put_file,
    refit_json,
    remove,
    to_raw,
    variant_root,
)

pytestmark = [pytest.mark.root, pytest.mark.images]

LOG = "/var/log/careen-standin.log"
RPM_LOG = "/var/log/careen-standin-rpm.log"
# Arguments are joined with tabs, so the test sees exactly where each one ends.
STANDIN = f"""#!/bin/sh
# A stand-in for {{name}} in careen's tests: record the command line and succeed.
(IFS='\t'; printf '%s\\n' "{{name}}	$*") >> {LOG}
exit 0
"""
RPM = f"""#!/bin/sh
# A stand-in for rpm in careen's tests: a fixed package database.
(IFS='\t'; printf '%s\\n' "rpm	$*") >> {RPM_LOG}
case "$1" in
-qa) printf 'pkg-a\\t0:1.0-1.fc39\\npkg-c\\t2:3.4-5.fc39\\nkernel\\t0:6.5.6-300.fc39\\n' ;;
esac
exit 0
"""
APK_DB = "C:Q1abc=\nP:pkg-a\nV:1.0-r0\nA:x86_64\n\nC:Q1def=\nP:pkg-c\nV:3.4-r5\nA:x86_64\n\n"
RECIPE = """name: package-steps
steps:
  - update: all
  - update: [pkg-a]
  - install: [pkg-b]
  - remove: [pkg-c]
  - clean-caches: true
"""
RPM_QUERY = ["rpm", "-qa", "--qf", "%{NAME}\\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\\n"]


@dataclass(frozen=True)
class Distro:
    name: str
    os_release: str
    binary: str  # the package manager's path in the guest
    rpm: bool
    expected: tuple[tuple[str, ...], ...]


def _dnf_like(tool: str) -> tuple[tuple[str, ...], ...]:
    return (
        (tool, "-y", "makecache"),
        (tool, "-y", "upgrade"),
        (tool, "-y", "upgrade", "pkg-a"),
        (tool, "-y", "install", "pkg-b"),
        (tool, "-y", "remove", "pkg-c"),
        (tool, "clean", "all"),
    )


_Z = ("zypper", "--non-interactive")
DISTROS = {
    "dnf": Distro(
        "dnf",
        'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=39\n'
        'PRETTY_NAME="Fedora Linux 39 (Cloud Edition)"\n',
        "/usr/bin/dnf",
        rpm=True,
        expected=_dnf_like("dnf"),
    ),
    "yum": Distro(
        "yum",
        'NAME="CentOS Linux"\nVERSION="7 (Core)"\nID="centos"\nID_LIKE="rhel fedora"\n'
        'VERSION_ID="7"\nPRETTY_NAME="CentOS Linux 7 (Core)"\n',
        "/usr/bin/yum",
        rpm=True,
        expected=_dnf_like("yum"),
    ),
    "zypper": Distro(
        "zypper",
        'NAME="openSUSE Leap"\nVERSION="15.5"\nID="opensuse-leap"\nID_LIKE="suse opensuse"\n'
        'VERSION_ID="15.5"\nPRETTY_NAME="openSUSE Leap 15.5"\n',
        "/usr/bin/zypper",
        rpm=True,
        expected=(
            (*_Z, "refresh"),
            (*_Z, "update"),
            (*_Z, "update", "pkg-a"),
            (*_Z, "install", "pkg-b"),
            (*_Z, "remove", "pkg-c"),
            (*_Z, "clean", "--all"),
        ),
    ),
    "apk": Distro(
        "apk",
        'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.19.1\nPRETTY_NAME="Alpine Linux v3.19"\n',
        "/sbin/apk",
        rpm=False,
        expected=(
            ("apk", "update"),
            ("apk", "upgrade"),
            ("apk", "add", "--upgrade", "pkg-a"),
            ("apk", "add", "pkg-b"),
            ("apk", "del", "pkg-c"),
        ),
    ),
}


def _dress_up(root: Path, d: Distro) -> None:
    put_file(root, "/etc/os-release", d.os_release)
    for other in ("/usr/bin/dnf", "/usr/bin/yum", "/usr/bin/zypper", "/sbin/apk"):
        remove(root, other)
    put_file(root, d.binary, STANDIN.format(name=d.name), 0o755)
    if d.rpm:
        put_file(root, "/usr/bin/rpm", RPM, 0o755)
    else:
        put_file(root, "/lib/apk/db/installed", APK_DB)
        put_file(root, "/var/cache/apk/APKINDEX.00000000.tar.gz", "stale index\n")


def _log_lines(raw: Path, path: str) -> list[tuple[str, ...]]:
    return [tuple(line.split("\t")) for line in ext4_cat(raw, path).splitlines()]


def _inspect(image: Path, tmpdir: Path) -> dict[str, object]:
    proc = careen("inspect", image, "--format", "json", tmpdir=tmpdir)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", list(DISTROS))
def test_package_steps_run_the_guests_own_tool(tmp_path: Path, manager: str) -> None:
    d = DISTROS[manager]
    root = variant_root(tmp_path / "root")
    _dress_up(root, d)
    image = bare_image(root, tmp_path / f"{manager}.raw")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()

    facts = _inspect(image, tmpdir)["os"]
    assert isinstance(facts, dict)
    assert facts["package_manager"] == manager

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out.qcow2"
    guard = Guarded.before(tmp_path, tmpdir, [])  # test_errors checks sources stay intact
    result = refit_json(
        careen("refit", image, "-o", out, "-r", recipe, "--format", "json", tmpdir=tmpdir)
    )
    guard.assert_released(out)
    assert result["os"]["package_manager"] == manager
    assert result["changes"]["packages"] == {"changed": [], "installed": [], "removed": []}

    raw = to_raw(out, tmp_path / "out.raw")
    assert tuple(_log_lines(raw, LOG)) == d.expected
    if d.rpm:
        # The database is read with the guest's own rpm, before and after the steps.
        assert _log_lines(raw, RPM_LOG) == [tuple(RPM_QUERY)] * 2
    else:
        listing = debugfs(raw, "ls /var/cache/apk")
        assert "APKINDEX" not in listing, "apk's cache was not cleaned"
    # The stand-ins never ran on the host.
    assert not Path(LOG).exists()
    assert not Path(RPM_LOG).exists()


@pytest.mark.timeout(120)
def test_no_package_manager(tmp_path: Path) -> None:
    root = variant_root(tmp_path / "root")
    put_file(root, "/etc/os-release", DISTROS["dnf"].os_release)  # fedora, without dnf
    image = bare_image(root, tmp_path / "nopm.raw")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    facts = _inspect(image, tmpdir)["os"]
    assert isinstance(facts, dict)
    assert facts["package_manager"] is None

    out = tmp_path / "out.qcow2"
    guard = Guarded.before(tmp_path, tmpdir, [image])
    proc = careen(
        "refit",
        image,
        "-o",
        out,
        "--format",
        "json",
        "--write",
        "/etc/motd:x",
        "--install",
        "pkg-b",
        tmpdir=tmpdir,
    )
    assert_fails(proc, 1, "no package manager", "drop the update/install/remove steps")
    assert "Step 1/" not in proc.stderr, "a step ran before the recipe was refused"
    guard.assert_nothing_written(out)

    result = refit_json(
        careen(
            "refit",
            image,
            "-o",
            out,
            "--format",
            "json",
            "--write",
            "/etc/motd:no pm\n",
            "--clean-caches",
            "--reset-machine-id",
            tmpdir=tmpdir,
        )
    )
    guard.assert_released(out)
    assert any("no package manager" in n for n in result["notes"]), result["notes"]
    raw = to_raw(out, tmp_path / "out.raw")
    assert ext4_cat(raw, "/etc/motd") == "no pm\n"
    assert ext4_cat(raw, "/etc/machine-id") == ""
