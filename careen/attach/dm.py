"""Assemble a guest's logical volumes with device-mapper, without LVM.

Where the host kernel has device-mapper, any linear, multi-segment or striped LV can be
mounted: careen reads the layout from the guest's own metadata (`careen.image.lvm`), writes
the device-mapper table that LVM would load, and creates the device with `dmsetup`. LVM
itself is never asked to activate anything, so the guest's VG name never meets the host's
(a guest VG `centos` on a host with a VG `centos`), no devices file or lvm.conf of the host
is read or changed, and the guest's metadata is left exactly as it was.

The device is named `careen-RUN-VG-LV`, so two runs, or a guest and the host, never share
a name, and a leftover can be told apart from anything else on the host. Thin, cache,
RAID, mirror, snapshot and VDO segments need LVM's own activation and are refused.

The loop devices under a table start at each PV's first extent rather than at its label:
the host's udev and LVM scanning then see no PV on them, and cannot autoactivate the
guest's VG behind careen's back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from careen import linux, run
from careen.errors import CareenError
from careen.image.lvm import APPLIANCE_HINT
from careen.image.model import LogicalVolume, Segment, VolumeGroup
from careen.log import step

log = logging.getLogger(__name__)

SECTOR = 512
CONTROL = Path("/dev/mapper/control")
# DM_NAME_LEN is 128 bytes including the terminating NUL.
MAX_NAME = 127
_REMOVE_ATTEMPTS = 5
# dmsetup waits for udev to settle each change; a host whose udev hangs must not hang careen.
_DMSETUP_TIMEOUT = 120.0


def dm_available() -> bool:
    """Whether this host can create device-mapper devices now.

    The control node alone proves nothing: containers often have it without the driver
    behind it, and then every `dmsetup` call fails with "No such device".
    """
    if not CONTROL.exists():
        return False
    try:
        done = run.run(["dmsetup", "version"], check=False, timeout=30)
    except run.CommandError:  # dmsetup is not installed, or it hung
        return False
    return done.returncode == 0


def dm_name(run_id: str, vg: str, lv: str) -> str:
    """A device-mapper name that belongs to this run of careen and to this LV only.

    Dashes inside each part are doubled, as LVM does for its own names, so that a single
    dash separates parts and `careen-a-b-c` cannot mean two different LVs. The single dashes
    after `careen-` also mean no name LVM makes can ever equal it (LVM doubles every dash
    after the first), whatever the host's VGs are called. Characters outside LVM's own name
    alphabet, which udev would mangle in `/dev/mapper/`, become `_`. An over-long name keeps
    a digest of the full one, so it stays unique.
    """
    parts = [_sanitise(p).replace("-", "--") for p in (run_id, vg, lv)]
    name = "careen-" + "-".join(parts)
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = name[: MAX_NAME - len(digest) - 1] + "-" + digest
    return name


def _sanitise(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", part) or "_"


@dataclass(frozen=True)
class _Extents:
    """Where a PV's extents lie on a block device."""

    device: str
    offset: int  # bytes from the start of the device to extent 0
    size: int  # bytes available from `offset` on


def lv_table(vg: VolumeGroup, lv: LogicalVolume, pv_devices: Mapping[str, str]) -> str:
    """The device-mapper table for `lv`, each PV given as a block device over its whole
    region (label included), keyed by the PV's name in the metadata ("pv0")."""
    where = {
        pv.name: _Extents(pv_devices[pv.name], pv.pe_start, pv.region.size - pv.pe_start)
        for pv in vg.pvs
        if pv.name in pv_devices
    }
    return _table(vg, lv, where)


def check_lv(vg: VolumeGroup, lv: LogicalVolume) -> None:
    """Raise the reason `lv` cannot be assembled here, before any device is made."""
    lv_table(vg, lv, {pv.name: pv.name for pv in vg.pvs})


def _table(vg: VolumeGroup, lv: LogicalVolume, where: Mapping[str, _Extents]) -> str:
    what = f"LV {vg.name}/{lv.name}"
    if vg.extent_size <= 0 or vg.extent_size % SECTOR:
        raise CareenError(
            f"{what}: extent size {vg.extent_size} is not a whole number of sectors", APPLIANCE_HINT
        )
    if not lv.segments:
        raise CareenError(f"{what} has no segments", APPLIANCE_HINT)
    lines = []
    next_extent = 0
    for seg in sorted(lv.segments, key=lambda s: s.start_extent):
        if seg.type not in ("striped", "linear") or not seg.stripes:
            raise CareenError(
                f"{what} has a {seg.type} segment, which needs LVM's own activation",
                APPLIANCE_HINT,
            )
        # A hole would leave part of the LV unmapped, and dmsetup refuses it anyway.
        if seg.start_extent != next_extent or seg.extent_count <= 0:
            raise CareenError(
                f"{what} has a gap or an overlap at extent {seg.start_extent}",
                "check the image with the guest's own tools (vgck), or use --backend appliance",
            )
        next_extent += seg.extent_count
        lines.append(_line(vg, lv, seg, where))
    return "\n".join(lines) + "\n"


