"""SELinux relabelling in the appliance: one launch, checked from outside.

A private copy of the SELinux sample is refitted with `--backend appliance` by a recipe
that writes a new file in /etc and installs `tree` (from the guest's local repository;
package work makes careen give the appliance its network, which is also when guestfsd
moves the guest's /etc/resolv.conf aside while a command runs). The labels are read
and compared with the guest's policy exactly as on the host backend: from the output
mounted read-only by mount(8), against the guest's own `matchpathcon`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration import verify
from integration.test_selinux import (
    CHANGED,
    NEW_FILE,
    OPERATIONS,
    RELABELLED,
    UNCHANGED,
    label,
    mislabelled,
    selinux_notes,
)
from integration.util import careen, copy_sample, sha256

from careen.samples import Layout

from .conftest import host_entries

pytestmark = [pytest.mark.root, pytest.mark.images]

APPLIANCE = ("--backend", "appliance", "--accel", "tcg", "--smp", "2")


@dataclass
class Run:
    result: dict[str, Any]
    stderr: str
    output: Path
    source_unchanged: bool
    leftovers: set[str]


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory: pytest.TempPathFactory) -> Run:
    base = tmp_path_factory.mktemp("appliance-selinux")
    source = copy_sample(Layout.SELINUX, base / "selinux.raw")
    before = sha256(source)
    out = base / "relabelled.qcow2"
    argv = ("refit", source, "-o", out, "--format", "json", *APPLIANCE, *OPERATIONS)
    proc = careen(*argv, tmpdir=base, timeout=1500)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return Run(result, proc.stderr, out, sha256(source) == before, host_entries(base))


@pytest.fixture(scope="module")
def relabelled_root(relabelled: Run) -> Iterator[Path]:
    with verify.mounted_root(relabelled.output) as root:
        yield root


@pytest.mark.timeout(1800)
def test_the_appliance_left_the_host_and_source_alone(relabelled: Run) -> None:
    assert relabelled.source_unchanged
    assert not relabelled.leftovers


@pytest.mark.timeout(1800)
def test_changed_files_carry_the_policys_labels(relabelled: Run, relabelled_root: Path) -> None:
    created = relabelled.result["changes"]["paths"]["created"]
    assert NEW_FILE in created and "/usr/bin/tree" in created
    assert not mislabelled(relabelled_root, (*CHANGED, *UNCHANGED))
    # The file guestfsd had moved aside while setfiles ran got its own name's label.
    assert label(relabelled_root, "/etc/resolv.conf") == "system_u:object_r:net_conf_t:s0"


@pytest.mark.timeout(1800)
def test_the_note_says_setfiles_ran(relabelled: Run, relabelled_root: Path) -> None:
    (note,) = selinux_notes(relabelled.result)
    assert note.startswith(RELABELLED)
    assert RELABELLED in relabelled.stderr
    assert not os.path.lexists(relabelled_root / ".autorelabel")
