"""Bad input gets one clear error line and a hint, the right exit status, and loses nothing.

Every case runs the real `careen refit` CLI as a subprocess and then checks what the
failure left behind: the host's loop devices and mount table as before, no `careen-*`
work directory beside the output or in $TMPDIR, neither the output nor its hidden
partial file, and the source's bytes unchanged. Interrupting a refit with SIGINT or
SIGTERM while a guest command runs must release everything the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from careen.samples import Layout, sample_image

from .util import (
    CAREEN,
    Guarded,
    assert_fails,
    careen,
    careen_env,
    copy_sample,
    ext4_cat,
    kill_all,
    processes_running,
    refit_json,
    sh,
    to_raw,
    wait_for_process,
)


@dataclass
class Case:
    """A test's directories: the output goes to `out`, careen's $TMPDIR is `tmpdir`."""

    base: Path
    tmpdir: Path
    out: Path


def _case(base: Path) -> Case:
    (base / "tmp").mkdir()
    (base / "out").mkdir()
    return Case(base, base / "tmp", base / "out" / "new.qcow2")


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return _case(tmp_path)


@pytest.fixture(scope="module")
def bare_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bare sample as qcow2: a tenth of the raw's bytes to copy and hash."""
    dest = tmp_path_factory.mktemp("samples") / "bare.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", sample_image(Layout.BARE), dest)
    return dest


def _copy(src: Path, dest: Path) -> Path:
    sh("cp", "--sparse=always", src, dest)
    return dest


def refit_fails(
    c: Case,
    image: Path,
    *extra: str | Path,
    status: int = 1,
    message: str,
    hint: str = "",
    sources: tuple[Path, ...] = (),
) -> str:
    """Run a refit that must fail cleanly and leave nothing behind; return the error."""
    guard = Guarded.before(c.base, c.tmpdir, [image, *sources])
    proc = careen("refit", image, "-o", c.out, "--format", "json", *extra, tmpdir=c.tmpdir)
    error = assert_fails(proc, status, message, hint)
    assert proc.stdout == "", "a failed refit printed a result"
    guard.assert_nothing_written(c.out)
    return error


# ---- the file itself ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_missing_file(case: Case) -> None:
    refit_fails(case, case.base / "no-such.qcow2", message="no such file", hint="path")


@pytest.mark.timeout(30)
def test_directory(case: Case) -> None:
    (case.base / "adir").mkdir()
    refit_fails(case, case.base / "adir", message="is a directory", hint="image file")


@pytest.mark.timeout(30)
def test_empty_file(case: Case) -> None:
    (case.base / "empty.qcow2").touch()
    refit_fails(case, case.base / "empty.qcow2", message="is empty", hint="fetch it again")


@pytest.mark.timeout(30)
def test_unknown_format(case: Case) -> None:
    image = case.base / "disk.qed"
    sh("qemu-img", "create", "-q", "-f", "qed", image, "64M")
    refit_fails(case, image, message="format 'qed'", hint="qemu-img convert")


@pytest.mark.images
@pytest.mark.timeout(60)
def test_truncated_qcow2(case: Case) -> None:
    image = case.base / "truncated.qcow2"
    copy_sample(Layout.MBR_QCOW2, image)
    os.truncate(image, 4 << 20)
    refit_fails(case, image, message="damaged.*truncated", hint="fetch the image again")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("version", ["luks1", "luks2"])
def test_luks(case: Case, version: str) -> None:
    image = case.base / f"disk.{version}"
    image.touch()
    os.truncate(image, 32 << 20)
    # cryptsetup rather than `qemu-img create -f luks`, whose key-derivation benchmark
    # fails on a busy host ("Unable to get accurate CPU usage").
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            version,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file=-",
            str(image),
        ],
        input=b"passphrase",
        check=True,
        capture_output=True,
        timeout=60,
    )
    if version == "luks1":
        refit_fails(case, image, message="encrypted", hint="decrypt")
    else:
        # qemu 7.2 reads only LUKS1 headers, so a LUKS2 disk probes as raw; careen then
        # finds the LUKS volume where it looks for filesystems.
        refit_fails(case, image, message="LUKS-encrypted", hint="encrypted images")


