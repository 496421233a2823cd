"""Output formats, in-place work, a host VG named like the guest's, an EFI partition this
kernel cannot mount, and one refit against the real Debian mirror."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from careen.samples import Layout, sample_image, sample_root

from . import verify

pytestmark = [pytest.mark.root, pytest.mark.images]

CAREEN = Path(os.environ.get("CAREEN", Path(__file__).parents[2] / ".venv/bin/careen"))
MiB = 1 << 20


def careen(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(CAREEN), *map(str, args)], capture_output=True, text=True, timeout=900
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@pytest.mark.timeout(300)
def test_raw_output_is_sparse_and_sound(tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    careen("refit", sample_image(Layout.MBR_QCOW2), "-o", out, "-O", "raw", "-r", "reset-identity")
    info = json.loads(verify.sh("qemu-img", "info", "--output=json", out))
    assert info["format"] == "raw"
    assert out.stat().st_blocks * 512 < out.stat().st_size // 2
    for vol in verify.volumes(out):
        verify.fsck(out, vol)


@pytest.mark.timeout(300)
def test_compressed_qcow2(tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    careen("refit", sample_image(Layout.BARE), "-o", out, "-c", "-r", "empty")
    check = json.loads(verify.sh("qemu-img", "check", "--output=json", out))
    assert check["compressed-clusters"] > 0
    plain = tmp_path / "plain.qcow2"
    careen("refit", sample_image(Layout.BARE), "-o", plain, "-r", "empty")
    assert out.stat().st_size < plain.stat().st_size


@pytest.mark.timeout(300)
def test_in_place_changes_the_source_and_says_so(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    shutil.copyfile(sample_image(Layout.BARE), image)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    proc = careen("refit", image, "--in-place", "--write", "/etc/motd:refitted\n")
    assert "--in-place" in proc.stderr
    assert hashlib.sha256(image.read_bytes()).hexdigest() != before
    with verify.mounted_root(image) as root:
        assert (root / "etc/motd").read_text() == "refitted\n"


@pytest.fixture
def host_vg_centos(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A volume group named `centos` on the host (on a loop device), as on a CentOS host."""
    disk = tmp_path / "host-pv.raw"
    with disk.open("wb") as f:
        f.truncate(64 * MiB)
    dev = verify.sh("losetup", "-f", "--show", disk).strip()
    cfg = ["--devices", dev, "--config", verify.LVM_CONFIG + " backup{backup=0 archive=0}"]
    try:
        verify.sh("pvcreate", "-q", *cfg, dev)
        verify.sh("vgcreate", "-q", *cfg, "centos", dev)
        uuid = verify.sh("vgs", *cfg, "--noheadings", "-o", "vg_uuid", "centos").strip()
        yield dev, uuid
    finally:
        verify.sh("losetup", "-d", dev, check=False)


@pytest.mark.timeout(600)
def test_host_vg_with_the_guests_name(host_vg_centos: tuple[str, str], tmp_path: Path) -> None:
    dev, uuid = host_vg_centos
    out = tmp_path / "out.qcow2"
    proc = careen(
        "refit", sample_image(Layout.LVM), "-o", out, "-r", "reset-identity", "--format", "json"
    )
    assert {m["guest"] for m in result(proc)["mounts"]} == {"/", "/boot"}
    cfg = ["--devices", dev, "--config", verify.LVM_CONFIG]
    assert verify.sh("vgs", *cfg, "--noheadings", "-o", "vg_uuid", "centos").strip() == uuid
    # The guest's VG stays named centos in the output; careen renamed nothing.
    with verify.as_raw(out) as raw:
        names = {v.name for v in verify.volumes(raw)}
    assert {"centos/root", "centos/swap"} <= names


ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69E4C7DE47"


def _dummy_deb(tmp: Path, name: str, version: str) -> Path:
    pkg = tmp / f"{name}-{version}"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: careen tests <tests@careen.invalid>\nDescription: stand-in\n"
    )
    deb = tmp / f"{name}_{version}_all.deb"
    verify.sh("dpkg-deb", "-b", "--root-owner-group", pkg, deb)
    return deb


def _esp_image(tmp: Path) -> tuple[Path, int, int]:
    """A GPT disk: an EFI system partition (vfat) and an ext4 root whose fstab mounts it at
    /boot/efi, with a stand-in `grub-efi-amd64` installed."""
    root = tmp / "root"
    verify.sh("cp", "-al", sample_root(), root)
    # Unlink before changing anything: the copy shares its files with the cache.
    dpkg = root / "var/lib/dpkg"
    shutil.copytree(dpkg, tmp / "dpkg", symlinks=True)
    shutil.rmtree(dpkg)
    shutil.copytree(tmp / "dpkg", dpkg, symlinks=True)
    verify.sh(
        "dpkg",
        f"--root={root}",
        "--force-script-chrootless",
        "-i",
        _dummy_deb(tmp, "grub-efi-amd64", "2.06-13"),
    )
    (root / "boot/efi").mkdir(parents=True, exist_ok=True)
    (root / "etc/fstab").unlink()
    (root / "etc/fstab").write_text(
        "LABEL=root / ext4 errors=remount-ro 0 1\nLABEL=ESP /boot/efi vfat umask=0077 0 1\n"
    )
    disk = tmp / "esp.raw"
    with disk.open("wb") as f:
        f.truncate(2048 * MiB)
    script = (
        f"label: gpt\nstart=2048, size=131072, type={ESP_TYPE}\n"
        f"start=133120, size=3840000, type={LINUX_TYPE}\n"
    )
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True)
    verify.sh("mkfs.vfat", "-F", "16", "-n", "ESP", "--offset", "2048", disk, str(64 * 1024))
    size_k = 3840000 * 512 // 1024
    verify.sh(
        "mke2fs",
        "-q",
        "-t",
        "ext4",
        "-L",
        "root",
        "-d",
        root,
        "-E",
        f"offset={133120 * 512}",
        disk,
        f"{size_k}k",
    )
    return disk, 2048 * 512, 64 * MiB


