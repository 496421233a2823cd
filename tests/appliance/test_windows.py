"""Windows images with cloudbase-init, through the appliance.

The samples are not bootable Windows: they are NTFS filesystems with the folder layout
of a Windows install with cloudbase-init and registry hives written with hivex (see
careen/samples/windows.py), one clean, one that Windows "left dirty", one "hibernated".
What careen changed is read back independently: a separate read-only libguestfs launch
copies the files and the SOFTWARE hive out, and Debian's hivex binding reads the hive
on the host.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from integration.util import assert_fails, careen, refit_json, sh, sha256

from careen.samples.windows import (
    CLOUDBASE_INIT_VERSION,
    INSTALL_DIR,
    INSTANCE_ID,
    LOCAL_SCRIPTS,
    PRODUCT_NAME,
    WindowsKind,
    windows_sample,
)

from .conftest import watching_host

pytestmark = [pytest.mark.root, pytest.mark.images]

APPLIANCE = ["--accel", "tcg", "--smp", "2"]  # --backend stays auto: it must pick the appliance
CONF = f"{INSTALL_DIR}/conf/cloudbase-init.conf"
NEW_CONF = "[DEFAULT]\nusername=Admin\ninject_user_password=true\n"
PLUGINS_KEY = ("Cloudbase Solutions", "Cloudbase-Init")


@dataclass
class Contents:
    """What a read-only look at an output image found."""

    files: dict[str, bytes] = field(default_factory=dict)
    local_scripts: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)  # subkeys of Cloudbase-Init
    product: str = ""
    hiberfil: bytes | None = None


def read_back(images: Mapping[str, Path], paths: tuple[str, ...]) -> dict[str, Contents]:
    """One read-only libguestfs launch over every image in `images` (qcow2)."""
    import guestfs
    import hivex

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    for image in images.values():
        g.add_drive_opts(str(image), format="qcow2", readonly=True)
    found: dict[str, Contents] = {}
    try:
        g.launch()
        for (name, _), device in zip(images.items(), g.list_devices(), strict=True):
            g.mount_ro(f"{device}1", "/")
            got = Contents()
            for path in paths:
                if g.exists(path):
                    got.files[path] = g.read_file(path)
            got.local_scripts = sorted(g.ls(f"{INSTALL_DIR}/LocalScripts"))
            if g.exists("/hiberfil.sys"):
                got.hiberfil = g.pread("/hiberfil.sys", 4, 0)
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "SOFTWARE")
                g.download("/Windows/System32/config/SOFTWARE", local)
                h = hivex.Hivex(local)
                got.instances = _subkeys(h, PLUGINS_KEY)
                got.product = _value(
                    h, ("Microsoft", "Windows NT", "CurrentVersion"), "ProductName"
                )
            g.umount_all()
            found[name] = got
    finally:
        g.close()
    return found


def _node(h: Any, path: tuple[str, ...]) -> Any:
    node = h.root()
    for name in path:
        node = h.node_get_child(node, name)
        assert node, f"no key {name} in {path}"
    return node


def _subkeys(h: Any, path: tuple[str, ...]) -> list[str]:
    return sorted(h.node_name(c) for c in h.node_children(_node(h, path)))


def _value(h: Any, path: tuple[str, ...], name: str) -> str:
    value = h.node_get_value(_node(h, path), name)
    _kind, data = h.value_value(value)
    text: str = data.decode("utf-16-le").rstrip("\0")
    return text


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="careen-windows-test-", dir="/var/tmp") as d:
        yield Path(d)


@dataclass
class Refit:
    source: Path
    output: Path
    proc: Any
    sha_before: str
    seen: set[str]


def _refit(work: Path, kind: WindowsKind, name: str, *args: str) -> Refit:
    source = work / f"{name}.raw"
    sh("cp", "--sparse=always", windows_sample(kind), source)
    before = sha256(source)
    output = work / f"{name}.qcow2"
    with watching_host(work) as seen:
        proc = careen(
            "refit",
            source,
            "-o",
            output,
            "--format",
            "json",
            *APPLIANCE,
            *args,
            tmpdir=work,
            timeout=600,
        )
    return Refit(source, output, proc, before, seen)


@pytest.fixture(scope="module")
def conf_file(work: Path) -> Path:
    path = work / "cloudbase-init.conf"
    path.write_text(NEW_CONF)
    return path


@pytest.fixture(scope="module")
def clean(work: Path, conf_file: Path) -> Refit:
    return _refit(
        work,
        WindowsKind.CLEAN,
        "clean",
        "-r",
        "cloudbase-init-reset",
        "--upload",
        f"{conf_file}:{CONF.lower()}",  # Windows paths are case-insensitive
    )


@pytest.fixture(scope="module")
def forced(work: Path) -> dict[str, Refit]:
    return {
        kind: _refit(work, kind, f"forced-{kind}", "-r", "cloudbase-init-reset", "--force-ntfs")
        for kind in (WindowsKind.DIRTY, WindowsKind.HIBERNATED)
    }


@pytest.fixture(scope="module")
def contents(clean: Refit, forced: dict[str, Refit]) -> dict[str, Contents]:
    outputs = {"clean": clean.output} | {k: r.output for k, r in forced.items()}
    for run in (clean, *forced.values()):
        refit_json(run.proc)
    return read_back(outputs, (CONF, "/Users/Administrator/Desktop/notes.txt"))


@pytest.mark.timeout(300)
def test_inspect_reports_windows_and_cloudbase_init(work: Path) -> None:
    proc = careen(
        "inspect", windows_sample(WindowsKind.CLEAN), "--format", "json", *APPLIANCE, tmpdir=work
    )
    assert proc.returncode == 0, proc.stderr
    assert "Backend: appliance" in proc.stderr and "NTFS" in proc.stderr, proc.stderr
    facts = json.loads(proc.stdout)["os"]
    assert facts["family"] == "windows"
    assert facts["pretty_name"] == PRODUCT_NAME
    assert facts["version"] == "10.0.17763"
    assert facts["cloudbase_init"].startswith(CLOUDBASE_INIT_VERSION)
    assert facts["cloudbase_init_folder"].replace("\\", "/").endswith(INSTALL_DIR)


@pytest.mark.timeout(900)
def test_reset_empties_local_scripts_and_plugin_state(
    clean: Refit, contents: dict[str, Contents]
) -> None:
    result = refit_json(clean.proc)
    got = contents["clean"]
    assert got.local_scripts == []
    assert got.instances == []
    assert got.product == PRODUCT_NAME  # the rest of the hive is intact
    assert got.files[CONF] == NEW_CONF.encode()
    assert got.files["/Users/Administrator/Desktop/notes.txt"]
    notes = "\n".join(result["notes"])
    assert INSTANCE_ID in notes and all(s in notes for s in LOCAL_SCRIPTS), notes
    assert sha256(clean.source) == clean.sha_before
    assert clean.seen == set(), "the appliance backend mounted or attached on the host"


@pytest.mark.timeout(300)
def test_dirty_and_hibernated_ntfs_are_refused(work: Path) -> None:
    for kind, why in ((WindowsKind.DIRTY, "dirty"), (WindowsKind.HIBERNATED, "hibernated")):
        run = _refit(work, kind, f"refused-{kind}", "-r", "cloudbase-init-reset")
        assert_fails(run.proc, 1, f"refusing to write to the NTFS.*{why}", "--force-ntfs")
        assert not run.output.exists()
        assert sha256(run.source) == run.sha_before


@pytest.mark.timeout(900)
def test_forced_writes_and_discards_hibernation(
    forced: dict[str, Refit], contents: dict[str, Contents]
) -> None:
    for kind, run in forced.items():
        result = refit_json(run.proc)
        assert any("--force-ntfs" in n for n in result["notes"]), result["notes"]
        assert contents[kind].local_scripts == []
        assert sha256(run.source) == run.sha_before
    hiberfil = contents[WindowsKind.HIBERNATED].hiberfil
    assert hiberfil is None or hiberfil.lower() != b"hibr"


@pytest.mark.timeout(300)
def test_linux_steps_are_refused_on_windows(work: Path) -> None:
    run = _refit(work, WindowsKind.CLEAN, "linux-recipe")  # the default: cloud-init-refresh
    assert_fails(run.proc, 1, "the guest is Windows.*cannot", "cloudbase-init-reset")
    assert not run.output.exists()


@pytest.mark.timeout(120)
def test_host_backend_names_the_appliance(work: Path) -> None:
    proc = careen(
        "refit",
        windows_sample(WindowsKind.CLEAN),
        "-o",
        work / "host.qcow2",
        "--backend",
        "host",
        tmpdir=work,
    )
    assert_fails(proc, 1, "NTFS", "--backend appliance")
