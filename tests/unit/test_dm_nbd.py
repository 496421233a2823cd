"""Device-mapper LVs and qemu-nbd views: the exact tables and commands, then the real thing.

The unit tests record commands instead of running them (a test that starts a real process
without asking fails). The integration tests need root and the kernel's device-mapper or
nbd driver, and skip on hosts without them, saying which.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
from image.helpers import LvmDisk, MiB, build_lvm_disk, require, sh, sparse_file

from careen import linux, run
from careen.attach import dm, nbd
from careen.errors import CareenError
from careen.image.lvm import lv_region, read_volume_groups
from careen.image.model import (
    ImageFormat,
    LogicalVolume,
    PhysicalVolume,
    Region,
    Segment,
    Stripe,
    VolumeGroup,
)

# --- recording commands ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_real_commands(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the integration tests (marked `root`), starting any process is an error."""
    if request.node.get_closest_marker("root"):
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a unit test tried to start a real process: {args[:1]}")

    monkeypatch.setattr("subprocess.Popen", refuse)


@dataclass
class Call:
    argv: list[str]
    input: str | bytes | None


@dataclass
class Recorder:
    """Stands for `careen.run.run`: records each call and answers through `reply`."""

    calls: list[Call] = field(default_factory=list)
    reply: Callable[[list[str]], None] = lambda argv: None

    def __call__(self, argv: Sequence[run.Arg], **kwargs: Any) -> CompletedProcess[str]:
        args = [os.fspath(a) for a in argv]
        self.calls.append(Call(args, kwargs.get("input")))
        self.reply(args)
        return CompletedProcess(args, 0, "", "")

    @property
    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(run, "run", recorder)
    monkeypatch.setattr(time, "sleep", lambda _: None)
    return recorder


def failure(argv: list[str], stderr: str) -> run.CommandError:
    return run.CommandError(argv, 1, stderr)


# --- tables ------------------------------------------------------------------------------

EXTENT = 4 * MiB  # 8192 sectors
PV0 = PhysicalVolume("pv0", "u0", Region(1 * MiB, 100 * MiB), 1 * MiB)
PV1 = PhysicalVolume("pv1", "u1", Region(101 * MiB, 100 * MiB), 1 * MiB)
DEVICES = {"pv0": "/dev/loop7", "pv1": "/dev/loop8"}


def group(*segments: Segment) -> tuple[VolumeGroup, LogicalVolume]:
    lv = LogicalVolume("centos", "root", "lvu", segments)
    return VolumeGroup("centos", "vgu", EXTENT, (PV0, PV1), (lv,)), lv


def linear(start: int, count: int, pv: str, first: int) -> Segment:
    return Segment(start, count, "striped", (Stripe(pv, first),))


def test_table_linear() -> None:
    vg, lv = group(linear(0, 3, "pv0", 2))
    # pe_start 1 MiB = 2048 sectors, plus 2 extents of 8192 sectors.
    assert dm.lv_table(vg, lv, DEVICES) == "0 24576 linear /dev/loop7 18432\n"


def test_table_two_segments_concatenate() -> None:
    vg, lv = group(linear(2, 2, "pv1", 0), linear(0, 2, "pv0", 5))
    assert dm.lv_table(vg, lv, DEVICES) == (
        "0 16384 linear /dev/loop7 43008\n16384 16384 linear /dev/loop8 2048\n"
    )


def test_table_striped() -> None:
    stripes = (Stripe("pv0", 0), Stripe("pv1", 1))
    vg, lv = group(Segment(0, 4, "striped", stripes, 64 * 1024))
    # 4 extents in all, 2 on each PV; 64 KiB chunks are 128 sectors.
    assert dm.lv_table(vg, lv, DEVICES) == (
        "0 32768 striped 2 128 /dev/loop7 2048 /dev/loop8 10240\n"
    )


REFUSED = (
    "thin thin-pool cache cache-pool raid1 raid5 raid10 mirror snapshot vdo error zero unknown"
)


@pytest.mark.parametrize("kind", REFUSED.split())
def test_table_refuses_what_needs_lvm(kind: str) -> None:
    vg, lv = group(Segment(0, 4, kind, (Stripe("pv0", 0),)))
    with pytest.raises(CareenError) as caught:
        dm.lv_table(vg, lv, DEVICES)
    assert str(caught.value) == (
        f"LV centos/root has a {kind} segment, which needs LVM's own activation"
    )
    assert caught.value.hint == "use --backend appliance"
    with pytest.raises(CareenError):
        dm.check_lv(vg, lv)