def _region_sha(path: Path, offset: int, size: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(size)).hexdigest()


@pytest.mark.timeout(600)
def test_unmountable_esp_holds_back_boot_loader_packages(tmp_path: Path) -> None:
    if "vfat" in Path("/proc/filesystems").read_text():
        pytest.skip("this kernel mounts vfat, so the EFI partition is mounted normally")
    disk, esp_offset, esp_size = _esp_image(tmp_path)
    esp_before = _region_sha(disk, esp_offset, esp_size)
    out = tmp_path / "out.raw"
    proc = careen(
        "refit",
        disk,
        "-o",
        out,
        "-O",
        "raw",
        "--format",
        "json",
        "--run",
        "apt-mark showhold > /root/held-during-run",
    )
    data = result(proc)
    assert any(
        "boot-loader packages held back" in n and "grub-efi-amd64" in n for n in data["notes"]
    ), data["notes"]
    assert _region_sha(out, esp_offset, esp_size) == esp_before
    with verify.mounted_root(out) as root:
        assert (root / "root/held-during-run").read_text().split() == ["grub-efi-amd64"]
        held = subprocess.run(
            ["apt-mark", f"--root={root}", "showhold"], capture_output=True, text=True
        )
        assert "grub-efi-amd64" not in held.stdout  # released again after the run


@pytest.mark.network
@pytest.mark.timeout(900)
def test_install_from_the_real_debian_mirror(tmp_path: Path) -> None:
    recipe = tmp_path / "mirror.yaml"
    recipe.write_text(
        "name: real-mirror\nsteps:\n"
        "  - write: {path: /etc/apt/sources.list.d/debian.list,"
        ' content: "deb http://deb.debian.org/debian bookworm main\\n"}\n'
        "  - install: [hello]\n"
        "  - clean-caches: true\n"
    )
    out = tmp_path / "out.qcow2"
    proc = careen(
        "refit", sample_image(Layout.MBR_QCOW2), "-o", out, "-r", recipe, "--format", "json"
    )
    installed = {p["name"] for p in result(proc)["changes"]["packages"]["installed"]}
    assert "hello" in installed
    with verify.mounted_root(out) as root:
        assert verify.dpkg_version(root, "hello") is not None
        assert (root / "usr/bin/hello").is_file()


def _btrfs_image(tmp: Path) -> Path:
    """An MBR disk whose one btrfs holds the root in subvolume `root` and /home in `home`,
    as Fedora lays it out."""
    disk = tmp / "btrfs.raw"
    with disk.open("wb") as f:
        f.truncate(2048 * MiB)
    subprocess.run(
        ["sfdisk", "-q", str(disk)], input="start=2048, type=83\n", text=True, check=True
    )
    mnt = tmp / "mnt"
    mnt.mkdir()
    with verify.ro_loop(disk, MiB, 2047 * MiB, writable=True) as dev:
        verify.sh("mkfs.btrfs", "-q", "-L", "fedora", dev)
        verify.sh("mount", dev, mnt)
        try:
            verify.sh("btrfs", "-q", "subvolume", "create", mnt / "root")
            verify.sh("btrfs", "-q", "subvolume", "create", mnt / "home")
            verify.sh("cp", "-a", f"{sample_root()}/.", mnt / "root")
            (mnt / "root/etc/fstab").unlink()
            (mnt / "root/etc/fstab").write_text(
                "LABEL=fedora / btrfs subvol=root 0 0\nLABEL=fedora /home btrfs subvol=home 0 0\n"
            )
            (mnt / "home/marker").write_text("home subvolume\n")
        finally:
            verify.sh("umount", mnt)
    return disk


@pytest.mark.timeout(600)
def test_btrfs_root_and_home_subvolumes(tmp_path: Path) -> None:
    disk = _btrfs_image(tmp_path)
    out = tmp_path / "out.raw"
    proc = careen(
        "refit",
        disk,
        "-o",
        out,
        "-O",
        "raw",
        "--format",
        "json",
        "-r",
        "reset-identity",
        "--write",
        "/home/refitted:yes\n",
    )
    mounts = {m["guest"]: m for m in result(proc)["mounts"]}
    assert mounts["/"]["type"] == mounts["/home"]["type"] == "btrfs"
    mnt = tmp_path / "check"
    mnt.mkdir()
    with verify.ro_loop(out, MiB, 2047 * MiB) as dev:
        verify.sh("mount", "-o", "ro,subvol=home", dev, mnt)
        try:
            assert (mnt / "refitted").read_text() == "yes\n"
            assert (mnt / "marker").exists()
        finally:
            verify.sh("umount", mnt)
        verify.sh("mount", "-o", "ro,subvol=root", dev, mnt)
        try:
            assert not (mnt / "var/lib/cloud/instances").exists()
            assert not (mnt / "home/refitted").exists()
        finally:
            verify.sh("umount", mnt)
