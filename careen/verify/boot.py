"""The test VM: how it boots (firmware, disk bus, machine type), and starting and stopping it.

`BootProperties` is what a cloud reads from the image's metadata; the Glance properties
`hw_firmware_type`, `hw_disk_bus` and `hw_machine_type` map onto it. The VM boots a
throwaway qcow2 overlay of the image, with the metadata disk as a CD-ROM (where Nova
puts a config drive), the first serial port on a unix socket for careen to follow, and
QEMU's user network with the guest's SSH port forwarded to a port on 127.0.0.1.

qemu is started with careen's one process runner and journaled as a daemon with its PID
and start time, like the appliance's qemu, so `careen cleanup` can stop one that a
killed run left behind.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from careen import accel, journal, run
from careen.errors import CareenError, UsageError
from careen.interrupts import critical
from careen.log import step

log = logging.getLogger(__name__)

QEMU = accel.QEMU
_CONNECT_TIMEOUT = 30.0
# Firmware code and variable-store templates, as Debian (ovmf) and Fedora (edk2-ovmf)
# install them.
OVMF_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class DiskBus(StrEnum):
    VIRTIO = "virtio"
    SCSI = "scsi"  # virtio-scsi, as Nova gives with hw_scsi_model=virtio-scsi
    IDE = "ide"
    SATA = "sata"


class MachineType(StrEnum):
    PC = "pc"  # i440FX
    Q35 = "q35"


@dataclass(frozen=True)
class BootProperties:
    """How the image boots; from the command line, or from Glance's `hw_*` properties."""

    firmware: Firmware = Firmware.BIOS
    disk_bus: DiskBus = DiskBus.VIRTIO
    machine: MachineType = MachineType.PC

    @classmethod
    def from_glance(cls, properties: Mapping[str, str]) -> BootProperties:
        """The properties Nova's libvirt driver would honour; absent ones keep the default."""
        firmware = properties.get("hw_firmware_type") or Firmware.BIOS
        bus = properties.get("hw_disk_bus") or DiskBus.VIRTIO
        machine = properties.get("hw_machine_type") or MachineType.PC
        try:
            return cls(Firmware(firmware), DiskBus(bus), _machine_family(machine))
        except ValueError as e:
            raise UsageError(
                f"cannot boot with the image's properties: {e}",
                hint="supported: hw_firmware_type bios|uefi, hw_disk_bus virtio|scsi|ide|sata, "
                "hw_machine_type pc|q35 (or a versioned pc-i440fx-*/pc-q35-*)",
            ) from e

    def check(self) -> None:
        if self.disk_bus is DiskBus.IDE and self.machine is MachineType.Q35:
            raise UsageError(
                "the q35 machine type has no IDE controller",
                hint="use --disk-bus sata with q35, or --machine pc for IDE",
            )


def _machine_family(name: str) -> MachineType:
    # Nova passes versioned names ("pc-q35-7.2", "pc-i440fx-8.0"); the family decides
    # the devices, and this host's qemu supplies its own newest version of it.
    if name == "q35" or name.startswith("pc-q35-"):
        return MachineType.Q35
    if name in ("pc", "i440fx") or name.startswith("pc-i440fx-"):
        return MachineType.PC
    return MachineType(name)  # raises ValueError naming it


def find_ovmf() -> tuple[Path, Path]:
    """UEFI firmware code and its variable-store template, or a clear error."""
    for code, template in OVMF_PAIRS:
        if Path(code).is_file() and Path(template).is_file():
            return Path(code), Path(template)
    raise CareenError(
        "UEFI boot needs the OVMF firmware, which is not installed",
        hint="apt-get install ovmf (or run scripts/setup); or boot with --firmware bios",
    )


@dataclass(frozen=True)
class VMConfig:
    """Everything one boot needs; `qemu_argv()` turns it into a command line."""

    overlay: Path  # qcow2 over the image
    seed: Path  # ISO with the metadata
    serial_socket: Path
    ssh_port: int
    accelerator: accel.Accel
    boot: BootProperties = field(default_factory=BootProperties)
    memsize: int = 1024  # MiB
    smp: int = 2
    firmware_vars: Path | None = None  # a private copy of the UEFI variable store