def test_table_refuses_a_mixed_lv() -> None:
    vg, lv = group(linear(0, 2, "pv0", 0), Segment(2, 2, "thin"))
    with pytest.raises(CareenError, match="thin segment"):
        dm.lv_table(vg, lv, DEVICES)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ((linear(0, 2, "pv9", 0),), "lies on pv9, which is not in this image"),
        ((linear(0, 2, "pv0", 98),), r"runs past the end of its PV \(pv0\)"),
        ((linear(0, 2, "pv0", 0), linear(3, 1, "pv0", 4)), "gap or an overlap at extent 3"),
        ((Segment(0, 4, "striped", (Stripe("pv0", 0), Stripe("pv1", 0))),), "stripe size"),
        ((Segment(0, 3, "striped", (Stripe("pv0", 0), Stripe("pv1", 0)), 65536),), "divide"),
        ((), "no segments"),
    ],
)
def test_table_refuses_broken_layouts(segments: tuple[Segment, ...], message: str) -> None:
    vg, lv = group(*segments)
    with pytest.raises(CareenError, match=message):
        dm.lv_table(vg, lv, DEVICES)


def test_check_lv_accepts_what_dm_assembles() -> None:
    stripes = (Stripe("pv0", 0), Stripe("pv1", 1))
    vg, lv = group(linear(0, 2, "pv0", 0), Segment(2, 4, "striped", stripes, 65536))
    dm.check_lv(vg, lv)


# --- names -------------------------------------------------------------------------------


def test_dm_name_belongs_to_careen_and_the_run() -> None:
    name = dm.dm_name("r1", "centos", "root")
    assert name == "careen-r1-centos-root"
    # The guest's own mapper name, which a host VG of the same name would use, is never it.
    assert name != LogicalVolume("centos", "root", "u", ()).mapper_name
    assert dm.dm_name("r2", "centos", "root") != name


def test_dm_name_keeps_dashed_names_apart() -> None:
    assert dm.dm_name("r-1", "my-vg", "lv") == "careen-r--1-my--vg-lv"
    assert dm.dm_name("r", "a-b", "c") != dm.dm_name("r", "a", "b-c")


def test_dm_name_sanitises() -> None:
    name = dm.dm_name("run id", "vg/../x", "lv\n*")
    assert name == "careen-run_id-vg_.._x-lv__"
    assert dm.dm_name("r", "", "lv") == "careen-r-_-lv"


def test_dm_name_stays_short_and_unique() -> None:
    long_a = dm.dm_name("r", "v" * 120, "a" * 120)
    long_b = dm.dm_name("r", "v" * 120, "a" * 119 + "b")
    assert len(long_a) == len(long_b) == dm.MAX_NAME
    assert long_a != long_b and long_a.startswith("careen-r-vvv")


# --- dmsetup -----------------------------------------------------------------------------

TABLE = "0 16384 linear /dev/loop7 2048\n16384 16384 linear /dev/loop8 2048\n"


@pytest.mark.parametrize("read_only", [True, False])
def test_dm_device_commands(commands: Recorder, read_only: bool) -> None:
    with dm.dm_device("careen-r-vg-lv", TABLE, read_only=read_only) as device:
        assert device == "/dev/mapper/careen-r-vg-lv"
        assert len(commands.calls) == 1
    ro = ["--readonly"] if read_only else []
    assert commands.argvs == [
        ["dmsetup", "create", *ro, "careen-r-vg-lv"],
        ["dmsetup", "remove", "careen-r-vg-lv"],
    ]
    assert commands.calls[0].input == TABLE


def test_dm_device_removed_when_the_body_fails(commands: Recorder) -> None:
    with pytest.raises(KeyError), dm.dm_device("careen-r-vg-lv", TABLE, read_only=True):
        raise KeyError("body")
    assert commands.argvs[-1] == ["dmsetup", "remove", "careen-r-vg-lv"]


