"""Probing untrusted image files: what is accepted, what is refused, and why."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from careen.errors import CareenError
from careen.image import probe
from careen.image.model import ImageFormat, ImageInfo
from careen.image.probe import blockdev_args, blockdev_options, probe_image
from careen.run import Daemon, Limits, run, spawn

from .helpers import MiB, require, sh, sparse_file

SIZE = "64M"


@pytest.fixture(autouse=True)
def _tools() -> None:
    require("qemu-img", "qemu-io")


def qcow2(path: Path, *options: str) -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", *options, path, SIZE)
    return path


def refusal(path: Path, **kwargs: object) -> CareenError:
    with pytest.raises(CareenError) as caught:
        probe_image(path, **kwargs)  # type: ignore[arg-type]
    return caught.value


# --- the file itself -------------------------------------------------------------------


def test_missing(tmp_path: Path) -> None:
    assert "no such file" in str(refusal(tmp_path / "nope.qcow2"))


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in str(refusal(tmp_path))


def test_not_a_regular_file() -> None:
    assert "not a regular file" in str(refusal(Path("/dev/null")))


def test_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.raw").touch()
    assert "is empty" in str(refusal(tmp_path / "empty.raw"))


def test_tiny_raw(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a disk image\n" * 6)
    error = refusal(text)
    assert "only 102 bytes: too small" in str(error) and "check the path" in error.hint


def test_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = sparse_file(tmp_path / "disk.raw", MiB)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # Root reads any file, so refuse the open itself.
    monkeypatch.setattr(Path, "open", denied)
    error = refusal(image)
    assert "cannot be read" in str(error)


# --- accepted images -------------------------------------------------------------------


def test_raw(tmp_path: Path) -> None:
    info = probe_image(sparse_file(tmp_path / "disk.raw", 64 * MiB), expected_format=None)
    assert info.format == ImageFormat.RAW
    assert info.virtual_size == 64 * MiB
    assert info.path.is_absolute()


def test_qcow2(tmp_path: Path) -> None:
    info = probe_image(qcow2(tmp_path / "disk.qcow2"), expected_format=ImageFormat.QCOW2)
    assert (info.format, info.virtual_size, info.cluster_size) == ("qcow2", 64 * MiB, 65536)


def test_vmdk_single_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", image, SIZE)
    assert probe_image(image).format == ImageFormat.VMDK


# --- refusals --------------------------------------------------------------------------


def test_zero_virtual_size(tmp_path: Path) -> None:
    image = tmp_path / "zero.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", image, "0")
    assert "virtual size of 0" in str(refusal(image))


def test_backing_file_refused_unless_named(tmp_path: Path) -> None:
    base = sparse_file(tmp_path / "base.raw", 64 * MiB)
    overlay = qcow2(tmp_path / "overlay.qcow2", "-b", str(base), "-F", "raw")
    error = refusal(overlay)
    assert "backing file" in str(error) and "--backing-file PATH" in error.hint
    assert "qemu-img convert" in error.hint
    other = sparse_file(tmp_path / "other.raw", 64 * MiB)
    assert "backing file" in str(refusal(overlay, backing_file=other))

    info = probe_image(overlay, backing_file=base)
    assert info.backing_file == base and info.backing_format == ImageFormat.RAW


def test_backing_format_must_match_the_backing_file(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    # The header claims raw, the file is qcow2: opening it as either would be a guess.
    overlay = qcow2(tmp_path / "overlay.qcow2", "-b", str(base), "-F", "raw")
    assert "recorded as raw" in str(refusal(overlay, backing_file=base))


def test_data_file_refused_unless_named(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    image = qcow2(tmp_path / "disk.qcow2", "-o", f"data_file={data}")
    error = refusal(image)
    assert "external file" in str(error) and "--data-file PATH" in error.hint
    assert probe_image(image, data_file=data).data_file == data


def create_luks(image: Path) -> None:
    # qemu-img's PBKDF timing sometimes fails with "Unable to get accurate CPU usage"
    # on a busy or virtual host; a retry is enough.
    argv = [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "key-secret=s0,iter-time=100",
        str(image),
        SIZE,
    ]
    for _ in range(5):
        if run(argv, check=False).returncode == 0:
            return
    pytest.fail("qemu-img could not create a LUKS image in 5 tries")


def test_luks_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.luks"
    create_luks(image)
    assert "encrypted" in str(refusal(image))


def test_encrypted_qcow2_refused(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    # Set the header's crypt_method (big-endian u32 at byte 32) to 1, AES: the quickest
    # encrypted qcow2 to make, and one qemu still reads headers of.
    with image.open("r+b") as f:
        f.seek(32)
        f.write((1).to_bytes(4, "big"))
    assert "encrypted" in str(refusal(image))


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
def test_multi_file_vmdk_refused(tmp_path: Path, subformat: str) -> None:
    image = tmp_path / "disk.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", image, SIZE)
    error = refusal(image)
    assert subformat in str(error) and "qemu-img convert" in error.hint


def test_vmdk_descriptor_naming_a_host_file(tmp_path: Path) -> None:
    secret = sparse_file(tmp_path / "host-secret", MiB)
    descriptor = tmp_path / "disk.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        f'RW 2048 FLAT "{secret}" 0\n'
    )
    error = refusal(descriptor)
    assert "monolithicFlat" in str(error)


def test_vmdk_extent_elsewhere_refused() -> None:
    info = {
        "format-specific": {
            "data": {
                "create-type": "monolithicSparse",
                "extents": [{"filename": "/etc/shadow", "format": ""}],
            }
        }
    }
    with pytest.raises(CareenError, match="another file as an extent"):
        probe._check_vmdk(Path("/images/disk.vmdk"), info)


def test_unknown_format_named(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    sh("qemu-img", "create", "-q", "-f", "qed", image, SIZE)
    assert "'qed'" in str(refusal(image))


def test_raw_that_looks_like_qcow2(tmp_path: Path) -> None:
    header = qcow2(tmp_path / "header.qcow2")
    disk = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    with disk.open("r+b") as f:
        f.write(header.read_bytes()[: 64 * 1024])
    error = refusal(disk, expected_format=ImageFormat.RAW)
    assert "recorded as raw but its content is qcow2" in str(error)


def test_truncated_qcow2(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 4M", "-c", "write 32M 4M", image)
    with image.open("r+b") as f:
        f.truncate(MiB)
    assert "damaged" in str(refusal(image))


def test_qcow2_header_cut_short(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    with image.open("r+b") as f:
        f.truncate(50)
    error = refusal(image)
    assert "cannot read it" in str(error) and "truncated" in error.hint


def test_limit_hit_looks_malicious(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    # Far too little memory for qemu-img even to start: it aborts, as on a hostile image.
    monkeypatch.setattr(probe, "PROBE_LIMITS", Limits(address_space=20 * MiB))
    assert "malicious or corrupt" in str(refusal(image))


def wait_for(path: Path, daemon: Daemon) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        daemon.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear")
        time.sleep(0.05)


def test_image_in_use_by_a_running_vm(tmp_path: Path) -> None:
    require("qemu-storage-daemon")
    image = qcow2(tmp_path / "disk.qcow2")
    socket = tmp_path / "nbd.sock"
    daemon = spawn(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={image}",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--nbd-server",
            f"addr.type=unix,addr.path={socket}",
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ]
    )
    try:
        wait_for(socket, daemon)
        error = refusal(image)
        assert "in use by a running VM" in str(error)
        assert "stop the VM" in error.hint and "copy" in error.hint
    finally:
        daemon.stop()


# --- blockdev options ------------------------------------------------------------------


def test_blockdev_options_plain_qcow2() -> None:
    info = ImageInfo(Path("/i/disk.qcow2"), ImageFormat.QCOW2, 64 * MiB, 0)
    nodes = blockdev_options(info, read_only=True, node_name="disk")
    file_node = {"driver": "file", "node-name": "disk-file", "filename": "/i/disk.qcow2"}
    assert nodes == [
        {**file_node, "read-only": True},
        {
            "driver": "qcow2",
            "node-name": "disk",
            "file": "disk-file",
            "read-only": True,
            "backing": None,
        },
    ]
    assert blockdev_args(nodes)[1].startswith('{"driver":"file"')


def test_blockdev_options_raw_has_no_backing_key() -> None:
    info = ImageInfo(Path("/i/disk.raw"), ImageFormat.RAW, 64 * MiB, 0)
    top = blockdev_options(info, read_only=False, node_name="d")[-1]
    assert top == {"driver": "raw", "node-name": "d", "file": "d-file", "read-only": False}


def read_export(tmp_path: Path, nodes: list[dict[str, object]], node: str) -> bytes:
    """Open the nodes in qemu-storage-daemon and read the node's data back over NBD."""
    require("qemu-storage-daemon")
    socket = tmp_path / "nbd.sock"
    daemon = spawn(
        [
            "qemu-storage-daemon",
            *blockdev_args(nodes),
            "--nbd-server",
            f"addr.type=unix,addr.path={socket}",
            "--export",
            f"type=nbd,id=e,node-name={node}",
        ]
    )
    out = tmp_path / "out.raw"
    try:
        wait_for(socket, daemon)
        url = f"nbd+unix:///{node}?socket={socket}"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, out], timeout=60)
    finally:
        daemon.stop()
    return out.read_bytes()


