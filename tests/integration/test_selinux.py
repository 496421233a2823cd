"""SELinux relabelling after a refit, on the host backend, checked from outside.

The SELinux sample (Debian's default policy, enforcing, every file labelled when it was
built) is refitted with a recipe that writes a new file in /etc and installs `tree`
from the guest's local repository. The output's root is mounted read-only by mount(8)
(verify.py); each label is read through the host kernel from the file's
`security.selinux` attribute, and the label the policy wants comes from the guest's own
`matchpathcon`, chrooted into that mount. None of careen's code reads either.

The fallback (no setfiles in the guest: /.autorelabel), a guest without SELinux, and the
decisions of `careen.guest.selinux` against a stand-in guest are tested here too.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from careen.guest import selinux
from careen.image.model import OSInfo
from careen.samples import Layout, sample_image

from . import verify
from .util import careen, copy_sample, refit_json

NEW_FILE = "/etc/careen-selinux-test"
# New inodes, all of them: a file careen wrote, files dpkg unpacked and rewrote, and the
# resolver file careen put back after the run. An old one stays as a control.
CHANGED = (
    NEW_FILE,
    "/usr/bin/tree",
    "/usr/share/doc/tree",
    "/usr/share/man/man1/tree.1.gz",
    "/var/lib/dpkg/status",
    "/etc/resolv.conf",
)
UNCHANGED = ("/etc/passwd", "/usr/bin/ls")
OPERATIONS = ("--write", f"{NEW_FILE}:labelled", "--install", "tree")
RELABELLED = "SELinux: relabelled with the guest's setfiles"


# ---- reading labels without careen ----------------------------------------------------


def label(root: Path, path: str) -> str | None:
    """The `security.selinux` attribute of `path` in the mounted `root`, or None."""
    try:
        raw = os.getxattr(root / path.lstrip("/"), "security.selinux", follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise
    return raw.rstrip(b"\0").decode()


def policy_label(root: Path, path: str) -> str:
    """What the guest's own policy says `path` should carry (its matchpathcon, chrooted)."""
    return verify.sh("chroot", root, "matchpathcon", "-n", path).strip()


def mislabelled(root: Path, paths: Sequence[str]) -> list[str]:
    """Every path whose label is not the one the guest's policy expects."""
    found = []
    for path in paths:
        got, want = label(root, path), policy_label(root, path)
        if got != want:
            found.append(f"{path}: {got} (the policy says {want})")
    return found


def selinux_notes(result: Mapping[str, Any]) -> list[str]:
    return [n for n in result["notes"] if "SELinux" in n]


# ---- the host backend, end to end -----------------------------------------------------


@dataclass
class Refitted:
    result: dict[str, Any]
    stderr: str
    output: Path


def _refit(layout: Layout, out: Path, *operations: str) -> Refitted:
    # A private copy: a run holds a lock on its source, and other tests use the cache's.
    source = copy_sample(layout, out.with_suffix(".source.raw"))
    proc = careen(
        "refit",
        source,
        "-o",
        out,
        "--backend",
        "host",
        "--format",
        "json",
        *operations,
        tmpdir=out.parent,
        timeout=600,
    )
    return Refitted(refit_json(proc), proc.stderr, out)


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory: pytest.TempPathFactory) -> Refitted:
    out = tmp_path_factory.mktemp("selinux") / "relabelled.qcow2"
    return _refit(Layout.SELINUX, out, *OPERATIONS)


@pytest.fixture(scope="module")
def relabelled_root(relabelled: Refitted) -> Iterator[Path]:
    with verify.mounted_root(relabelled.output) as root:
        yield root


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(600)
def test_the_sample_starts_labelled() -> None:
    with verify.mounted_root(sample_image(Layout.SELINUX)) as root:
        config = (root / "etc/selinux/config").read_text()
        assert "SELINUX=enforcing" in config and "SELINUXTYPE=default" in config
        assert not mislabelled(root, ("/etc/fstab", "/etc/resolv.conf", *UNCHANGED))
        assert not (root / ".autorelabel").exists()


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(600)
def test_changed_files_carry_the_policys_labels(
    relabelled: Refitted, relabelled_root: Path
) -> None:
    created = relabelled.result["changes"]["paths"]["created"]
    assert NEW_FILE in created and "/usr/bin/tree" in created
    assert not mislabelled(relabelled_root, (*CHANGED, *UNCHANGED))
    # A label from the policy, not a placeholder.
    assert label(relabelled_root, "/usr/bin/tree") == "system_u:object_r:bin_t:s0"
    assert label(relabelled_root, "/etc/resolv.conf") == "system_u:object_r:net_conf_t:s0"


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(600)
def test_the_note_and_the_log_say_setfiles_ran(relabelled: Refitted, relabelled_root: Path) -> None:
    (note,) = selinux_notes(relabelled.result)
    assert note.startswith(RELABELLED) and "policy default" in note
    assert RELABELLED in relabelled.stderr
    assert not os.path.lexists(relabelled_root / ".autorelabel")
    assert "/.autorelabel" not in relabelled.result["changes"]["paths"]["created"]


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(600)
def test_without_setfiles_the_guest_relabels_on_boot(tmp_path: Path) -> None:
    done = _refit(
        Layout.SELINUX,
        tmp_path / "fallback.qcow2",
        "--run",
        "rm /usr/sbin/setfiles",
        "--write",
        f"{NEW_FILE}:unlabelled",
    )
    (note,) = selinux_notes(done.result)
    assert "/.autorelabel" in note and "no setfiles in the guest" in note
    assert "/.autorelabel" in done.stderr
    with verify.mounted_root(done.output) as root:
        st = (root / ".autorelabel").lstat()
        assert stat.S_ISREG(st.st_mode)
        # Nothing labelled the new file: the guest's next boot must.
        assert label(root, NEW_FILE) is None


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(600)
def test_a_guest_without_selinux_is_not_relabelled(tmp_path: Path) -> None:
    done = _refit(Layout.MBR, tmp_path / "plain.qcow2", *OPERATIONS[:2])
    assert not selinux_notes(done.result)
    assert "Relabelling" not in done.stderr
    with verify.mounted_root(done.output) as root:
        assert not (root / "etc/selinux/config").exists()
        assert not os.path.lexists(root / ".autorelabel")
        assert label(root, NEW_FILE) is None