def _line(vg: VolumeGroup, lv: LogicalVolume, seg: Segment, where: Mapping[str, _Extents]) -> str:
    """One table line: `START LENGTH linear DEV OFFSET` or
    `START LENGTH striped N CHUNK DEV1 OFFSET1 ... DEVN OFFSETN`, all in sectors."""
    what = f"LV {vg.name}/{lv.name}"
    extent = vg.extent_size // SECTOR
    start, length = seg.start_extent * extent, seg.extent_count * extent
    if seg.extent_count % len(seg.stripes):
        raise CareenError(
            f"{what}: {seg.extent_count} extents do not divide into {len(seg.stripes)} stripes",
            APPLIANCE_HINT,
        )
    per_stripe = seg.extent_count // len(seg.stripes) * vg.extent_size
    areas = []
    for stripe in seg.stripes:
        ext = _extents_of(vg, lv, stripe.pv, where)
        offset = stripe.start_extent * vg.extent_size
        if offset + per_stripe > ext.size:
            raise CareenError(
                f"{what} runs past the end of its PV ({stripe.pv})", "the image looks truncated"
            )
        areas.append(f"{ext.device} {(ext.offset + offset) // SECTOR}")
    if len(areas) == 1:
        return f"{start} {length} linear {areas[0]}"
    chunk = seg.stripe_size
    if not chunk or chunk % SECTOR:
        raise CareenError(f"{what} is striped without a usable stripe size", APPLIANCE_HINT)
    return f"{start} {length} striped {len(areas)} {chunk // SECTOR} " + " ".join(areas)


def _extents_of(
    vg: VolumeGroup, lv: LogicalVolume, pv_name: str, where: Mapping[str, _Extents]
) -> _Extents:
    try:
        vg.pv(pv_name)
    except KeyError:
        raise CareenError(
            f"LV {vg.name}/{lv.name} lies on {pv_name}, which is not in this image",
            "attach every disk of the volume group, or use --backend appliance",
        ) from None
    if pv_name not in where:
        raise ValueError(f"no block device given for {pv_name}")
    return where[pv_name]


@contextmanager
def dm_device(name: str, table: str, *, read_only: bool) -> Iterator[str]:
    """Create the device-mapper device `name` from `table`; yield its `/dev/mapper` path.

    The table goes through stdin, which takes any number of lines on every dmsetup version
    (`--table` takes one). The device is removed however the block ends; a removal that
    fails is raised, or logged when another error is already on its way out.
    """
    argv = ["dmsetup", "create", *(["--readonly"] if read_only else []), name]
    run.run(argv, input=table, timeout=_DMSETUP_TIMEOUT)
    try:
        yield f"/dev/mapper/{name}"
    except BaseException:
        try:
            dm_remove(name)
        except Exception as e:
            log.error("could not remove device-mapper device %s: %s", name, e)
        raise
    dm_remove(name)


def dm_remove(name: str) -> None:
    """Remove a device-mapper device, waiting out brief holders such as udev's blkid."""
    for attempt in range(_REMOVE_ATTEMPTS):
        try:
            run.run(["dmsetup", "remove", name], timeout=_DMSETUP_TIMEOUT)
            return
        except run.CommandError as e:
            if "busy" not in e.stderr.lower() or attempt == _REMOVE_ATTEMPTS - 1:
                raise
            log.debug("%s is busy; retrying its removal", name)
            time.sleep(0.2 * (attempt + 1))


@contextmanager
def lv_device(
    raw: Path, vg: VolumeGroup, lv: LogicalVolume, run_id: str, *, read_only: bool
) -> Iterator[str]:
    """Assemble `lv` from the raw view of its disk and yield its device path.

    One loop device is attached over the extents of each PV the LV uses. The loops are
    autoclear and careen holds them open until the device-mapper device is gone, so they
    outlive it and then detach by themselves. Mount the yielded device inside the block,
    and unmount it before the block ends.
    """
    check_lv(vg, lv)  # refuse before attaching anything
    needed = sorted({stripe.pv for seg in lv.segments for stripe in seg.stripes})
    with ExitStack() as stack:
        where = {}
        for pv_name in needed:
            pv = vg.pv(pv_name)
            offset, size = pv.region.offset + pv.pe_start, pv.region.size - pv.pe_start
            device = stack.enter_context(linux.loop_device(raw, offset, size, read_only=read_only))
            where[pv_name] = _Extents(device, 0, size)
        name = dm_name(run_id, vg.name, lv.name)
        with step(f"Assembling LV {vg.name}/{lv.name} ({lv.layout}) as {name}"):
            device = stack.enter_context(
                dm_device(name, _table(vg, lv, where), read_only=read_only)
            )
        _wait_for_node(device)
        yield device


def _wait_for_node(device: str, timeout: float = 10.0) -> None:
    # dmsetup waits for udev when udev runs and makes the node itself when it does not, but
    # a udev that is still busy elsewhere may make it a moment later.
    deadline = time.monotonic() + timeout
    while not os.path.exists(device):
        if time.monotonic() > deadline:
            raise CareenError(
                f"{device} did not appear within {timeout:.0f} s",
                "check that udev is running, or use --backend appliance",
            )
        time.sleep(0.05)
