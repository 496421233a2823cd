"""The sample guest images, checked with tools independent of the code that built them."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from careen.run import have, run
from careen.samples import Layout, cache, make_image, sample_image, sample_root

pytestmark = [
    pytest.mark.images,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="building sample images needs root"),
    pytest.mark.skipif(not have("mmdebstrap"), reason="needs mmdebstrap (scripts/setup)"),
]

LVM_CONFIG = 'global{activation=0} devices{use_devicesfile=0 hints="none"}'


@pytest.fixture(scope="module")
def root() -> Path:
    return sample_root()


@pytest.fixture(scope="module")
def images() -> dict[Layout, Path]:
    return {layout: sample_image(layout) for layout in Layout}


def partitions(disk: Path) -> list[dict[str, object]]:
    table = json.loads(run(["sfdisk", "--json", disk]).stdout)["partitiontable"]
    assert table["sectorsize"] == 512
    parts: list[dict[str, object]] = table["partitions"]
    return parts


def offset(part: dict[str, object]) -> int:
    return int(str(part["start"])) * 512


def ext4_file(disk: Path, start: int, path: str) -> str:
    """A file's text from the ext4 filesystem at byte `start` of `disk` (no mount)."""
    return run(["debugfs", "-R", f"cat {path}", f"{disk}?offset={start}"]).stdout


def ext4_stat(disk: Path, start: int, path: str) -> str:
    return run(["debugfs", "-R", f"stat {path}", f"{disk}?offset={start}"]).stdout


@contextmanager
def ro_loop(disk: Path, start: int, size: int) -> Iterator[Path]:
    argv = ["losetup", "--find", "--show", "--read-only", "-o", str(start)]
    device = run([*argv, "--sizelimit", str(size), disk]).stdout.strip()
    try:
        yield Path(device)
    finally:
        run(["losetup", "--detach", device])