@pytest.mark.timeout(30)
def test_external_data_file(case: Case) -> None:
    image, data = case.base / "disk.qcow2", case.base / "disk.data"
    sh(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"data_file={data},data_file_raw=on",
        image,
        "64M",
    )
    refit_fails(case, image, message="external file", hint="--data-file", sources=(data,))


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(120)
def test_backing_file_refused_unless_named(case: Case) -> None:
    base = copy_sample(Layout.BARE, case.base / "base.raw")
    top = case.base / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    refit_fails(case, top, message="backing file", hint="--backing-file", sources=(base,))

    guard = Guarded.before(case.base, case.tmpdir, [top, base])
    proc = careen(
        "refit",
        top,
        "-o",
        case.out,
        "--backing-file",
        base,
        "--format",
        "json",
        "--write",
        "/etc/motd:layered\n",
        tmpdir=case.tmpdir,
    )
    result = refit_json(proc)
    assert result["output"] == str(case.out)
    assert result["source"]["backing_file"] == str(base)
    guard.assert_released(case.out)
    info = sh("qemu-img", "info", "--output=json", case.out).stdout
    assert "backing-filename" not in info, "the output still depends on the backing file"
    raw = to_raw(case.out, case.base / "check.raw")
    assert ext4_cat(raw, "/etc/motd") == "layered\n"


@pytest.mark.root
@pytest.mark.timeout(60)
def test_no_linux_root(case: Case) -> None:
    image = case.base / "blank.raw"
    image.touch()
    os.truncate(image, 64 << 20)
    sh("mkfs.ext4", "-q", "-F", image)
    refit_fails(case, image, message="no Linux root", hint="system disk")


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(60)
def test_not_root(bare_qcow2: Path) -> None:
    # Outside pytest's private (0700) temporary tree, so that `nobody` can reach it.
    base = Path(tempfile.mkdtemp(prefix="nonroot-test-"))
    try:
        base.chmod(0o755)
        c = _case(base)
        for d in (c.tmpdir, c.out.parent):
            d.chmod(0o1777)
        image = _copy(bare_qcow2, base / "world-readable.qcow2")
        image.chmod(0o644)
        guard = Guarded.before(base, c.tmpdir, [image])
        proc = careen(
            "refit",
            image,
            "-o",
            c.out,
            # The host backend asked for by name; `auto` would take the appliance, which
            # needs no root (tests/appliance runs it unprivileged).
            "--backend",
            "host",
            tmpdir=c.tmpdir,
            prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            # A user's own home, as `sudo -u` or a login would give (not root's).
            env={"HOME": str(c.tmpdir)},
        )
        assert_fails(proc, 1, "needs root", "run it as root")
        guard.assert_nothing_written(c.out)
    finally:
        sh("rm", "-rf", "--one-file-system", base)


# ---- the command line -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_unknown_operation_opens_nothing(case: Case) -> None:
    image = case.base / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    recipe = case.base / "recipe.yaml"
    recipe.write_text("steps:\n  - write: {path: /etc/motd, content: hi}\n  - frobnicate: true\n")
    error = refit_fails(
        case,
        image,
        "-r",
        recipe,
        status=2,
        message="unknown operation 'frobnicate'",
        hint="operations:",
    )
    assert f"{recipe}:3" in error, "the error names the recipe's line"
    assert not list(case.base.rglob("overlay*")), "an overlay was created"


