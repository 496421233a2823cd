"""What a first run meets: files that are no disk image, option clashes and options that
do nothing, the sample builders' output, and a source that is scanned only once."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from careen import cli, refit
from careen.attach import host
from careen.errors import CareenError, ExitCode, UsageError
from careen.image import filesystems, probe
from careen.image.model import (
    Disk,
    Filesystem,
    ImageFormat,
    ImageInfo,
    Partition,
    PartitionTable,
    Region,
)
from careen.refit import ApplianceOptions, Backend
from careen.samples import __main__ as samples_main
from careen.samples import bootable, format_paths
from careen.verify import guestcheck

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


def _info(path: Path = Path("/images/disk.raw")) -> ImageInfo:
    return ImageInfo(path, ImageFormat.RAW, 64 * MiB, 64 * MiB)


def _fs(kind: str, source: str = "partition 1") -> Filesystem:
    return Filesystem(source, kind, Region(MiB, 63 * MiB))


def _disk(*kinds: str) -> Disk:
    found = tuple(_fs(kind, f"partition {n}") for n, kind in enumerate(kinds, 1))
    return Disk(_info(), None, (), found)


# --- a file that is no disk image ------------------------------------------------------


@pytest.mark.parametrize("size", [1, 100, 511])
def test_a_tiny_raw_file_is_refused(
    tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = tmp_path / "notes.txt"
    tiny.write_bytes(b"x" * size)
    # What qemu-img info says of such a file: raw, its size rounded up to a sector.
    monkeypatch.setattr(probe, "_info", lambda path: {"format": "raw", "virtual-size": 512})
    with pytest.raises(CareenError) as caught:
        probe.probe_image(tiny)
    assert f"only {size} bytes" in caught.value.message
    assert "too small to hold a partition table or a filesystem" in caught.value.message
    assert "check the path" in caught.value.hint and "disk image" in caught.value.hint


def test_a_raw_file_of_one_sector_passes_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sector = tmp_path / "sector.raw"
    sector.write_bytes(bytes(512))
    monkeypatch.setattr(probe, "_info", lambda path: {"format": "raw", "virtual-size": 512})
    assert probe.probe_image(sector).virtual_size == 512


def test_nothing_recognised_without_a_partition_table() -> None:
    with pytest.raises(CareenError) as caught:
        filesystems.check_found(_info(), None, ())
    assert "no partition table and no filesystem that careen recognises" in str(caught.value)
    assert "disk image" in caught.value.hint


def test_nothing_recognised_in_the_partitions() -> None:
    table = PartitionTable("gpt", None, (Partition(1, Region(MiB, MiB), "8300"),))
    with pytest.raises(CareenError) as caught:
        filesystems.check_found(_info(), table, ())
    assert "a gpt partition table (1 partition(s)) but no filesystem" in str(caught.value)
    filesystems.check_found(_info(), table, (_fs("ext4"),))  # something found: accepted


def test_the_source_scan_refuses_a_disk_with_nothing_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "zeros.raw"
    image.write_bytes(bytes(4096))
    monkeypatch.setattr(filesystems, "scan_disk", lambda raw, info: (None, (), ()))
    with pytest.raises(CareenError, match="no filesystem that careen recognises"):
        refit.scan_source(_info(image), tmp_path)
    assert list(tmp_path.iterdir()) == [image]  # its work directory is gone


# --- backend choice and the host's refusal ---------------------------------------------


def test_the_host_choice_claims_no_more_than_it_checked() -> None:
    backend, why = refit.choose_backend(Backend.AUTO, is_root=True, host_refusal=lambda: None)
    assert backend is Backend.HOST
    assert "every filesystem" not in why


def test_no_linux_root_hint_fits_every_verb(tmp_path: Path) -> None:
    with pytest.raises(CareenError) as caught:
        host.find_root(tmp_path / "disk.raw", _disk("vfat"), tmp_path / "probe")
    assert "no Linux root filesystem" in caught.value.message
    assert "refit" not in caught.value.hint and "system disk" in caught.value.hint


# --- usage errors carry a hint ---------------------------------------------------------


def test_in_place_with_an_output_says_which_to_drop() -> None:
    args = cli._parser().parse_args(
        ["refit", "disk.qcow2", "-o", "new.qcow2", "--in-place", "--verify"]
    )
    with pytest.raises(UsageError) as caught:
        cli._refit_options(args)
    assert caught.value.exit_code is ExitCode.USAGE
    assert "--in-place and -o" in caught.value.message
    assert "drop -o" in caught.value.hint and "drop --in-place" in caught.value.hint


@pytest.mark.parametrize("option", ["--smp", "--memsize"])
def test_a_non_positive_appliance_size_has_a_hint(option: str) -> None:
    args = cli._parser().parse_args(["inspect", "disk.qcow2", option, "0"])
    with pytest.raises(UsageError) as caught:
        cli._appliance_options(args)
    assert caught.value.hint


# --- --force-ntfs where it can do nothing ----------------------------------------------


def test_force_ntfs_is_useless_without_ntfs() -> None:
    why = refit.force_ntfs_unused(Backend.APPLIANCE, _disk("ext4"), writable=True)
    assert why is not None and "holds no NTFS" in why


def test_force_ntfs_applies_only_to_the_appliance() -> None:
    why = refit.force_ntfs_unused(Backend.HOST, _disk("ext4", "ntfs"), writable=True)
    assert why is not None and "only to the appliance" in why
    assert "holds no NTFS" not in why


def test_force_ntfs_is_useless_when_nothing_is_written() -> None:
    why = refit.force_ntfs_unused(Backend.APPLIANCE, _disk("ntfs"), writable=False)
    assert why is not None and "nothing is written" in why


def test_force_ntfs_matters_for_ntfs_in_the_appliance() -> None:
    assert refit.force_ntfs_unused(Backend.APPLIANCE, _disk("ntfs"), writable=True) is None


def test_attaching_warns_about_a_useless_force_ntfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    @contextmanager
    def attach(*args: Any, **kwargs: Any) -> Iterator[refit.Attached]:
        guest: Any = None  # never used: only the warning is looked at
        yield refit.Attached(_disk("ext4"), guest, [], [], False, lambda: None, lambda: None)

    monkeypatch.setattr(refit, "attach", attach)
    info = _info()
    for force, expected in ((True, 1), (False, 0)):
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="careen.refit"),
            refit.attach_guest(
                Backend.HOST,
                info,
                info.path,
                info.format,
                tmp_path,
                writable=True,
                options=ApplianceOptions(force_ntfs=force),
            ),
        ):
            pass
        warnings = [r.getMessage() for r in caplog.records if "--force-ntfs" in r.getMessage()]
        assert len(warnings) == expected, warnings


# --- verify scans the source once ------------------------------------------------------


class _Chosen(Exception):
    pass


def test_verify_scans_the_source_once(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned = _disk("ext4")
    scans: list[ImageInfo] = []
    seen: dict[str, Any] = {}

    def scan_source(info: ImageInfo, parent: Path | None) -> Disk:
        scans.append(info)
        return scanned

    def select_backend(*args: Any, **kwargs: Any) -> Backend:
        seen.update(kwargs)
        raise _Chosen

    monkeypatch.setattr(guestcheck, "scan_source", scan_source)
    monkeypatch.setattr(guestcheck, "select_backend", select_backend)
    with pytest.raises(_Chosen):
        guestcheck.inspect_guest(
            _info(), user=None, backend=Backend.AUTO, options=ApplianceOptions(), parent=None
        )
    assert len(scans) == 1 and seen["scanned"] is scanned


def test_a_scanned_source_is_not_scanned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def scan_source(info: ImageInfo, parent: Path | None) -> Disk:
        raise AssertionError("scanned a second time")

    monkeypatch.setattr(refit, "scan_source", scan_source)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    chosen = refit.select_backend(Backend.AUTO, _info(), "verify", None, scanned=_disk("ext4"))
    assert chosen is Backend.HOST
    windows = refit.select_backend(Backend.AUTO, _info(), "verify", None, scanned=_disk("ntfs"))
    assert windows is Backend.APPLIANCE


def test_verify_refuses_windows_from_the_one_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestcheck, "scan_source", lambda info, parent: _disk("ntfs"))
    with pytest.raises(guestcheck.NotBootable, match="Windows"):
        guestcheck.inspect_guest(
            _info(), user=None, backend=Backend.AUTO, options=ApplianceOptions(), parent=None
        )


# --- the sample builders print paths ---------------------------------------------------


def test_format_paths() -> None:
    images = {"bare": Path("/c/bare.raw"), "mbr": Path("/c/mbr.raw")}
    assert format_paths(images) == "/c/bare.raw\n/c/mbr.raw"
    assert format_paths(images, "json") == ('{\n  "bare": "/c/bare.raw",\n  "mbr": "/c/mbr.raw"\n}')


def test_samples_print_one_path_a_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        samples_main, "sample_image", lambda layout, cache: Path(f"/cache/{layout}.img")
    )
    assert samples_main.main(["bare"]) == ExitCode.OK
    assert capsys.readouterr().out == "/cache/bare.img\n"
    assert samples_main.main(["gpt", "bare", "--format", "json"]) == ExitCode.OK
    assert '"gpt": "/cache/gpt.img"' in capsys.readouterr().out


def test_bootable_samples_print_one_path_a_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bootable, "bootable_sample", lambda kind: Path(f"/cache/{kind}.raw"))
    assert bootable.main(["broken"]) == ExitCode.OK
    assert capsys.readouterr().out == "/cache/broken.raw\n"
    assert bootable.main([]) == ExitCode.OK
    assert capsys.readouterr().out == "/cache/good.raw\n/cache/broken.raw\n"
    with pytest.raises(SystemExit) as usage:
        bootable.main(["nope"])
    assert usage.value.code == ExitCode.USAGE
