"""`careen inspect --backend appliance` tells what the host backend tells, and writes nothing.

The LVM sample (an xfs root on an LV, an xfs /boot partition, swap on an LV) is
inspected by both backends, as a table and as JSON; the appliance costs a launch per
format. Both must report the same OS, cloud-init version, root and filesystems; the
source's bytes stay as they were.

What only the host backend reports is left out of the comparison: the appliance lists
no LVM volume groups and no PV containers (libguestfs flattens LVM into its LVs), no
partition flags, and cannot match fstab's /dev/mapper names to a filesystem.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration.util import careen, sha256

from careen.samples import Layout, sample_image

pytestmark = [pytest.mark.root, pytest.mark.images]

APPLIANCE = ["--backend", "appliance", "--accel", "tcg", "--smp", "2"]
LAYOUT = Layout.LVM
# The filesystems a guest mounts; a PV is a container, listed by the host backend only.
CONTAINERS = ("LVM2_member",)


@dataclass
class Inspected:
    host_text: str
    host_json: dict[str, Any]
    appliance_text: str
    appliance_json: dict[str, Any]
    appliance_log: str
    sha_before: str
    sha_after: str


def _inspect(source: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = careen("inspect", source, *args, tmpdir=tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def inspected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inspected]:
    source = sample_image(LAYOUT)
    tmp = tmp_path_factory.mktemp("inspect")
    before = sha256(source)
    host_text = _inspect(source, tmp, "--backend", "host").stdout
    host_json = json.loads(_inspect(source, tmp, "--backend", "host", "--format", "json").stdout)
    app_text = _inspect(source, tmp, *APPLIANCE)
    app_json = json.loads(_inspect(source, tmp, *APPLIANCE, "--format", "json").stdout)
    yield Inspected(
        host_text, host_json, app_text.stdout, app_json, app_text.stderr, before, sha256(source)
    )


def tables(text: str) -> dict[str, list[list[str]]]:
    """The rows of each table in `careen inspect`'s text output, by the table's title."""
    found: dict[str, list[list[str]]] = {}
    rows: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("│"):
            rows.append([cell.strip() for cell in stripped.strip("│").split("│")])
        elif stripped and stripped[0] not in "┏┃┡┌└┗┣╇━─":
            rows = found.setdefault(stripped, [])  # a title (or a line of one)
    return found


def filesystems_text(text: str) -> set[tuple[str, ...]]:
    """(on, type, UUID, label) of every filesystem in the text's table, PVs left out."""
    rows = tables(text)["Filesystems"]
    return {tuple(row[:4]) for row in rows if row[1] not in CONTAINERS}


def filesystems_json(doc: dict[str, Any]) -> set[tuple[str, ...]]:
    return {
        (fs["source"], fs["type"], fs["uuid"] or "", fs["label"] or "")
        for fs in doc["filesystems"]
        if fs["type"] not in CONTAINERS
    }


@pytest.mark.timeout(900)
def test_appliance_was_used(inspected: Inspected) -> None:
    log = " ".join(inspected.appliance_log.split())
    assert "Backend: appliance (asked for)" in log
    assert "Launching the libguestfs appliance (TCG)" in log


@pytest.mark.timeout(900)
def test_json_reports_the_same_guest(inspected: Inspected) -> None:
    host, app = inspected.host_json, inspected.appliance_json
    assert app["os"] == host["os"]  # distribution, versions, cloud-init, fstab, ...
    assert app["os"]["cloud_init"]
    assert app["root"]["source"] == host["root"]["source"] == "LV centos/root"
    assert filesystems_json(app) == filesystems_json(host)
    assert {fs[1] for fs in filesystems_json(app)} == {"xfs", "swap"}
    assert app["image"] == host["image"]


@pytest.mark.timeout(900)
def test_text_reports_the_same_guest(inspected: Inspected) -> None:
    host, app = tables(inspected.host_text), tables(inspected.appliance_text)
    assert app["Guest"] == host["Guest"]  # OS, package manager, cloud-init, root, ...
    # Number, start, size and type (hex, as fdisk shows it) of each partition.
    assert [r[:4] for r in app["Partition table (dos)"]] == [
        r[:4] for r in host["Partition table (dos)"]
    ]
    guest = dict(row[:2] for row in app["Guest"])
    assert guest["cloud-init"] == inspected.host_json["os"]["cloud_init"]
    assert guest["root"] == "LV centos/root"
    assert filesystems_text(inspected.appliance_text) == filesystems_text(inspected.host_text)
    assert filesystems_text(inspected.appliance_text) == filesystems_json(inspected.host_json)

    def mounted_at(rows: list[list[str]]) -> dict[str, str]:
        return {row[0]: row[4] for row in rows if row[4].startswith("/")}

    assert mounted_at(app["Filesystems"]) == mounted_at(host["Filesystems"])
    assert mounted_at(app["Filesystems"]) == {"LV centos/root": "/", "partition 1": "/boot"}


@pytest.mark.timeout(900)
def test_source_is_unchanged(inspected: Inspected) -> None:
    assert inspected.sha_after == inspected.sha_before
