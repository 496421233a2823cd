"""Read a refitted image back with tools careen does not use for the work.

The output is converted to raw by qemu-img, partitions come from sfdisk, LVs from
LVM's own reports on a read-only loop device, filesystems are checked by e2fsck and
xfs_repair in no-modify mode, and the root is mounted read-only by mount(8) on a
read-only loop device. None of careen's probing or mounting code is involved.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

LVM_CONFIG = 'global{activation=0} devices{use_devicesfile=0 hints="none"}'


def sh(*argv: str | Path, check: bool = True) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done.stdout


@contextmanager
def ro_loop(image: Path, offset: int, size: int, *, writable: bool = False) -> Iterator[str]:
    """A loop device over a byte range of `image`, read-only unless asked."""
    mode = [] if writable else ["-r"]
    dev = sh("losetup", *mode, "-o", str(offset), "--sizelimit", str(size), "-f", "--show", image)
    try:
        yield dev.strip()
    finally:
        sh("losetup", "-d", dev.strip(), check=False)


@dataclass(frozen=True)
class Volume:
    name: str  # "partition 1", "centos/root", "disk"
    offset: int
    size: int
    type: str


def _fs_type(raw: Path, offset: int, size: int) -> str:
    out = sh(
        "blkid",
        "-p",
        "-o",
        "value",
        "-s",
        "TYPE",
        "-O",
        str(offset),
        "-S",
        str(size),
        raw,
        check=False,
    )
    return out.strip()


def _lvm_volumes(raw: Path, part: Volume) -> list[Volume]:
    out: list[Volume] = []
    with ro_loop(raw, part.offset, part.size) as dev:
        common = ["--devices", dev, "--config", LVM_CONFIG, "--reportformat", "json"]
        pvs = json.loads(sh("pvs", *common, "--units", "b", "--nosuffix", "-o", "pe_start"))
        pe_start = int(pvs["report"][0]["pv"][0]["pe_start"])
        lvs = json.loads(
            sh(
                "lvs",
                *common,
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "vg_name,lv_name,seg_pe_ranges,vg_extent_size,seg_size",
            )
        )
    for row in lvs["report"][0]["lv"]:
        first = int(re.findall(r":(\d+)-(\d+)", row["seg_pe_ranges"])[0][0])
        offset = part.offset + pe_start + first * int(row["vg_extent_size"])
        size = int(row["seg_size"])
        name = f"{row['vg_name']}/{row['lv_name']}"
        out.append(Volume(name, offset, size, _fs_type(raw, offset, size)))
    return out


def volumes(raw: Path) -> list[Volume]:
    """Every filesystem-bearing region of a raw disk, LVs included."""
    table = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    if table.returncode != 0:
        size = raw.stat().st_size
        return [Volume("disk", 0, size, _fs_type(raw, 0, size))]
    data = json.loads(table.stdout)["partitiontable"]
    sector = int(data.get("sectorsize", 512))
    found: list[Volume] = []
    for i, p in enumerate(data["partitions"], 1):
        offset, size = int(p["start"]) * sector, int(p["size"]) * sector
        vol = Volume(f"partition {i}", offset, size, _fs_type(raw, offset, size))
        found += _lvm_volumes(raw, vol) if vol.type == "LVM2_member" else [vol]
    return found


def fsck(raw: Path, vol: Volume) -> None:
    """No-modify check of one filesystem; raises when it reports a problem."""
    with ro_loop(raw, vol.offset, vol.size) as dev:
        if vol.type.startswith("ext"):
            sh("e2fsck", "-fn", dev)
        elif vol.type == "xfs":
            sh("xfs_repair", "-n", dev)


def root_volume(vols: list[Volume]) -> Volume:
    for v in vols:
        if v.name.endswith("/root"):
            return v
    return max((v for v in vols if v.type in ("ext4", "xfs")), key=lambda v: v.size)


@contextmanager
def as_raw(image: Path) -> Iterator[Path]:
    """The image as a raw file (a converted copy for qcow2)."""
    info = json.loads(sh("qemu-img", "info", "--output=json", image))
    if info["format"] == "raw":
        yield image
        return
    with tempfile.TemporaryDirectory(dir=image.parent) as tmp:
        raw = Path(tmp) / "view.raw"
        sh("qemu-img", "convert", "-f", info["format"], "-O", "raw", image, raw)
        yield raw


@contextmanager
def mounted_root(image: Path) -> Iterator[Path]:
    """The image's root filesystem mounted read-only (no journal replay) in a temp dir."""
    with ExitStack() as stack:
        raw = stack.enter_context(as_raw(image))
        vol = root_volume(volumes(raw))
        dev = stack.enter_context(ro_loop(raw, vol.offset, vol.size))
        mnt = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        opts = "ro,norecovery,nouuid" if vol.type == "xfs" else "ro,noload"
        sh("mount", "-t", vol.type, "-o", opts, dev, mnt)
        stack.callback(sh, "umount", mnt)
        yield mnt


def dpkg_version(root: Path, package: str) -> str | None:
    done = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={root}/var/lib/dpkg",
            "-W",
            "-f",
            "${Status} ${Version}",
            package,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or "install ok installed" not in done.stdout:
        return None
    return done.stdout.split()[-1]


def version_greater(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


@dataclass(frozen=True)
class HostState:
    """What a run of careen must leave on the host exactly as it found it."""

    mounts: tuple[str, ...]
    loops: str
    resolv_conf: bytes
    hostname: str
    run_entries: frozenset[str]


def host_state() -> HostState:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return HostState(
        mounts=tuple(" ".join(line.split()[3:5]) for line in lines),
        loops=sh("losetup", "-a"),
        resolv_conf=Path("/etc/resolv.conf").read_bytes(),
        hostname=socket.gethostname(),
        run_entries=frozenset(os.listdir("/run")),
    )


def describe(path: Path) -> tuple[object, ...]:
    """A file or symlink as something to compare exactly: a link's target, or a file's
    bytes, mode and owner."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    return ("file", path.read_bytes(), st.st_mode, st.st_uid, st.st_gid)