def blkid(device: Path) -> dict[str, str]:
    out = run(["blkid", "-p", "-o", "export", device]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.timeout(900)
def test_root_looks_used(root: Path) -> None:
    cloud = root / "var/lib/cloud"
    assert (cloud / "instance").is_symlink()
    # The link is absolute inside the guest, so read it rather than resolve it here.
    assert os.readlink(cloud / "instance").startswith("/var/lib/cloud/instances/")
    assert (cloud / "sem").is_dir() and (cloud / "data").is_dir()
    assert not (cloud / "seed/nocloud").exists()
    assert (root / "var/log/cloud-init.log").stat().st_size > 0
    assert list((root / "etc/ssh").glob("ssh_host_*_key"))
    assert re.search(r"(?m)^sample:", (root / "etc/passwd").read_text())
    assert (root / "etc/hostname").read_text().strip() == "sample-guest"
    assert (root / "etc/machine-id").read_text().strip()
    assert list((root / "var/cache/apt/archives").glob("*.deb"))
    assert list((root / "var/cache/apt").glob("*.bin"))


@pytest.mark.timeout(900)
def test_repo_offers_newer_cloud_init(root: Path) -> None:
    admin = root / "var/lib/dpkg"
    query = ["dpkg-query", f"--admindir={admin}", "-W", "-f=${Version}", "cloud-init"]
    installed = run(query).stdout
    repo = root / "srv/careen-repo"
    (deb,) = repo.glob("cloud-init_*.deb")
    offered = run(["dpkg-deb", "-f", deb, "Version"]).stdout.strip()
    assert offered == installed + "+careen1"
    run(["dpkg", "--compare-versions", offered, "gt", installed])
    assert list(repo.glob("qemu-guest-agent_*.deb")) and list(repo.glob("tree_*.deb"))
    packages = (repo / "Packages").read_text()
    assert f"Version: {offered}" in packages
    sources = (root / "etc/apt/sources.list").read_text()
    assert sources == "deb [trusted=yes] file:/srv/careen-repo ./\n"
    assert not list((root / "etc/apt/sources.list.d").iterdir())


@pytest.mark.timeout(900)
def test_qcow2_images_match_their_raw(images: dict[Layout, Path]) -> None:
    for layout in (Layout.MBR_QCOW2, Layout.LVM_QCOW2):
        assert layout.base
        info = json.loads(run(["qemu-img", "info", "--output=json", images[layout]]).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == 2 * 1024**3
        run(["qemu-img", "check", images[layout]])
        run(["qemu-img", "compare", images[layout.base], images[layout]])


@pytest.mark.timeout(900)
def test_mbr_image(images: dict[Layout, Path]) -> None:
    disk = images[Layout.MBR]
    (part,) = partitions(disk)
    assert part["type"] == "83" and offset(part) == 1024 * 1024
    run(["e2fsck", "-fn", f"{disk}?offset={offset(part)}"])
    uuid = run(["blkid", "-p", "-o", "value", "-s", "UUID", f"--offset={offset(part)}", disk])
    fstab = ext4_file(disk, offset(part), "/etc/fstab")
    assert fstab == f"UUID={uuid.stdout.strip()} / ext4 errors=remount-ro 0 1\n"
    assert "Type: regular    Mode:  0644" in ext4_stat(disk, offset(part), "/etc/resolv.conf")
    assert "nameserver 192.0.2.53" in ext4_file(disk, offset(part), "/etc/resolv.conf")
    assert "Type: symlink" in ext4_stat(disk, offset(part), "/var/lib/cloud/instance")
    seed = run(["debugfs", "-R", "ls /var/lib/cloud/seed", f"{disk}?offset={offset(part)}"])
    assert "nocloud" not in seed.stdout


@pytest.mark.timeout(900)
def test_gpt_image(images: dict[Layout, Path]) -> None:
    disk = images[Layout.GPT]
    bios, part = partitions(disk)
    assert bios["type"] == "21686148-6449-6E6F-744E-656564454649"
    assert int(str(bios["size"])) * 512 == 1024 * 1024
    run(["e2fsck", "-fn", f"{disk}?offset={offset(part)}"])
    fstab = ext4_file(disk, offset(part), "/etc/fstab")
    assert fstab == f"PARTUUID={str(part['uuid']).lower()} / ext4 errors=remount-ro 0 1\n"
    stat = ext4_stat(disk, offset(part), "/etc/resolv.conf")
    assert "Type: symlink" in stat
    assert '"../run/systemd/resolve/stub-resolv.conf"' in stat


@pytest.mark.timeout(900)
def test_bare_image(images: dict[Layout, Path]) -> None:
    disk = images[Layout.BARE]
    assert run(["sfdisk", "--json", disk], check=False).returncode != 0
    run(["e2fsck", "-fn", disk])
    fs = run(["blkid", "-p", "-o", "export", disk]).stdout
    assert "TYPE=ext4" in fs and "LABEL=root" in fs
    assert ext4_file(disk, 0, "/etc/fstab") == "LABEL=root / ext4 errors=remount-ro 0 1\n"


def lv_regions(pv: Path) -> dict[str, tuple[int, int]]:
    opts = ["--config", LVM_CONFIG, "--devices", str(pv), "--reportformat", "json"]
    opts += ["--units", "b", "--nosuffix"]
    pvs = json.loads(run(["pvs", *opts, "-o", "pe_start"]).stdout)["report"][0]["pv"]
    fields = "lv_name,vg_name,segtype,vg_extent_size,seg_pe_ranges,seg_size"
    segs = json.loads(run(["lvs", *opts, "--segments", "-o", fields]).stdout)["report"][0]["seg"]
    regions = {}
    for seg in segs:
        assert seg["vg_name"] == "centos" and seg["segtype"] == "linear"
        first = int(seg["seg_pe_ranges"].rsplit(":", 1)[1].split("-")[0])
        start = int(pvs[0]["pe_start"]) + first * int(seg["vg_extent_size"])
        regions[seg["lv_name"]] = (start, int(seg["seg_size"]))
    return regions


@pytest.mark.timeout(900)
def test_lvm_image(images: dict[Layout, Path], tmp_path: Path) -> None:
    disk = images[Layout.LVM]
    boot, pv = partitions(disk)
    assert boot["type"] == "83" and pv["type"] == "8e"
    pv_start, pv_size = offset(pv), int(str(pv["size"])) * 512
    with ro_loop(disk, pv_start, pv_size) as pv_dev:
        regions = lv_regions(pv_dev)
    assert set(regions) == {"root", "swap"}
    with ro_loop(disk, offset(boot), int(str(boot["size"])) * 512) as boot_dev:
        run(["xfs_repair", "-n", boot_dev])
        boot_uuid = blkid(boot_dev)["UUID"]
    swap_start, swap_size = regions["swap"]
    assert swap_size == 128 * 1024**2
    with ro_loop(disk, pv_start + swap_start, swap_size) as swap_dev:
        assert blkid(swap_dev)["TYPE"] == "swap"
    root_start, root_size = regions["root"]
    with ro_loop(disk, pv_start + root_start, root_size) as root_dev:
        run(["xfs_repair", "-n", root_dev])
        run(["mount", "-t", "xfs", "-o", "ro,norecovery", root_dev, tmp_path])
        try:
            fstab = (tmp_path / "etc/fstab").read_text()
            assert (tmp_path / "var/lib/cloud/instance").is_symlink()
        finally:
            run(["umount", tmp_path])
    assert fstab.splitlines() == [
        "/dev/mapper/centos-root / xfs defaults 0 0",
        f"UUID={boot_uuid} /boot xfs defaults 0 0",
        "/dev/mapper/centos-swap swap swap defaults 0 0",
    ]


@pytest.mark.timeout(900)
def test_make_image_leaves_the_root_alone(root: Path, tmp_path: Path) -> None:
    fstab_before = (root / "etc/fstab").read_text()
    disk = make_image(root, Layout.MBR, tmp_path / "disk.raw", resolv_conf_symlink=True)
    (part,) = partitions(disk)
    assert "Type: symlink" in ext4_stat(disk, offset(part), "/etc/resolv.conf")
    assert (root / "etc/fstab").read_text() == fstab_before
    assert not (root / "etc/resolv.conf").is_symlink()


@pytest.mark.timeout(900)
def test_warm_cache_is_fast(images: dict[Layout, Path]) -> None:
    start = time.monotonic()
    again = {layout: sample_image(layout) for layout in Layout}
    assert time.monotonic() - start < 1.0
    assert again == images


def test_sweep_spares_leftovers_with_mounts(tmp_path: Path) -> None:
    samples = cache.cache_dir(tmp_path)
    mounted_in = samples / "root-0.tmp-dead" / "proc"
    mounted_in.mkdir(parents=True)
    (samples / "mbr-0.raw.tmp-1").write_text("half an image")
    run(["mount", "-t", "tmpfs", "tmpfs", mounted_in])
    try:
        (mounted_in / "keep").write_text("host data behind a bind mount")
        with cache._build_lock(samples):
            pass
        assert (mounted_in / "keep").exists()
        assert not (samples / "mbr-0.raw.tmp-1").exists()
    finally:
        run(["umount", mounted_in])