def test_dm_remove_retries_while_busy(commands: Recorder) -> None:
    busy = iter([True, True, False])

    def reply(argv: list[str]) -> None:
        if argv[1] == "remove" and next(busy):
            raise failure(argv, "device-mapper: remove ioctl failed: Device or resource busy")

    commands.reply = reply
    with dm.dm_device("careen-r-vg-lv", TABLE, read_only=True):
        pass
    assert [a[1] for a in commands.argvs] == ["create", "remove", "remove", "remove"]


def test_dm_remove_failure_is_raised_after_success(commands: Recorder) -> None:
    def reply(argv: list[str]) -> None:
        if argv[1] == "remove":
            raise failure(argv, "Device or resource busy")

    commands.reply = reply
    with (
        pytest.raises(run.CommandError, match="busy"),
        dm.dm_device("careen-r-vg-lv", TABLE, read_only=True),
    ):
        pass
    assert len(commands.calls) == 1 + dm._REMOVE_ATTEMPTS


def test_dm_remove_failure_never_hides_the_first_error(
    commands: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def reply(argv: list[str]) -> None:
        if argv[1] == "remove":
            raise failure(argv, "No such device or address")

    commands.reply = reply
    with pytest.raises(KeyError), dm.dm_device("careen-r-vg-lv", TABLE, read_only=True):
        raise KeyError("body")
    assert "could not remove device-mapper device careen-r-vg-lv" in caplog.text


def test_dm_available(commands: Recorder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dm, "CONTROL", tmp_path / "control")
    assert not dm.dm_available()
    assert commands.calls == []  # no control node: not even dmsetup runs
    (tmp_path / "control").touch()
    assert dm.dm_available()
    assert commands.argvs == [["dmsetup", "version"]]

    def broken(argv: Sequence[run.Arg], **kwargs: Any) -> CompletedProcess[str]:
        return CompletedProcess(list(map(str, argv)), 1, "", "No such device")

    monkeypatch.setattr(run, "run", broken)
    assert not dm.dm_available()


def test_lv_device_hides_pv_labels_and_releases_in_order(
    commands: Recorder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    events: list[str] = []
    loops = iter(["/dev/loop3", "/dev/loop4"])

    @contextmanager
    def fake_loop(backing: Path, offset: int, size: int, *, read_only: bool) -> Iterator[str]:
        device = next(loops)
        events.append(f"attach {device} {offset} {size} ro={read_only}")
        yield device
        events.append(f"close {device}")

    monkeypatch.setattr(linux, "loop_device", fake_loop)
    monkeypatch.setattr(dm, "_wait_for_node", lambda device: None)
    commands.reply = lambda argv: events.append(" ".join(argv[:2]))
    stripes = (Stripe("pv0", 0), Stripe("pv1", 1))
    vg, lv = group(linear(0, 2, "pv1", 10), Segment(2, 4, "striped", stripes, 65536))
    raw = tmp_path / "disk.raw"
    with dm.lv_device(raw, vg, lv, "r1", read_only=True) as device:
        assert device == "/dev/mapper/careen-r1-centos-root"
        events.append("body")
    # Loops start at each PV's first extent, so no PV label shows on them.
    assert events == [
        f"attach /dev/loop3 {2 * MiB} {99 * MiB} ro=True",
        f"attach /dev/loop4 {102 * MiB} {99 * MiB} ro=True",
        "dmsetup create",
        "body",
        "dmsetup remove",
        "close /dev/loop4",
        "close /dev/loop3",
    ]
    assert commands.calls[0].input == (
        "0 16384 linear /dev/loop4 81920\n16384 32768 striped 2 128 /dev/loop3 0 /dev/loop4 8192\n"
    )


def test_lv_device_refuses_before_attaching(
    commands: Recorder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_loops(*args: object, **kwargs: object) -> None:
        raise AssertionError("attached a loop device for an LV it then refused")

    monkeypatch.setattr(linux, "loop_device", no_loops)
    vg, lv = group(Segment(0, 4, "thin"))
    with (
        pytest.raises(CareenError, match="thin"),
        dm.lv_device(tmp_path / "disk.raw", vg, lv, "r1", read_only=True),
    ):
        pass
    assert commands.calls == []


# --- qemu-nbd ----------------------------------------------------------------------------


@pytest.fixture
def sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake /sys/block with nbd0..nbd3, all free, and a fake /dev."""
    block, dev = tmp_path / "sys" / "block", tmp_path / "dev"
    dev.mkdir()
    for n in range(4):
        (block / f"nbd{n}").mkdir(parents=True)
        (block / f"nbd{n}" / "size").write_text("0\n")
    (block / "loop0").mkdir()
    monkeypatch.setattr(nbd, "SYS_BLOCK", block)
    monkeypatch.setattr(nbd, "DEV", dev)
    return block


def connects(sysfs: Path, argv: list[str]) -> None:
    """What the kernel shows once qemu-nbd has connected a device."""
    if "--connect" in argv:
        name = Path(argv[argv.index("--connect") + 1]).name
        (sysfs / name / "size").write_text("20480\n")
    if "--disconnect" in argv:
        (sysfs / Path(argv[-1]).name / "size").write_text("0\n")


def test_connect_argv() -> None:
    image = Path("/work/overlay.qcow2")
    argv = nbd.connect_argv(image, ImageFormat.QCOW2, "/dev/nbd2", writable=False)
    assert " ".join(argv) == (
        "qemu-nbd --connect /dev/nbd2 --format qcow2 --read-only --discard=unmap "
        "--cache=writeback /work/overlay.qcow2"
    )
    argv = nbd.connect_argv(image, ImageFormat.VMDK, "/dev/nbd0", writable=True)
    assert " ".join(argv) == (
        "qemu-nbd --connect /dev/nbd0 --format vmdk --discard=unmap --cache=writeback "
        "/work/overlay.qcow2"
    )


def test_free_nbd_device_skips_devices_in_use(sysfs: Path) -> None:
    dev = nbd.DEV
    assert nbd.free_nbd_device() == str(dev / "nbd0")
    (sysfs / "nbd0" / "size").write_text("2048\n")
    (sysfs / "nbd1" / "pid").write_text("4242\n")  # being set up: a pid, no size yet
    assert nbd.free_nbd_device() == str(dev / "nbd2")
    (sysfs / "nbd2" / "size").write_text("1\n")
    (sysfs / "nbd3" / "size").write_text("1\n")
    with pytest.raises(CareenError, match="no free nbd device") as caught:
        nbd.free_nbd_device()
    assert "nbds_max" in caught.value.hint


def test_free_nbd_device_orders_numerically(sysfs: Path) -> None:
    for n in range(4):
        (sysfs / f"nbd{n}" / "size").write_text("8\n")
    (sysfs / "nbd10").mkdir()
    (sysfs / "nbd10" / "size").write_text("0\n")
    (sysfs / "nbd9").mkdir()
    (sysfs / "nbd9" / "size").write_text("0\n")
    assert nbd.free_nbd_device() == str(nbd.DEV / "nbd9")


@pytest.mark.parametrize("writable", [True, False])
def test_nbd_view_commands(commands: Recorder, sysfs: Path, writable: bool) -> None:
    commands.reply = lambda argv: connects(sysfs, argv)
    image = Path("/work/overlay.qcow2")
    device = str(nbd.DEV / "nbd0")
    with nbd.nbd_view(image, ImageFormat.QCOW2, writable=writable) as path:
        assert path == Path(device)
        assert commands.argvs == [
            nbd.connect_argv(image, ImageFormat.QCOW2, device, writable=writable)
        ]
    assert commands.argvs[1:] == [["qemu-nbd", "--disconnect", device]]


def test_nbd_view_tries_the_next_device_when_taken(commands: Recorder, sysfs: Path) -> None:
    def reply(argv: list[str]) -> None:
        if argv[:3] == ["qemu-nbd", "--connect", str(nbd.DEV / "nbd0")]:
            (sysfs / "nbd0" / "size").write_text("8\n")  # someone else got it first
            raise failure(argv, "qemu-nbd: Failed to set NBD socket: Device or resource busy")
        connects(sysfs, argv)

    commands.reply = reply
    with nbd.nbd_view(Path("/i.qcow2"), ImageFormat.QCOW2, writable=True) as path:
        assert path == nbd.DEV / "nbd1"


def test_nbd_view_waits_for_the_size(
    commands: Recorder, sysfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = iter(range(100))

    def sleep(_: float) -> None:
        if next(polls) == 3:
            (sysfs / "nbd0" / "size").write_text("20480\n")

    monkeypatch.setattr(time, "sleep", sleep)
    with nbd.nbd_view(Path("/i.qcow2"), ImageFormat.QCOW2, writable=True):
        assert next(polls) == 4


def test_nbd_view_disconnects_when_it_never_comes_up(
    commands: Recorder, sysfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nbd, "_READY_TIMEOUT", 0.0)
    with (
        pytest.raises(CareenError, match="did not come up"),
        nbd.nbd_view(Path("/i.qcow2"), ImageFormat.QCOW2, writable=True),
    ):
        pass
    assert commands.argvs[-1] == ["qemu-nbd", "--disconnect", str(nbd.DEV / "nbd0")]


def test_nbd_disconnect_failure_is_reported(
    commands: Recorder, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def reply(argv: list[str]) -> None:
        if "--disconnect" in argv:
            raise failure(argv, "qemu-nbd: Cannot disconnect")
        connects(sysfs, argv)

    commands.reply = reply
    image = Path("/i.qcow2")
    with (
        pytest.raises(run.CommandError, match="Cannot disconnect"),
        nbd.nbd_view(image, ImageFormat.QCOW2, writable=True),
    ):
        pass
    # While another error unwinds, the failed disconnect is logged and the error kept.
    with pytest.raises(KeyError), nbd.nbd_view(image, ImageFormat.QCOW2, writable=True):
        raise KeyError("body")
    assert "could not disconnect" in caplog.text


def test_nbd_flush_failure_still_disconnects(
    commands: Recorder, sysfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands.reply = lambda argv: connects(sysfs, argv)

    def eio(device: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(nbd, "_flush", eio)
    with (
        pytest.raises(CareenError, match="could not flush"),
        nbd.nbd_view(Path("/i.qcow2"), ImageFormat.QCOW2, writable=True),
    ):
        pass
    assert commands.argvs[-1] == ["qemu-nbd", "--disconnect", str(nbd.DEV / "nbd0")]


def test_nbd_disconnect_waits_for_the_server(
    commands: Recorder, sysfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands.reply = lambda argv: connects(sysfs, argv)
    alive = iter([True, True, False])
    monkeypatch.setattr(nbd, "_server_pid", lambda device: 4242)
    monkeypatch.setattr(nbd, "_alive", lambda pid: next(alive))
    with nbd.nbd_view(Path("/i.qcow2"), ImageFormat.QCOW2, writable=True):
        pass
    assert next(alive, "done") == "done"


def test_nbd_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nbd, "SYS_MODULE", tmp_path / "module" / "nbd")
    monkeypatch.setattr(nbd, "DEV", tmp_path)
    monkeypatch.setattr(run, "have", lambda program: program == "qemu-nbd")
    assert not nbd.nbd_available()
    (tmp_path / "nbd0").touch()
    assert nbd.nbd_available()
    monkeypatch.setattr(run, "have", lambda program: False)
    assert not nbd.nbd_available()


# --- the real thing: device-mapper -------------------------------------------------------


@pytest.fixture(scope="module")
def dm_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LvmDisk]:
    if os.geteuid() != 0 or not dm.dm_available():
        pytest.skip("no device-mapper on this host")
    require("sfdisk", "losetup", "pvcreate", "mkfs.ext4")
    yield from build_lvm_disk(tmp_path_factory.mktemp("dm") / "disk.raw")


def _volume_group(disk: LvmDisk) -> VolumeGroup:
    (vg,) = read_volume_groups(disk.path, list(disk.regions.items()))
    return vg


def _lv(vg: VolumeGroup, name: str) -> LogicalVolume:
    return next(lv for lv in vg.lvs if lv.name == name)


def _read(path: Path | str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _expected(disk: LvmDisk, lv: str, stripe_size: int = 64 * 1024) -> bytes:
    """The LV's bytes as LVM's own report places them: ranges concatenated for a linear or
    multi-segment LV, chunks taken in turn from each range for a striped one."""
    pieces = []
    for part, first, last in disk.ranges[lv]:
        start = disk.regions[part].offset + disk.pe_start[part] + first * MiB
        pieces.append(_read(disk.path, start, (last - first + 1) * MiB))
    if lv != "str":
        return b"".join(pieces)
    chunks = [
        piece[i : i + stripe_size]
        for i in range(0, len(pieces[0]), stripe_size)
        for piece in pieces
    ]
    return b"".join(chunks)


def _gone(path: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(path)


def _no_loops_on(image: Path, timeout: float = 5.0) -> bool:
    # Autoclear may detach a moment after the last close.
    deadline = time.monotonic() + timeout
    while sh("losetup", "-j", image).strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not sh("losetup", "-j", image).strip()


@pytest.mark.root
@pytest.mark.real_commands
def test_dm_reads_what_lvm_placed(dm_disk: LvmDisk) -> None:
    vg = _volume_group(dm_disk)
    rng = random.Random(7)
    with dm_disk.path.open("r+b") as f:  # random data over every PV's extents
        for part, region in dm_disk.regions.items():
            start = region.offset + dm_disk.pe_start[part]
            f.seek(start)
            f.write(rng.randbytes(region.end - start))
    root = _lv(vg, "root")
    for name in ("root", "two", "str"):
        lv = _lv(vg, name)
        with dm.lv_device(dm_disk.path, vg, lv, "itest", read_only=True) as device:
            got = Path(device).read_bytes()
            assert got == _expected(dm_disk, name), name
            if lv is root:
                region = lv_region(vg, root)
                assert got == _read(dm_disk.path, region.offset, region.size)
        assert _gone(device)
    assert _no_loops_on(dm_disk.path)


@pytest.mark.root
@pytest.mark.parametrize("name", ["root", "str"])
@pytest.mark.real_commands
def test_dm_mounts_linear_and_striped(dm_disk: LvmDisk, tmp_path: Path, name: str) -> None:
    vg = _volume_group(dm_disk)
    lv = _lv(vg, name)
    target = tmp_path / "mnt"
    target.mkdir()
    with dm.lv_device(dm_disk.path, vg, lv, "itest", read_only=False) as device:
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", device)
        linux.mount(device, str(target), "ext4")
        try:
            (target / "hello").write_text(f"hello from {name}\n")
        finally:
            linux.umount(str(target))
    # The filesystem lies where LVM put the LV: its superblock magic, read by offsets.
    assert _expected(dm_disk, name)[1024 + 56 : 1024 + 58] == b"\x53\xef"
    with dm.lv_device(dm_disk.path, vg, lv, "itest", read_only=True) as device:
        linux.mount(device, str(target), "ext4", linux.MS_RDONLY)
        try:
            assert (target / "hello").read_text() == f"hello from {name}\n"
        finally:
            linux.umount(str(target))
    assert _gone(device)
    assert _no_loops_on(dm_disk.path)


# --- the real thing: qemu-nbd ------------------------------------------------------------


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    if os.geteuid() != 0 or not nbd.nbd_available():
        pytest.skip("no nbd on this host")
    require("qemu-img")
    raw = sparse_file(tmp_path / "source.raw", 16 * MiB)
    rng = random.Random(11)
    with raw.open("r+b") as f:  # some data, some holes
        for offset in (0, 3 * MiB, 9 * MiB + 4096):
            f.seek(offset)
            f.write(rng.randbytes(256 * 1024))
    image = tmp_path / "disk.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    return image


def _as_raw(image: Path, out: Path) -> bytes:
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, out)
    return out.read_bytes()


@pytest.mark.root
@pytest.mark.real_commands
def test_nbd_reads_what_qemu_img_converts(qcow2: Path, tmp_path: Path) -> None:
    with nbd.nbd_view(qcow2, ImageFormat.QCOW2, writable=False) as device:
        got = device.read_bytes()
        size = (nbd.SYS_BLOCK / device.name / "size").read_text().strip()
    assert got == _as_raw(qcow2, tmp_path / "converted.raw")
    assert (nbd.SYS_BLOCK / device.name / "size").read_text().strip() == "0"
    assert int(size) * 512 == len(got)


@pytest.mark.root
@pytest.mark.real_commands
def test_nbd_writes_reach_the_image(qcow2: Path, tmp_path: Path) -> None:
    data = random.Random(13).randbytes(64 * 1024)
    with nbd.nbd_view(qcow2, ImageFormat.QCOW2, writable=True) as device:
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 5 * MiB)
        finally:
            os.close(fd)
    converted = _as_raw(qcow2, tmp_path / "converted.raw")
    assert converted[5 * MiB : 5 * MiB + len(data)] == data
