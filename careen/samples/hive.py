"""Small Windows registry hives for the Windows sample disks.

hivex edits hives but cannot create one, so `write_empty_hive` writes the smallest hive
Windows' own format allows (a "regf" base block and one 4 KiB "hbin" holding the root
key and its security cell), written from the format's public description; `write_hive`
then fills it with keys and values through hivex. These hives are test data: enough
for libguestfs's inspection and for careen's checks, not a registry Windows could boot
with.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

from careen.errors import CareenError

# A key's contents: a str is a REG_SZ value, an int a REG_DWORD, a mapping a subkey. A
# key name may hold backslashes ("Microsoft\\Windows NT") to name nested subkeys.
HiveTree: TypeAlias = Mapping[str, "str | int | HiveTree"]

REG_SZ = 1
REG_DWORD = 4

_BLOCK = 0x1000  # the base block's size, and the size of the one hive bin
_NO_CELL = 0xFFFFFFFF
_ROOT_NAME = b"ROOT"
# Fixed, so that the same tree always gives the same bytes (the samples are cached).
_WRITTEN = datetime(2019, 11, 12, tzinfo=UTC)
# KEY_HIVE_ENTRY | KEY_NO_DELETE | KEY_COMP_NAME: the hive's root, never deleted, its
# name stored as ASCII.
_ROOT_FLAGS = 0x0004 | 0x0008 | 0x0020
# S-1-5-32-544, BUILTIN\Administrators: owner and group of the root key.
_ADMINISTRATORS = struct.pack("<BB6sII", 1, 2, (5).to_bytes(6, "big"), 32, 544)


def _filetime(when: datetime) -> int:
    """100 ns ticks since 1601-01-01, the registry's timestamps."""
    return int((when - datetime(1601, 1, 1, tzinfo=UTC)).total_seconds()) * 10_000_000


def _cell(body: bytes) -> bytes:
    """An allocated cell: negative size (including the size field), padded to 8 bytes."""
    size = -(-(4 + len(body)) // 8) * 8
    return struct.pack("<i", -size) + body.ljust(size - 4, b"\0")


def _security_descriptor() -> bytes:
    """A self-relative descriptor with an owner and a group, and no DACL or SACL."""
    header = 20
    owner, group = header, header + len(_ADMINISTRATORS)
    control = 0x8000  # SE_SELF_RELATIVE
    return struct.pack("<BBHIIII", 1, 0, control, owner, group, 0, 0) + _ADMINISTRATORS * 2


def _root_key(security: int) -> bytes:
    return (
        struct.pack(
            "<2sHQII IIII IIII IIIII HH",
            b"nk",
            _ROOT_FLAGS,
            _filetime(_WRITTEN),
            0,  # access bits
            _NO_CELL,  # parent: the root has none
            0,  # subkeys
            0,  # volatile subkeys
            _NO_CELL,  # subkey list
            _NO_CELL,  # volatile subkey list
            0,  # values
            _NO_CELL,  # value list
            security,
            _NO_CELL,  # class name
            0,  # largest subkey name
            0,  # largest subkey class name
            0,  # largest value name
            0,  # largest value data
            0,  # work variable
            len(_ROOT_NAME),
            0,  # class name length
        )
        + _ROOT_NAME
    )


def _security_cell(offset: int) -> bytes:
    """The one security cell: a list of itself (flink and blink), used by the root key."""
    descriptor = _security_descriptor()
    return struct.pack("<2sHIIII", b"sk", 0, offset, offset, 1, len(descriptor)) + descriptor


def _hive_bin() -> tuple[bytes, int]:
    """The hive bin's bytes and the root key's offset (relative to the first bin)."""
    header = struct.pack("<4sII8sQI", b"hbin", 0, _BLOCK, b"", _filetime(_WRITTEN), 0)
    root_offset = len(header)
    security_offset = root_offset + len(_cell(_root_key(0)))
    cells = _cell(_root_key(security_offset)) + _cell(_security_cell(security_offset))
    used = header + cells
    free = _BLOCK - len(used)  # a free cell (positive size) fills the rest of the bin
    return used + struct.pack("<i", free).ljust(free, b"\0"), root_offset


def _base_block(root_offset: int, file_name: str) -> bytes:
    head = struct.pack(
        "<4sIIQIIIIIII64s",
        b"regf",
        1,  # primary sequence number; equal to the secondary one: the hive is consistent
        1,
        _filetime(_WRITTEN),
        1,  # major version
        5,  # minor version: 1.5 allows the "lh" subkey lists that hivex writes
        0,  # primary file
        1,  # direct memory load
        root_offset,
        _BLOCK,  # size of the hive bins data
        1,  # clustering factor
        file_name.encode("utf-16-le")[-64:],
    )
    head = head.ljust(0x1FC, b"\0")
    checksum = 0
    for (dword,) in struct.iter_unpack("<I", head):
        checksum ^= dword
    return (head + struct.pack("<I", checksum)).ljust(_BLOCK, b"\0")


def empty_hive(file_name: str = "") -> bytes:
    """The bytes of a hive with only its root key; `file_name` is recorded in the header."""
    hbin, root_offset = _hive_bin()
    return _base_block(root_offset, file_name) + hbin


def write_empty_hive(path: Path, file_name: str = "") -> None:
    path.write_bytes(empty_hive(file_name or path.name))


def write_hive(path: Path, tree: HiveTree) -> None:
    """Write a hive holding `tree` to `path`."""
    write_empty_hive(path)
    add_to_hive(path, tree)


def add_to_hive(path: Path, tree: HiveTree) -> None:
    """Add the keys and values of `tree` to the hive at `path`, through hivex."""
    h = _hivex().Hivex(str(path), write=True)
    _add(h, h.root(), tree)
    h.commit(None)


def _add(h: Any, node: int, tree: HiveTree) -> None:
    for name, item in tree.items():
        if isinstance(item, Mapping):
            _add(h, _subkey(h, node, name), item)
        else:
            h.node_set_value(node, _value(name, item))


def _subkey(h: Any, node: int, path: str) -> int:
    for name in path.split("\\"):
        child = h.node_get_child(node, name)
        node = child if child else h.node_add_child(node, name)
    return node


def _value(name: str, item: str | int) -> dict[str, object]:
    # bool is an int; a registry flag is a dword, so True means 1.
    if isinstance(item, int):
        return {"key": name, "t": REG_DWORD, "value": struct.pack("<I", item)}
    return {"key": name, "t": REG_SZ, "value": (item + "\0").encode("utf-16-le")}


def _hivex() -> Any:
    # Debian's python3-hivex has no type information; importing it by name keeps mypy
    # from needing a stub for it.
    try:
        return importlib.import_module("hivex")
    except ImportError as e:
        raise CareenError(
            "writing registry hives needs hivex's Python binding",
            hint="apt-get install python3-hivex, with a Python that sees Debian's packages",
        ) from e