# ---- the decisions, against a stand-in guest ------------------------------------------


class FakeGuest:
    """A guest of a few files whose `run` records the command and answers as told."""

    def __init__(self, files: Mapping[str, bytes], returncode: int = 0) -> None:
        self.files = dict(files)
        self.returncode = returncode
        self.ran: list[list[str]] = []

    def read_bytes(self, path: str, limit: int = 16 << 20) -> bytes:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files[path] = data

    def lstat(self, path: str) -> os.stat_result | None:
        if path not in self.files:
            return None
        return os.stat_result((stat.S_IFREG | 0o644, 1000 + len(path), 0, 1, 0, 0, 0, 0, 0, 0))

    def readlink(self, path: str) -> str:
        raise OSError(errno.EINVAL, path)

    def symlink(self, target: str, path: str) -> None:
        raise NotImplementedError

    def chown(self, path: str, uid: int, gid: int) -> None:
        pass

    def delete(self, path: str) -> bool:
        return self.files.pop(path, None) is not None

    def listdir(self, path: str) -> list[str]:
        return []

    def walk(self, path: str = "/") -> Iterator[tuple[str, str]]:
        yield from ((p, "f") for p in sorted(self.files))

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        self.ran.append(list(argv))
        err = "setfiles: could not set context" if self.returncode else ""
        return subprocess.CompletedProcess(list(argv), self.returncode, "", err)


CONFIG = b"# comment\nSELINUX=enforcing\nSELINUXTYPE=mls  # the strict one\n"
MLS_CONTEXTS = "/etc/selinux/mls/contexts/files/file_contexts"


def _guest(returncode: int = 0) -> FakeGuest:
    files = {
        "/etc/selinux/config": CONFIG,
        "/usr/sbin/setfiles": b"",
        MLS_CONTEXTS: b"",
        "/etc/resolv.conf": b"nameserver 192.0.2.1\n",
        "/proc": b"",
        "/dev": b"",
    }
    return FakeGuest(files, returncode)


def _os(mode: str) -> OSInfo:
    return OSInfo("linux", "fedora", "40", "Fedora 40", selinux=mode)


@pytest.mark.parametrize("mode", ["disabled", "none"])
def test_no_relabel_unless_selinux_is_on(mode: str) -> None:
    guest = _guest()
    assert selinux.relabel(guest, _os(mode), timeout=None) is None
    assert not guest.ran and selinux.AUTORELABEL not in guest.files


@pytest.mark.parametrize("mode", ["enforcing", "permissive"])
def test_setfiles_runs_with_the_guests_policy(mode: str) -> None:
    guest = _guest()
    note = selinux.relabel(guest, _os(mode), timeout=60)
    assert note and note.startswith(RELABELLED) and "policy mls" in note
    ((shell, _c, _script, _name, inode, setfiles, *args),) = guest.ran
    assert shell == "/bin/sh"
    assert setfiles == "/usr/sbin/setfiles"
    assert inode == str(1000 + len("/etc/resolv.conf"))
    # Only the pseudo filesystems that exist are excluded, then the contexts and the root.
    assert args == ["-e", "/proc", "-e", "/dev", MLS_CONTEXTS, "/"]
    assert selinux.AUTORELABEL not in guest.files


def test_failing_setfiles_falls_back_to_autorelabel() -> None:
    guest = _guest(returncode=1)
    note = selinux.relabel(guest, _os("enforcing"), timeout=None)
    assert note and "/.autorelabel" in note and "setfiles exited 1" in note
    assert guest.files[selinux.AUTORELABEL] == b""


def test_missing_setfiles_or_contexts_fall_back_without_running() -> None:
    for missing in ("/usr/sbin/setfiles", MLS_CONTEXTS):
        guest = _guest()
        del guest.files[missing]
        note = selinux.relabel(guest, _os("permissive"), timeout=None)
        assert note and "/.autorelabel" in note and "no " in note, note
        assert not guest.ran and selinux.AUTORELABEL in guest.files


def test_policy_type_defaults_and_refuses_paths() -> None:
    guest = _guest()
    guest.files["/etc/selinux/config"] = b"SELINUX=enforcing\n"
    assert selinux.policy_type(guest) == "targeted"
    guest.files["/etc/selinux/config"] = b'SELINUXTYPE="default"\n'
    assert selinux.policy_type(guest) == "default"
    guest.files["/etc/selinux/config"] = b"SELINUXTYPE=../../../tmp\n"
    note = selinux.relabel(guest, _os("enforcing"), timeout=None)
    assert note and "not a policy name" in note and not guest.ran