def _disk_devices(bus: DiskBus) -> list[str]:
    devices = {
        DiskBus.VIRTIO: ["-device", "virtio-blk-pci,drive=disk0,bootindex=0"],
        DiskBus.SCSI: [
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-device",
            "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0",
        ],
        DiskBus.IDE: ["-device", "ide-hd,drive=disk0,bus=ide.0,bootindex=0"],
        DiskBus.SATA: [
            "-device",
            "ahci,id=sata0",
            "-device",
            "ide-hd,drive=disk0,bus=sata0.0,bootindex=0",
        ],
    }
    return devices[bus]


def _firmware(config: VMConfig) -> list[str]:
    if config.boot.firmware is Firmware.BIOS:
        return []
    code, _template = find_ovmf()
    if config.firmware_vars is None:
        raise ValueError("UEFI needs a private copy of the variable store")
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={config.firmware_vars}",
    ]


def qemu_argv(config: VMConfig) -> list[str]:
    """The qemu-system command for one verification boot."""
    config.boot.check()
    net = f"user,id=net0,hostfwd=tcp:127.0.0.1:{config.ssh_port}-:22"
    return [
        QEMU,
        "-name",
        "careen-verify",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",  # a guest that reboots or powers off ends the check, visibly
        "-machine",
        config.boot.machine.value,
        *accel.qemu_options(config.accelerator),
        "-m",
        str(config.memsize),
        "-smp",
        str(config.smp),
        *_firmware(config),
        "-chardev",
        f"socket,id=serial0,path={config.serial_socket},server=on,wait=on",
        "-serial",
        "chardev:serial0",
        # The overlay records the image's format itself; qemu never probes the image.
        "-drive",
        f"file={config.overlay},format=qcow2,if=none,id=disk0,cache=unsafe,discard=unmap",
        *_disk_devices(config.boot.disk_bus),
        "-drive",
        f"file={config.seed},format=raw,if=none,id=seed0,media=cdrom,readonly=on",
        # ide.1 exists on both machine types: PIIX's second channel, or an ICH9 AHCI port.
        "-device",
        "ide-cd,drive=seed0,bus=ide.1",
        "-netdev",
        net,
        "-device",
        "virtio-net-pci,netdev=net0",
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for the SSH forward)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def private_firmware_vars(directory: Path) -> Path:
    _code, template = find_ovmf()
    target = directory / "efivars.fd"
    shutil.copyfile(template, target)
    return target


@dataclass
class VM:
    daemon: run.Daemon
    serial: socket.socket

    def alive(self) -> bool:
        return self.daemon.process.poll() is None


@contextmanager
def running(config: VMConfig) -> Iterator[VM]:
    """Start qemu, connect to its serial console (which starts the guest), stop it after."""
    argv = qemu_argv(config)
    handle = journal.record("daemon", argv0=f"{QEMU} (careen verify)", image=str(config.overlay))
    title = f"Booting the image ({config.accelerator.upper()}, {_describe(config.boot)})"
    with step(title), critical():  # journaled before Ctrl-C can strike
        daemon = run.spawn(argv, hint="install it: apt-get install qemu-system-x86")
        handle.note(pid=daemon.pid, start_time=journal.process_start_time(daemon.pid))
    try:
        serial = _connect(daemon, config.serial_socket)
        try:
            yield VM(daemon, serial)
        finally:
            serial.close()
    finally:
        daemon.stop()
        handle.done()


def _describe(boot: BootProperties) -> str:
    return f"{boot.firmware}, {boot.disk_bus} disk, {boot.machine} machine"


def _connect(daemon: run.Daemon, path: Path) -> socket.socket:
    """Connect to qemu's serial socket; qemu waits for this before it starts the guest."""
    deadline = time.monotonic() + _CONNECT_TIMEOUT
    while True:
        daemon.check_alive()  # raises with qemu's own message if it refused to start
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if time.monotonic() > deadline:
            raise CareenError(
                f"qemu did not open its serial console within {_CONNECT_TIMEOUT:.0f} s",
                hint="run with --debug to see the qemu command",
            )
        time.sleep(0.05)