def test_blockdev_options_open_a_named_backing_file(tmp_path: Path) -> None:
    base = sparse_file(tmp_path / "base.raw", 64 * MiB)
    sh("qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 1M", base)
    overlay = qcow2(tmp_path / "overlay.qcow2", "-b", str(base), "-F", "raw")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 1M 1M", overlay)
    info = probe_image(overlay, backing_file=base)
    data = read_export(tmp_path, blockdev_options(info, read_only=True, node_name="disk"), "disk")
    assert data[:MiB] == b"\xaa" * MiB and data[MiB : 2 * MiB] == b"\xbb" * MiB


def test_blockdev_options_never_follow_the_header(tmp_path: Path) -> None:
    base = sparse_file(tmp_path / "base.raw", 64 * MiB)
    sh("qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 1M", base)
    overlay = qcow2(tmp_path / "overlay.qcow2", "-b", str(base), "-F", "raw")
    # As if the backing file had slipped through: qemu must still not open it.
    info = ImageInfo(overlay, ImageFormat.QCOW2, 64 * MiB, 0)
    data = read_export(tmp_path, blockdev_options(info, read_only=True, node_name="disk"), "disk")
    assert data[:MiB] == bytes(MiB)


def test_blockdev_options_open_a_named_data_file(tmp_path: Path) -> None:
    data_file = tmp_path / "data.bin"
    image = qcow2(tmp_path / "disk.qcow2", "-o", f"data_file={data_file}")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xcc 0 1M", image)
    info = probe_image(image, data_file=data_file)
    data = read_export(tmp_path, blockdev_options(info, read_only=True, node_name="disk"), "disk")
    assert data[:MiB] == b"\xcc" * MiB