@pytest.mark.timeout(30)
def test_output_exists(case: Case) -> None:
    image = case.base / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    case.out.write_bytes(b"precious")
    guard = Guarded.before(case.base, case.tmpdir, [image, case.out])
    proc = careen("refit", image, "-o", case.out, tmpdir=case.tmpdir)
    assert_fails(proc, 2, "already exists", "--force")
    guard.assert_released(case.out)
    assert case.out.read_bytes() == b"precious"
    assert not (case.out.parent / f".{case.out.name}.careen-partial").exists()


@pytest.mark.timeout(30)
def test_output_is_source(case: Case) -> None:
    image = case.out.parent / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    guard = Guarded.before(case.base, case.tmpdir, [image])
    proc = careen("refit", image, "-o", image, "--force", tmpdir=case.tmpdir)
    assert_fails(proc, 2, "output is the source", "--in-place")
    guard.assert_released(image)


# ---- failures inside the guest --------------------------------------------------------


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(90)
def test_guest_command_fails(case: Case, bare_qcow2: Path) -> None:
    image = _copy(bare_qcow2, case.base / "src.qcow2")
    error = refit_fails(
        case,
        image,
        "--write",
        "/etc/motd:changed",
        "--run",
        "false",
        message=r"\bfalse\b.*exited 1",
        hint="inside the guest",
    )
    assert "sandbox" not in error, "the error names careen's plumbing, not the command"


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(90)
def test_guest_command_times_out(case: Case, bare_qcow2: Path) -> None:
    image = _copy(bare_qcow2, case.base / "src.qcow2")
    sleeper = ["sleep", "611"]
    try:
        started = time.monotonic()
        refit_fails(
            case,
            image,
            "--timeout",
            "3",
            "--run",
            " ".join(sleeper),
            message="sleep 611.*timed out",
            hint="longer than 3 s",
        )
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"the timeout took {elapsed:.0f} s to act"
        assert not processes_running(sleeper), "the guest's sleep outlived careen"
    finally:
        kill_all(sleeper)


class _LockHolder:
    """qemu-storage-daemon holding an image open for writing, as a running VM would."""

    def __init__(self, image: Path, fmt: str, socket: Path) -> None:
        self.socket = socket
        argv = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={image}",
            "--blockdev",
            f"driver={fmt},node-name=r,file=f",
            "--nbd-server",
            f"addr.type=unix,addr.path={socket}",
            "--export",
            "type=nbd,id=e,node-name=r,writable=on",
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def lock_holder() -> Iterator[list[_LockHolder]]:
    holders: list[_LockHolder] = []
    yield holders
    for h in holders:
        h.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_image_in_use_by_qemu(case: Case, fmt: str, lock_holder: list[_LockHolder]) -> None:
    image = case.base / f"busy.{fmt}"
    sh("qemu-img", "create", "-q", "-f", fmt, image, "64M")
    holder = _LockHolder(image, fmt, case.base / "nbd.sock")
    lock_holder.append(holder)
    holder.wait_ready()
    refit_fails(case, image, message="in use", hint="stop the VM")


# ---- interrupted ----------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.images
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_while_guest_command_runs(
    case: Case, bare_qcow2: Path, signum: signal.Signals
) -> None:
    image = _copy(bare_qcow2, case.base / "src.qcow2")
    sleeper = ["sleep", str(620 + int(signum))]
    guard = Guarded.before(case.base, case.tmpdir, [image])
    argv = [
        str(CAREEN),
        "refit",
        str(image),
        "-o",
        str(case.out),
        "--format",
        "json",
        "--write",
        "/etc/motd:interrupted",
        "--run",
        " ".join(sleeper),
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=careen_env(case.tmpdir),
    )
    try:
        wait_for_process(sleeper, timeout=60)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        kill_all(sleeper)
    assert proc.returncode == 128 + signum, f"exit {proc.returncode}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert f"careen: interrupted ({signum.name})" in stderr, stderr
    assert stdout == ""
    assert not processes_running(sleeper), "the guest's sleep outlived careen"
    guard.assert_nothing_written(case.out)
