"""The verification VM's command line, from boot properties set by hand or by Glance."""

from __future__ import annotations

from pathlib import Path

import pytest

from careen.accel import Accel
from careen.errors import CareenError, UsageError
from careen.verify import boot
from careen.verify.boot import BootProperties, DiskBus, Firmware, MachineType

pytestmark = pytest.mark.timeout(30)


def config(tmp_path: Path, props: BootProperties, accel: Accel = Accel.TCG) -> boot.VMConfig:
    return boot.VMConfig(
        overlay=tmp_path / "disk.qcow2",
        seed=tmp_path / "seed.iso",
        serial_socket=tmp_path / "serial.sock",
        ssh_port=2222,
        accelerator=accel,
        boot=props,
        firmware_vars=tmp_path / "vars.fd",
    )


def option_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_default_boot_is_bios_virtio_pc_under_tcg(tmp_path: Path) -> None:
    argv = boot.qemu_argv(config(tmp_path, BootProperties()))
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-machine") == ["pc"]
    assert option_values(argv, "-accel") == ["tcg"]
    devices = option_values(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in devices
    assert "ide-cd,drive=seed0,bus=ide.1" in devices
    drives = option_values(argv, "-drive")
    # The overlay and the seed, each with its format given: qemu never probes.
    assert drives[0].startswith(f"file={tmp_path / 'disk.qcow2'},format=qcow2,")
    assert "format=raw" in drives[1] and "readonly=on" in drives[1]
    assert not any("pflash" in d for d in drives)
    assert option_values(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"]
    chardev = option_values(argv, "-chardev")[0]
    assert f"path={tmp_path / 'serial.sock'}" in chardev and "server=on" in chardev
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_kvm_uses_the_host_cpu(tmp_path: Path) -> None:
    argv = boot.qemu_argv(config(tmp_path, BootProperties(), Accel.KVM))
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]


def test_auto_must_be_resolved_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        boot.qemu_argv(config(tmp_path, BootProperties(), Accel.AUTO))


@pytest.mark.parametrize(
    ("bus", "expected"),
    [
        (DiskBus.SCSI, ["virtio-scsi-pci,id=scsi0", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0"]),
        (DiskBus.IDE, ["ide-hd,drive=disk0,bus=ide.0,bootindex=0"]),
        (DiskBus.SATA, ["ahci,id=sata0", "ide-hd,drive=disk0,bus=sata0.0,bootindex=0"]),
    ],
)
def test_disk_buses(tmp_path: Path, bus: DiskBus, expected: list[str]) -> None:
    devices = option_values(
        boot.qemu_argv(config(tmp_path, BootProperties(disk_bus=bus))), "-device"
    )
    assert devices[: len(expected)] == expected


def test_ide_on_q35_is_refused(tmp_path: Path) -> None:
    props = BootProperties(disk_bus=DiskBus.IDE, machine=MachineType.Q35)
    with pytest.raises(UsageError, match="no IDE"):
        boot.qemu_argv(config(tmp_path, props))


def test_uefi_uses_ovmf_with_a_private_variable_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, template = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"code")
    template.write_bytes(b"vars")
    monkeypatch.setattr(boot, "OVMF_PAIRS", ((str(code), str(template)),))
    work = tmp_path / "work"
    work.mkdir()
    private = boot.private_firmware_vars(work)
    assert private.read_bytes() == b"vars" and private != template
    cfg = config(tmp_path, BootProperties(firmware=Firmware.UEFI, machine=MachineType.Q35))
    drives = option_values(boot.qemu_argv(cfg), "-drive")
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={code}" in drives
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars.fd'}" in drives
    assert option_values(boot.qemu_argv(cfg), "-machine") == ["q35"]


def test_uefi_without_ovmf_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boot, "OVMF_PAIRS", ((str(tmp_path / "none"), str(tmp_path / "no")),))
    with pytest.raises(CareenError, match="OVMF") as e:
        boot.find_ovmf()
    assert "apt-get install ovmf" in e.value.hint


def test_glance_properties_map_onto_boot_properties() -> None:
    props = BootProperties.from_glance(
        {"hw_firmware_type": "uefi", "hw_disk_bus": "scsi", "hw_machine_type": "pc-q35-7.2"}
    )
    assert props == BootProperties(Firmware.UEFI, DiskBus.SCSI, MachineType.Q35)
    assert BootProperties.from_glance({}) == BootProperties()
    assert BootProperties.from_glance({"hw_machine_type": "pc-i440fx-8.0"}).machine is (
        MachineType.PC
    )


def test_unsupported_glance_properties_are_refused() -> None:
    with pytest.raises(UsageError, match="usb"):
        BootProperties.from_glance({"hw_disk_bus": "usb"})
    with pytest.raises(UsageError, match="microvm"):
        BootProperties.from_glance({"hw_machine_type": "microvm"})


def test_a_free_port_is_on_loopback() -> None:
    port = boot.free_port()
    assert 1024 <= port < 65536
