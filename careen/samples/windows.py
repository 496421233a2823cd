"""Sample Windows disks with cloudbase-init, for careen's checks of Windows guests.

These are NOT bootable Windows: nothing here runs. Each disk is an MBR disk with one
NTFS partition laid out like a Windows Server 2019 install on which cloudbase-init
has run once (its configuration, local scripts, log, its registry record of which
plugins ran for an instance ID), with SOFTWARE and SYSTEM registry hives written with
hivex, and just enough of System32 for libguestfs's inspection to call it Windows
(a directory "config" and a cmd.exe that `file` takes for a 64-bit PE program).

Three kinds: CLEAN; DIRTY, whose $Volume dirty flag is set as Windows leaves it after
a crash; and HIBERNATED, with a hiberfil.sys that says Windows is asleep. The disks are
built in libguestfs's appliance (so neither the host's kernel nor root is needed for the
NTFS) and cached like the other samples (`careen.samples.cache`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from careen import accel
from careen.errors import CareenError
from careen.image.ntfs import volume_state
from careen.log import step
from careen.samples.cache import _TMP, _build_lock, cache_dir
from careen.samples.hive import HiveTree, empty_hive, write_hive

# Raise whenever the builder changes what it makes in a way the recipe does not show.
BUILD_VERSION = 1

MiB = 1024 * 1024
DISK_SIZE = 256 * MiB
PART_START = 1 * MiB
LABEL = "Windows"
SYSTEMROOT = "/Windows"
NTFS_MBR_TYPE = 0x07

PRODUCT_NAME = "Windows Server 2019 Standard"
HOSTNAME = "win-careen01"
COMPUTER_NAME = "WIN-CAREEN01"
INSTANCE_ID = "iid-careen-windows-1"
CLOUDBASE_INIT_VERSION = "1.1.4"
CLOUDBASE_INIT_PRODUCT = "{6A7A4C9E-1A3D-4B4A-9C4E-2F0C5B1D7E11}"
INSTALL_DIR = "/Program Files/Cloudbase Solutions/Cloudbase-Init"
LOCAL_SCRIPTS = ["01-setup.ps1", "02-join.cmd"]
PLUGINS = [
    "cloudbaseinit.plugins.common.sethostname.SetHostNamePlugin",
    "cloudbaseinit.plugins.windows.createuser.CreateUserPlugin",
    "cloudbaseinit.plugins.common.setuserpassword.SetUserPasswordPlugin",
    "cloudbaseinit.plugins.common.localscripts.LocalScriptsPlugin",
]
HIBERFIL_SIZE = 64 * 1024
PAGEFILE_SIZE = 64 * 1024


class WindowsKind(StrEnum):
    CLEAN = "clean"
    DIRTY = "dirty"  # the $Volume dirty flag set: Windows crashed, chkdsk is due
    HIBERNATED = "hibernated"  # hiberfil.sys says "HIBR": Windows will resume


def software_hive() -> HiveTree:
    return {
        r"Microsoft\Windows NT\CurrentVersion": {
            "ProductName": PRODUCT_NAME,
            "CurrentMajorVersionNumber": 10,
            "CurrentMinorVersionNumber": 0,
            "CurrentBuildNumber": "17763",
            "CurrentBuild": "17763",
            "CurrentVersion": "6.3",
            "EditionID": "ServerStandard",
            "InstallationType": "Server",
        },
        rf"Microsoft\Windows\CurrentVersion\Uninstall\{CLOUDBASE_INIT_PRODUCT}": {
            "DisplayName": f"Cloudbase-Init {CLOUDBASE_INIT_VERSION}",
            "DisplayVersion": f"{CLOUDBASE_INIT_VERSION}.0",
            "Publisher": "Cloudbase Solutions Srl",
            "InstallLocation": _windows_path(INSTALL_DIR) + "\\",
        },
        # Where cloudbase-init records, per instance ID, the plugins that already ran
        # (1: done, do not run again at the next boot).
        rf"Cloudbase Solutions\Cloudbase-Init\{INSTANCE_ID}\Plugins": dict.fromkeys(PLUGINS, 1),
    }


def system_hive() -> HiveTree:
    control_set = "ControlSet001"
    return {
        # libguestfs's inspection follows Select\Current to the control set it reads.
        "Select": {"Current": 1, "Default": 1, "Failed": 0, "LastKnownGood": 1},
        rf"{control_set}\Control\ComputerName\ComputerName": {"ComputerName": COMPUTER_NAME},
        rf"{control_set}\Services\Tcpip\Parameters": {
            "Hostname": HOSTNAME,
            "NV Hostname": HOSTNAME,
        },
        "MountedDevices": {},
    }


def _windows_path(path: str) -> str:
    return "C:" + path.replace("/", "\\")


def _text(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


def _pe_program() -> bytes:
    """The headers of a 64-bit console program: `file` says "PE32+ executable
    (console) x86-64", which is all libguestfs's inspection asks of cmd.exe."""
    dos = b"MZ".ljust(0x3C, b"\0") + struct.pack("<I", 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, 0, 0, 0, 0, 0xF0, 0x0022)  # AMD64, executable
    optional = struct.pack("<H", 0x20B).ljust(0x44, b"\0") + struct.pack("<H", 3)  # console
    return (dos + b"PE\0\0" + coff + optional.ljust(0xF0, b"\0")).ljust(1024, b"\0")


