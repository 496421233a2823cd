"""The Windows sample disks and their hives, read back through libguestfs and hivex.

The disks are checked with libguestfs's own inspection and its hivex API in one
read-only appliance holding all three, and their NTFS state straight from the files.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from careen.image.ntfs import Reader, hibernated, volume_state
from careen.samples import hive
from careen.samples.windows import (
    CLOUDBASE_INIT_VERSION,
    HOSTNAME,
    INSTALL_DIR,
    INSTANCE_ID,
    LOCAL_SCRIPTS,
    PART_START,
    PLUGINS,
    PRODUCT_NAME,
    WindowsKind,
    windows_sample,
)

try:
    importlib.import_module("guestfs")
    HAVE_GUESTFS = True
except ImportError:
    HAVE_GUESTFS = False

IMAGES = [
    pytest.mark.images,
    pytest.mark.skipif(not HAVE_GUESTFS, reason="needs libguestfs's Python binding"),
    # The first run builds three disks (~20 s each under TCG) before the launch.
    pytest.mark.timeout(600),
]

CONFIG = "/Windows/System32/config"
CURRENT_VERSION = r"Microsoft\Windows NT\CurrentVersion"
UNINSTALL = r"Microsoft\Windows\CurrentVersion\Uninstall\{6A7A4C9E-1A3D-4B4A-9C4E-2F0C5B1D7E11}"
PLUGINS_KEY = rf"Cloudbase Solutions\Cloudbase-Init\{INSTANCE_ID}\Plugins"
COMPUTER_NAME = r"ControlSet001\Control\ComputerName\ComputerName"
TCPIP = r"ControlSet001\Services\Tcpip\Parameters"
NTFS_VOLUME_HIBERNATED = 14  # ntfs-3g.probe's exit status for a hibernated Windows


@dataclass
class Seen:
    """What one read-only appliance saw of one sample disk."""

    part: str
    roots: list[str]
    inspection: dict[str, object] = field(default_factory=dict)
    partition: dict[str, object] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    listings: dict[str, list[str]] = field(default_factory=dict)
    keys: dict[str, dict[str, str | int]] = field(default_factory=dict)
    probe_rw: int = -1


@pytest.fixture(scope="module")
def disks() -> dict[WindowsKind, Path]:
    return {kind: windows_sample(kind) for kind in WindowsKind}


@contextmanager
def read_only(*paths: Path) -> Iterator[Any]:
    guestfs = importlib.import_module("guestfs")
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        g.set_backend("direct")
        g.set_backend_settings(["force_tcg"])
        for path in paths:
            g.add_drive_opts(str(path), format="raw", readonly=True)
        g.launch()
        yield g
        g.shutdown()
    finally:
        g.close()


@pytest.fixture(scope="module")
def seen(disks: dict[WindowsKind, Path]) -> dict[WindowsKind, Seen]:
    with read_only(*disks.values()) as g:
        roots = g.inspect_os()
        return {
            kind: look(g, device, roots)
            for kind, device in zip(disks, g.list_devices(), strict=True)
        }


def look(g: Any, device: str, roots: list[str]) -> Seen:
    part = f"{device}1"
    seen = Seen(part, roots)
    if part in roots:
        seen.inspection = {
            "type": g.inspect_get_type(part),
            "product": g.inspect_get_product_name(part),
            "major": g.inspect_get_major_version(part),
            "minor": g.inspect_get_minor_version(part),
            "systemroot": g.inspect_get_windows_systemroot(part),
            "mountpoints": g.inspect_get_mountpoints(part),
            "hostname": g.inspect_get_hostname(part),
            "arch": g.inspect_get_arch(part),
        }
    (start,) = [p["part_start"] for p in g.part_list(device)]
    # blkid, not vfs_label: that runs ntfslabel, which refuses a dirty volume.
    probe = g.blkid(part)
    seen.partition = {
        "start": start,
        "mbr_id": g.part_get_mbr_id(device, 1),
        "type": probe["TYPE"],
        "label": probe["LABEL"],
    }
    seen.probe_rw = g.ntfs_3g_probe(True, part)
    g.mount_ro(part, "/")
    try:
        read_files(g, seen)
        seen.keys = {
            key: hive_values(g, f"{CONFIG}/{hive_name}", key)
            for hive_name, key in [
                ("SOFTWARE", CURRENT_VERSION),
                ("SOFTWARE", UNINSTALL),
                ("SOFTWARE", PLUGINS_KEY),
                ("SYSTEM", "Select"),
                ("SYSTEM", COMPUTER_NAME),
                ("SYSTEM", TCPIP),
            ]
        }
    finally:
        g.umount_all()
    return seen


def read_files(g: Any, seen: Seen) -> None:
    paths = [
        "/Windows/System32/cmd.exe",
        f"{INSTALL_DIR}/conf/cloudbase-init.conf",
        f"{INSTALL_DIR}/conf/cloudbase-init-unattend.conf",
        f"{INSTALL_DIR}/log/cloudbase-init.log",
        f"{INSTALL_DIR}/Python/Lib/site-packages/"
        f"cloudbaseinit-{CLOUDBASE_INIT_VERSION}.dist-info/METADATA",
        "/Users/Administrator/Desktop/notes.txt",
        "/pagefile.sys",
        "/hiberfil.sys",
    ]
    seen.files = {path: g.read_file(path) for path in paths if g.is_file(path)}
    for directory in (f"{INSTALL_DIR}/LocalScripts", f"{INSTALL_DIR}/bin", "/"):
        seen.listings[directory] = sorted(g.ls(directory))


def hive_values(g: Any, hive_path: str, key: str) -> dict[str, str | int]:
    """A key's values through libguestfs's hivex API: dwords as ints, the rest as text."""
    g.hivex_open(hive_path)
    try:
        node = g.hivex_root()
        for name in key.split("\\"):
            node = g.hivex_node_get_child(node, name)
            assert node, f"{hive_path}: no key {key}"
        values: dict[str, str | int] = {}
        for entry in g.hivex_node_values(node):
            value = entry["hivex_value_h"]
            name = g.hivex_value_key(value)
            if g.hivex_value_type(value) == hive.REG_DWORD:
                values[name] = struct.unpack("<I", g.hivex_value_value(value))[0]
            else:
                values[name] = g.hivex_value_string(value)
        return values
    finally:
        g.hivex_close()


def file_reader(path: Path, start: int = 0) -> Reader:
    def read(offset: int, size: int) -> bytes:
        with path.open("rb") as f:
            f.seek(start + offset)
            return f.read(size)

    return read


class TestDisks:
    """The three sample disks, as one read-only appliance sees them."""

    pytestmark = IMAGES

    def test_inspection_finds_windows(self, seen: dict[WindowsKind, Seen]) -> None:
        for kind, disk in seen.items():
            assert disk.roots == ["/dev/sda1", "/dev/sdb1", "/dev/sdc1"], kind
            assert disk.part in disk.roots, kind
            assert disk.inspection == {
                "type": "windows",
                "product": PRODUCT_NAME,
                "major": 10,
                "minor": 0,
                "systemroot": "/Windows",
                "mountpoints": {"/": disk.part},
                "hostname": HOSTNAME,
                "arch": "x86_64",
            }, kind

    def test_partition_and_filesystem(self, seen: dict[WindowsKind, Seen]) -> None:
        for kind, disk in seen.items():
            assert disk.partition == {
                "start": PART_START,
                "mbr_id": 0x07,
                "type": "ntfs",
                "label": "Windows",
            }, kind

    def test_cloudbase_init_files(self, seen: dict[WindowsKind, Seen]) -> None:
        for kind, disk in seen.items():
            files = {path.rsplit("/", 1)[1]: data for path, data in disk.files.items()}
            assert b"[DEFAULT]" in files["cloudbase-init.conf"], kind
            assert b"[DEFAULT]" in files["cloudbase-init-unattend.conf"], kind
            assert INSTANCE_ID.encode() in files["cloudbase-init.log"], kind
            metadata = files["METADATA"].decode().splitlines()
            assert "Name: cloudbase-init" in metadata, kind
            assert f"Version: {CLOUDBASE_INIT_VERSION}" in metadata, kind
            assert disk.listings[f"{INSTALL_DIR}/LocalScripts"] == sorted(LOCAL_SCRIPTS), kind
            assert disk.listings[f"{INSTALL_DIR}/bin"], kind
            assert files["notes.txt"], kind
            assert files["cmd.exe"].startswith(b"MZ"), kind
            assert {"Program Files", "Users", "Windows", "pagefile.sys"} <= set(disk.listings["/"])

    def test_software_hive(self, seen: dict[WindowsKind, Seen]) -> None:
        for kind, disk in seen.items():
            assert disk.keys[CURRENT_VERSION] == {
                "ProductName": PRODUCT_NAME,
                "CurrentMajorVersionNumber": 10,
                "CurrentMinorVersionNumber": 0,
                "CurrentBuildNumber": "17763",
                "CurrentBuild": "17763",
                "CurrentVersion": "6.3",
                "EditionID": "ServerStandard",
                "InstallationType": "Server",
            }, kind
            assert disk.keys[UNINSTALL] == {
                "DisplayName": "Cloudbase-Init 1.1.4",
                "DisplayVersion": "1.1.4.0",
                "Publisher": "Cloudbase Solutions Srl",
                "InstallLocation": "C:\\Program Files\\Cloudbase Solutions\\Cloudbase-Init\\",
            }, kind
            assert disk.keys[PLUGINS_KEY] == dict.fromkeys(PLUGINS, 1), kind
            assert len(PLUGINS) >= 4

    def test_system_hive(self, seen: dict[WindowsKind, Seen]) -> None:
        for kind, disk in seen.items():
            assert disk.keys["Select"]["Current"] == 1, kind
            assert disk.keys[COMPUTER_NAME] == {"ComputerName": "WIN-CAREEN01"}, kind
            assert disk.keys[TCPIP]["Hostname"] == HOSTNAME == "win-careen01", kind

    def test_only_the_dirty_disk_is_dirty(self, disks: dict[WindowsKind, Path]) -> None:
        for kind, path in disks.items():
            state = volume_state(file_reader(path, PART_START))
            assert state.dirty == (kind is WindowsKind.DIRTY), kind
            assert state.version == (3, 1), kind

    def test_only_the_hibernated_disk_is_hibernated(
        self, seen: dict[WindowsKind, Seen], disks: dict[WindowsKind, Path]
    ) -> None:
        for kind, disk in seen.items():
            header = disk.files.get("/hiberfil.sys", b"")[:4]
            is_hibernated = kind is WindowsKind.HIBERNATED
            assert hibernated(header) == is_hibernated, kind
            assert (header == b"HIBR") == is_hibernated, kind
            if is_hibernated:
                assert len(disk.files["/hiberfil.sys"]) == 64 * 1024
            # ntfs-3g agrees: it would mount only the hibernated one read-only.
            assert disk.probe_rw == (NTFS_VOLUME_HIBERNATED if is_hibernated else 0), kind
        assert all(path.name.startswith(f"windows-{kind}-") for kind, path in disks.items())


def test_empty_hive_is_what_hivex_expects(tmp_path: Path) -> None:
    path = tmp_path / "EMPTY"
    hive.write_empty_hive(path)
    data = path.read_bytes()
    assert len(data) == 8192 and data[:4] == b"regf" and data[4096:4100] == b"hbin"
    assert data[4:8] == data[8:12]  # sequence numbers: consistent
    checksum = 0
    for (dword,) in struct.iter_unpack("<I", data[:0x1FC]):
        checksum ^= dword
    assert struct.unpack_from("<I", data, 0x1FC)[0] == checksum
    h = importlib.import_module("hivex").Hivex(str(path))
    assert h.node_name(h.root()) == "ROOT" and h.node_children(h.root()) == []


def test_hivex_fills_the_hive(tmp_path: Path) -> None:
    path = tmp_path / "SOFTWARE"
    hive.write_hive(path, {r"A\B": {"s": "text", "n": 7}, "A": {"C": {}}})
    h = importlib.import_module("hivex").Hivex(str(path))
    a = h.node_get_child(h.root(), "A")
    assert sorted(h.node_name(c) for c in h.node_children(a)) == ["B", "C"]
    b = h.node_get_child(a, "B")
    assert h.value_value(h.node_get_value(b, "s")) == (hive.REG_SZ, "text\0".encode("utf-16-le"))
    assert h.value_dword(h.node_get_value(b, "n")) == 7
    # hivex gives every new key its parent's security cell, and counts the users.
    data = path.read_bytes()
    (security,) = struct.unpack_from("<I", data, 0x1000 + 0x20 + 4 + 0x2C)
    users = struct.unpack_from("<I", data, 0x1000 + security + 4 + 0x0C)[0]
    assert users == 4  # the root, A, B and C
