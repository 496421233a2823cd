"""Windows guests: facts from the registry, and cloudbase-init's reset.

Windows images are handled by the appliance backend only: the host cannot mount NTFS
here, and careen never runs Windows programs. Everything comes from files and from the
registry hives, which libguestfs's hivex calls read and write inside the appliance:

- the version from `SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion`;
- cloudbase-init's version and folder from its uninstall entry (or, when that is
  missing, from the default folder and the Python package's metadata inside it);
- cloudbase-init's run state: `SOFTWARE\\Cloudbase Solutions\\Cloudbase-Init\\<instance
  ID>\\Plugins` records which plugins already ran for an instance. Removing those keys
  makes every plugin run again on the next boot, as on a fresh instance.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PureWindowsPath
from typing import Any

from careen.attach.appliance import ApplianceGuest
from careen.errors import CareenError
from careen.guest.base import Guest, exists
from careen.image.model import OSInfo
from careen.recipe import Op, Step

log = logging.getLogger(__name__)

SOFTWARE_HIVE = "System32/config/SOFTWARE"
CURRENT_VERSION = ("Microsoft", "Windows NT", "CurrentVersion")
UNINSTALL = (
    ("Microsoft", "Windows", "CurrentVersion", "Uninstall"),
    ("WOW6432Node", "Microsoft", "Windows", "CurrentVersion", "Uninstall"),
)
# 32-bit installs on 64-bit Windows keep their key under WOW6432Node.
CLOUDBASE_INIT_KEYS = (
    ("Cloudbase Solutions", "Cloudbase-Init"),
    ("WOW6432Node", "Cloudbase Solutions", "Cloudbase-Init"),
)
DEFAULT_FOLDERS = (
    "C:\\Program Files\\Cloudbase Solutions\\Cloudbase-Init",
    "C:\\Program Files (x86)\\Cloudbase Solutions\\Cloudbase-Init",
)
LOCAL_SCRIPTS = "LocalScripts"
# The operations a Windows guest can take: careen runs no Windows programs.
WINDOWS_OPS = frozenset({Op.UPLOAD, Op.WRITE, Op.DELETE, Op.RESET_CLOUDBASE_INIT})
REG_SZ, REG_EXPAND_SZ, REG_DWORD = 1, 2, 4


class Hive:
    """An open registry hive in the appliance (libguestfs holds one at a time)."""

    def __init__(self, g: Any) -> None:
        self.g = g

    def key(self, path: Sequence[str]) -> int | None:
        """The node at `path` below the root (names are case-insensitive), or None."""
        node: int = self.g.hivex_root()
        for name in path:
            node = self.g.hivex_node_get_child(node, name)
            if not node:
                return None
        return node

    def subkeys(self, node: int) -> dict[str, int]:
        children = self.g.hivex_node_children(node)
        handles = [int(c["hivex_node_h"]) for c in children]
        return {self.g.hivex_node_name(h): h for h in handles}

    def values(self, node: int) -> dict[str, str | int]:
        """A key's string and number values by name (other types are left out)."""
        found: dict[str, str | int] = {}
        for v in self.g.hivex_node_values(node):
            handle = int(v["hivex_value_h"])
            kind = self.g.hivex_value_type(handle)
            name = self.g.hivex_value_key(handle)
            if kind in (REG_SZ, REG_EXPAND_SZ):
                found[name] = self.g.hivex_value_utf8(handle)
            elif kind == REG_DWORD:
                found[name] = int.from_bytes(self.g.hivex_value_value(handle)[:4], "little")
        return found

    def delete(self, node: int) -> None:
        self.g.hivex_node_delete_child(node)


@contextmanager
def open_hive(g: Any, path: str, *, write: bool = False) -> Iterator[Hive]:
    """The hive file at guest path `path`, committed on success when `write`."""
    try:
        g.hivex_open(g.case_sensitive_path(path), write=write)
    except RuntimeError as e:
        raise CareenError(f"cannot open the registry hive {path}: {e}") from e
    try:
        yield Hive(g)
        if write:
            try:
                g.hivex_commit(None)
            except RuntimeError as e:
                raise CareenError(f"writing the registry hive {path} failed: {e}") from e
    finally:
        g.hivex_close()


@dataclass(frozen=True)
class CloudbaseInit:
    version: str
    folder: str  # as Windows names it: C:\Program Files\...


def detect(guest: ApplianceGuest, root: str) -> OSInfo:
    """Facts about the Windows guest whose root device libguestfs inspected as `root`."""
    g = guest.g
    systemroot = g.inspect_get_windows_systemroot(root)
    with open_hive(g, f"{systemroot}/{SOFTWARE_HIVE}") as hive:
        node = hive.key(CURRENT_VERSION)
        current = hive.values(node) if node else {}
        cbi = _from_uninstall_entries(hive)
    cbi = cbi or _from_default_folder(guest)
    product = str(current.get("ProductName") or g.inspect_get_product_name(root))
    return OSInfo(
        family="windows",
        distro="windows",
        version=_version(current),
        pretty_name=product,
        cloudbase_init=cbi.version if cbi else None,
        cloudbase_init_folder=cbi.folder if cbi else None,
        windows_systemroot=systemroot,
    )