def _cloudbase_init_files() -> dict[str, bytes]:
    log_dir = _windows_path(INSTALL_DIR + "/log")
    common = (
        "[DEFAULT]",
        "username=Admin",
        "groups=Administrators",
        "inject_user_password=true",
        f"bsdtar_path={_windows_path(INSTALL_DIR)}\\bin\\bsdtar.exe",
        f"local_scripts_path={_windows_path(INSTALL_DIR)}\\LocalScripts\\",
        f"logdir={log_dir}\\",
        "verbose=true",
    )
    dist_info = f"Python/Lib/site-packages/cloudbaseinit-{CLOUDBASE_INIT_VERSION}.dist-info"
    files = {
        "conf/cloudbase-init.conf": _text(
            *common,
            "logfile=cloudbase-init.log",
            "metadata_services=cloudbaseinit.metadata.services.configdrive.ConfigDriveService",
            f"plugins={','.join(PLUGINS)}",
        ),
        "conf/cloudbase-init-unattend.conf": _text(
            *common,
            "logfile=cloudbase-init-unattend.log",
            "allow_reboot=false",
            "stop_service_on_exit=false",
            f"plugins={PLUGINS[0]}",
        ),
        "LocalScripts/01-setup.ps1": _text(
            "Set-TimeZone -Id 'UTC'",
            "New-Item -ItemType Directory -Force -Path C:\\careen | Out-Null",
        ),
        "LocalScripts/02-join.cmd": _text("@echo off", "echo joined > C:\\careen\\joined.txt"),
        "log/cloudbase-init.log": _text(
            "2019-11-12 10:00:01.120 1804 INFO cloudbaseinit.init [-] Metadata service "
            "loaded: 'ConfigDriveService'",
            f"2019-11-12 10:00:01.310 1804 INFO cloudbaseinit.init [-] Instance id: {INSTANCE_ID}",
            *(
                f"2019-11-12 10:00:0{i + 2}.000 1804 INFO cloudbaseinit.init [-] "
                f"Executing plugin '{plugin.rsplit('.', 1)[1]}'"
                for i, plugin in enumerate(PLUGINS)
            ),
            "2019-11-12 10:00:09.500 1804 INFO cloudbaseinit.init [-] Plugins execution done",
        ),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: cloudbase-init\nVersion: {CLOUDBASE_INIT_VERSION}\n"
            "Summary: Portable cloud initialization service\n"
        ).encode(),
        "bin/OpenStackService.exe": _pe_program(),
    }
    return {f"{INSTALL_DIR}/{name}": data for name, data in files.items()}


def sample_files(kind: WindowsKind) -> dict[str, bytes]:
    """Every file on the disk but the hives, by path from the volume's root."""
    files = {
        f"{SYSTEMROOT}/System32/cmd.exe": _pe_program(),
        f"{SYSTEMROOT}/System32/drivers/etc/hosts": _text("127.0.0.1 localhost"),
        "/Users/Administrator/Desktop/notes.txt": _text("Refit me with careen."),
        "/pagefile.sys": bytes(PAGEFILE_SIZE),
        **_cloudbase_init_files(),
    }
    if kind is WindowsKind.HIBERNATED:
        files["/hiberfil.sys"] = b"HIBR".ljust(HIBERFIL_SIZE, b"\0")
    return files


