"""The backend choice, the acceleration cache and the appliance's small conversions.

None of these runs a real command: the process runner refuses here, as in tests/unit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from careen import accel, run
from careen.accel import Accel, Verdict
from careen.attach import appliance
from careen.refit import Backend, choose_backend


@pytest.fixture(autouse=True)
def no_real_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(argv: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a unit test tried to run a real command: {list(argv)}")

    monkeypatch.setattr(run, "run", refuse)
    monkeypatch.setattr(run, "spawn", refuse)


def _never() -> str | None:
    raise AssertionError("the host was probed although the answer did not need it")


@pytest.mark.timeout(10)
def test_asked_for_backend_is_kept() -> None:
    assert choose_backend(Backend.HOST, is_root=False, host_refusal=_never) == (
        Backend.HOST,
        "asked for",
    )
    assert choose_backend(Backend.APPLIANCE, is_root=True, host_refusal=_never)[0] is (
        Backend.APPLIANCE
    )


@pytest.mark.timeout(10)
def test_auto_without_root_takes_the_appliance() -> None:
    backend, why = choose_backend(Backend.AUTO, is_root=False, host_refusal=_never)
    assert backend is Backend.APPLIANCE
    assert "not running as root" in why


@pytest.mark.timeout(10)
def test_auto_as_root_follows_what_the_host_can_mount() -> None:
    backend, why = choose_backend(
        Backend.AUTO, is_root=True, host_refusal=lambda: "LV vg/root has 2 segments"
    )
    assert backend is Backend.APPLIANCE
    assert "2 segments" in why
    backend, _ = choose_backend(Backend.AUTO, is_root=True, host_refusal=lambda: None)
    assert backend is Backend.HOST


@pytest.mark.timeout(10)
def test_accel_cache_round_trip_and_key(tmp_path: Path) -> None:
    path = tmp_path / "accel.json"
    assert accel.read_cache("k1", path) is None
    accel.write_cache("k1", Verdict(Accel.TCG, "broken KVM"), path)
    assert accel.read_cache("k1", path) == Verdict(Accel.TCG, "broken KVM")
    assert accel.read_cache("k2", path) is None  # another kernel, qemu or boot
    path.write_text("not json")
    assert accel.read_cache("k1", path) is None


@pytest.mark.timeout(10)
def test_resolve_probes_once_then_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAREEN_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(accel, "host_key", lambda: "kernel|qemu|boot")
    probes: list[int] = []

    def probe(timeout: float = 0) -> Verdict:
        probes.append(1)
        return Verdict(Accel.KVM, "test boot reached the console")

    monkeypatch.setattr(accel, "probe_kvm", probe)
    assert accel.resolve(Accel.AUTO) is Accel.KVM
    assert accel.resolve(Accel.AUTO) is Accel.KVM
    assert len(probes) == 1
    assert accel.resolve(Accel.TCG) is Accel.TCG
    monkeypatch.setattr(accel, "host_key", lambda: "kernel|qemu|another-boot")
    assert accel.resolve(Accel.AUTO) is Accel.KVM
    assert len(probes) == 2


@pytest.mark.timeout(10)
def test_probe_without_kvm_device_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    verdict = accel.probe_kvm()
    assert verdict.accel is Accel.TCG and "/dev/kvm" in verdict.reason


@pytest.mark.timeout(10)
def test_guestfs_settings() -> None:
    assert accel.guestfs_settings(Accel.TCG) == ["force_tcg"]
    assert accel.guestfs_settings(Accel.KVM) == []
    with pytest.raises(ValueError):
        accel.guestfs_settings(Accel.AUTO)


@pytest.mark.timeout(10)
def test_stat_result_from_statns() -> None:
    fields = {
        "st_dev": 1,
        "st_ino": 2,
        "st_mode": stat.S_IFLNK | 0o777,
        "st_nlink": 1,
        "st_uid": 3,
        "st_gid": 4,
        "st_rdev": 0,
        "st_size": 5,
        "st_blksize": 4096,
        "st_blocks": 8,
        "st_atime_sec": 10,
        "st_atime_nsec": 5,
        "st_mtime_sec": 11,
        "st_mtime_nsec": 6,
        "st_ctime_sec": 12,
        "st_ctime_nsec": 7,
    }
    st = appliance.stat_result(fields)
    assert stat.S_ISLNK(st.st_mode)
    assert (st.st_uid, st.st_gid, st.st_size, st.st_ino) == (3, 4, 5, 2)
    assert st.st_mtime_ns == 11 * 10**9 + 6
    assert st.st_blocks == 8


@pytest.mark.timeout(10)
def test_source_names() -> None:
    assert appliance.source_name("/dev/sda1") == "partition 1"
    assert appliance.source_name("/dev/centos/root") == "LV centos/root"
    assert appliance.source_name("/dev/sda") == "whole disk"