def _version(current: dict[str, str | int]) -> str:
    """ "10.0.17763" from Windows 10 and later; "6.3.9600" style before."""
    major, minor = (
        current.get("CurrentMajorVersionNumber"),
        current.get("CurrentMinorVersionNumber"),
    )
    base = f"{major}.{minor}" if isinstance(major, int) else str(current.get("CurrentVersion", ""))
    build = current.get("CurrentBuildNumber") or current.get("CurrentBuild")
    return f"{base}.{build}" if base and build else base


def _from_uninstall_entries(hive: Hive) -> CloudbaseInit | None:
    for path in UNINSTALL:
        node = hive.key(path)
        for entry in hive.subkeys(node).values() if node else ():
            v = hive.values(entry)
            if str(v.get("DisplayName", "")).lower().startswith("cloudbase-init"):
                folder = str(v.get("InstallLocation") or DEFAULT_FOLDERS[0]).rstrip("\\")
                return CloudbaseInit(str(v.get("DisplayVersion", "unknown")), folder)
    return None


def _from_default_folder(guest: ApplianceGuest) -> CloudbaseInit | None:
    for folder in DEFAULT_FOLDERS:
        path = guest_path(folder)
        if path is None or not exists(guest, path):
            continue
        site = f"{path}/Python/Lib/site-packages"
        names = guest.listdir(site) if exists(guest, site) else []
        versions = [
            m[1] for n in names if (m := re.fullmatch(r"cloudbase_?init-(.+)\.dist-info", n))
        ]
        return CloudbaseInit(versions[0] if versions else "unknown", folder)
    return None


def guest_path(folder: str) -> str | None:
    """The guest path of a folder on C:, or None for another drive."""
    p = PureWindowsPath(folder)
    if p.drive.upper() != "C:":
        return None
    return "/" + "/".join(p.parts[1:])


def check_recipe(facts: OSInfo, steps: Sequence[Step]) -> None:
    """Refuse, before anything changes, what a guest of this family cannot take."""
    if facts.family == "windows":
        wrong = sorted({str(s.op) for s in steps if s.op not in WINDOWS_OPS})
        if wrong:
            raise CareenError(
                f"the guest is Windows ({facts.pretty_name}); careen cannot {', '.join(wrong)} "
                "in it, since it runs no Windows programs",
                hint="Windows recipes may upload, write, delete and reset-cloudbase-init "
                "(the built-in recipe cloudbase-init-reset)",
            )
        return
    if any(s.op is Op.RESET_CLOUDBASE_INIT for s in steps):
        raise CareenError(
            f"reset-cloudbase-init is for Windows guests; this one is {facts.pretty_name}",
            hint="use reset-cloud-init (the cloud-init-refresh or reset-identity recipe)",
        )


def reset_cloudbase_init(guest: Guest, facts: OSInfo) -> list[str]:
    """Empty LocalScripts and forget which plugins ran; notes on what was removed."""
    if not isinstance(guest, ApplianceGuest):
        raise CareenError("a Windows guest is only changed through --backend appliance")
    if facts.cloudbase_init_folder is None:
        raise CareenError(
            "cloudbase-init is not installed in this guest; nothing to reset",
            hint="check `careen inspect`; install it with an upload step first",
        )
    notes = [_empty_local_scripts(guest, facts.cloudbase_init_folder)]
    software = f"{facts.windows_systemroot or '/Windows'}/{SOFTWARE_HIVE}"
    with open_hive(guest.g, software, write=True) as hive:
        forgotten = []
        for path in CLOUDBASE_INIT_KEYS:
            node = hive.key(path)
            for name, child in (hive.subkeys(node) if node else {}).items():
                hive.delete(child)
                forgotten.append(name)
    notes.append(
        "cloudbase-init's plugin state removed for instance(s) " + ", ".join(forgotten)
        if forgotten
        else "cloudbase-init had no plugin state to remove"
    )
    return notes


def _empty_local_scripts(guest: ApplianceGuest, folder: str) -> str:
    path = guest_path(folder)
    if path is None:
        return f"cloudbase-init is on another drive ({folder}); its LocalScripts were left"
    scripts = f"{path}/{LOCAL_SCRIPTS}"
    if not exists(guest, scripts):
        return f"no LocalScripts folder in {folder}"
    names = sorted(guest.listdir(scripts))
    for name in names:
        guest.delete(f"{scripts}/{name}")
    return f"LocalScripts emptied ({len(names)} removed: {', '.join(names) or 'none'})"