def hives() -> dict[str, HiveTree]:
    config = f"{SYSTEMROOT}/System32/config"
    return {f"{config}/SOFTWARE": software_hive(), f"{config}/SYSTEM": system_hive()}


def recipe(kind: WindowsKind) -> dict[str, object]:
    """What decides the disk's contents; the cache key digests it."""
    files = sample_files(kind)
    return {
        "build_version": BUILD_VERSION,
        "kind": str(kind),
        "disk_size": DISK_SIZE,
        "part_start": PART_START,
        "label": LABEL,
        "files": {path: hashlib.sha256(data).hexdigest() for path, data in files.items()},
        "hives": hives(),
        "empty_hive": hashlib.sha256(empty_hive()).hexdigest(),  # what hive.py starts from
    }


def windows_key(kind: WindowsKind) -> str:
    text = json.dumps(recipe(kind), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def windows_path(kind: WindowsKind, cache: Path | None = None) -> Path:
    return cache_dir(cache) / f"windows-{kind}-{windows_key(kind)}.raw"


def windows_sample(kind: WindowsKind, cache: Path | None = None) -> Path:
    """The cached raw Windows sample disk of `kind`, built if missing. Copy it before
    changing it."""
    path = windows_path(kind, cache)
    if not path.is_file():
        with _build_lock(cache_dir(cache)):
            if not path.is_file():
                _build(kind, path)
    return path


def _build(kind: WindowsKind, path: Path) -> None:
    tmp = path.with_name(path.name + _TMP + str(os.getpid()))
    try:
        with step(f"Building the Windows sample disk {path.name}"):
            with tempfile.TemporaryDirectory(dir=path.parent, prefix="hives" + _TMP) as work:
                files = {**sample_files(kind), **_write_hives(Path(work))}
                _make_disk(tmp, files)
            if kind is WindowsKind.DIRTY:
                _mark_dirty(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(path)


def _write_hives(work: Path) -> dict[str, bytes]:
    contents = {}
    for path, tree in hives().items():
        local = work / PurePosixPath(path).name
        write_hive(local, tree)
        contents[path] = local.read_bytes()
    return contents


def _make_disk(disk: Path, files: dict[str, bytes]) -> None:
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
    with appliance(disk, readonly=False) as g:
        device = g.list_devices()[0]
        g.part_init(device, "mbr")
        g.part_add(device, "p", PART_START // 512, -1)
        g.part_set_mbr_id(device, 1, NTFS_MBR_TYPE)
        partition = g.list_partitions()[0]
        g.mkfs("ntfs", partition, label=LABEL)
        g.mount(partition, "/")
        for path, data in sorted(files.items()):
            g.mkdir_p(str(PurePosixPath(path).parent))
            g.write(path, data)
        g.umount_all()


def _mark_dirty(disk: Path) -> None:
    """Set the volume's dirty flag, in $MFT and $MFTMirr alike, as a crashed Windows
    leaves it (the appliance's ntfs-3g clears it when it unmounts, so this comes last)."""
    with disk.open("r+b") as f:

        def read(offset: int, size: int) -> bytes:
            f.seek(PART_START + offset)
            return f.read(size)

        state = volume_state(read)
        for offset in (state.flags_offset, state.mirror_flags_offset):
            f.seek(PART_START + offset)
            f.write(struct.pack("<H", state.flags | 1))
        f.flush()
        os.fsync(f.fileno())
        if not volume_state(read).dirty:
            raise CareenError(f"{disk}: the NTFS dirty flag did not stick")


@contextmanager
def appliance(*disks: Path, readonly: bool = True) -> Iterator[Any]:
    """A launched libguestfs handle with `disks` (raw) added; shut down and closed after."""
    guestfs = importlib.import_module("guestfs")
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        g.set_backend("direct")  # libvirt would need a system daemon and its permissions
        g.set_backend_settings(accel.guestfs_settings(accel.resolve(accel.Accel.AUTO)))
        for disk in disks:
            g.add_drive_opts(str(disk), format="raw", readonly=readonly)
        g.launch()
        yield g
        # Only after success: shutdown() flushes the disks and reports the appliance's
        # failures, which would hide the error that is already unwinding otherwise.
        g.shutdown()
    finally:
        g.close()
