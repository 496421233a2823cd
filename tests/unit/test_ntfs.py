"""Reading NTFS volume flags, checked against volumes made by the host's mkntfs."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import ClassVar

import pytest

from careen.errors import CareenError
from careen.image.ntfs import Reader, VolumeState, hibernated, volume_state
from careen.run import have, run

MiB = 1024 * 1024


def bytes_reader(data: bytes) -> Reader:
    return lambda offset, size: data[offset : offset + size]


def file_reader(path: Path) -> Reader:
    def read(offset: int, size: int) -> bytes:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    return read


def mkntfs(path: Path, size: int = 16 * MiB, options: tuple[str, ...] = ()) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    run(["mkntfs", "-F", "-q", "-Q", *options, path])
    return path


def ntfsinfo(path: Path) -> tuple[str, str]:
    """The volume flags and version as ntfs-3g's ntfsinfo reports them."""
    # --force: ntfsinfo refuses a dirty volume otherwise ("scheduled for check").
    out = run(["ntfsinfo", "--force", "-m", path]).stdout
    flags = re.search(r"Volume Flags: (0x[0-9a-f]+)", out)
    version = re.search(r"Volume Version: (\S+)", out)
    assert flags and version, out
    return flags[1], version[1]


def write_flags(path: Path, state: VolumeState, flags: int, mirror: bool = True) -> None:
    offsets = [state.flags_offset, state.mirror_flags_offset] if mirror else [state.flags_offset]
    with path.open("r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(struct.pack("<H", flags))


def volume_record_offset(data: bytes | bytearray) -> int:
    """Where MFT record 3 starts, from the boot sector (for corrupting it on purpose)."""
    sector_size, sectors = struct.unpack_from("<HB", data, 0x0B)
    (mft_lcn,) = struct.unpack_from("<Q", data, 0x30)
    (per_record,) = struct.unpack_from("<b", data, 0x40)
    cluster = sector_size * sectors
    record = 1 << -per_record if per_record < 0 else per_record * cluster
    return int(mft_lcn * cluster + 3 * record)


class TestMkntfsVolumes:
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [
        pytest.mark.real_commands,
        pytest.mark.skipif(not have("mkntfs"), reason="needs mkntfs (apt-get install ntfs-3g)"),
    ]

    @pytest.mark.parametrize(
        ("options", "size"),
        [
            ((), 16 * MiB),
            (("-c", "512"), 16 * MiB),  # clusters smaller than a record: a positive count
            (("-c", "131072"), 64 * MiB),  # 256 sectors per cluster: the 2 ** -n form
            (("-s", "4096"), 32 * MiB),  # 4 KiB records, eight fixup strides
        ],
    )
    def test_fresh_volume_is_clean(
        self, tmp_path: Path, options: tuple[str, ...], size: int
    ) -> None:
        disk = mkntfs(tmp_path / "ntfs.img", size, options)
        state = volume_state(file_reader(disk))
        assert not state.dirty and state.version == (3, 1)
        assert ntfsinfo(disk) == (f"{state.flags:#06x}", "3.1")
        data = disk.read_bytes()
        for offset in (state.flags_offset, state.mirror_flags_offset):
            assert struct.unpack_from("<H", data, offset)[0] == state.flags
            assert offset % 512 not in (510, 511)

    def test_dirty_flag(self, tmp_path: Path) -> None:
        disk = mkntfs(tmp_path / "ntfs.img")
        clean = volume_state(file_reader(disk))
        write_flags(disk, clean, clean.flags | 1)
        dirty = volume_state(file_reader(disk))
        assert dirty.dirty and dirty.flags == clean.flags | 1
        assert dirty.flags_offset == clean.flags_offset
        assert ntfsinfo(disk) == ("0x0001", "3.1")
        # Both copies changed alike: ntfs-3g finds $MFT and $MFTMirr consistent.
        run(["ntfsfix", "--no-action", disk])
        write_flags(disk, dirty, clean.flags)
        assert not volume_state(file_reader(disk)).dirty

    def test_mft_and_mirror_must_agree(self, tmp_path: Path) -> None:
        disk = mkntfs(tmp_path / "ntfs.img")
        state = volume_state(file_reader(disk))
        write_flags(disk, state, state.flags | 1, mirror=False)
        with pytest.raises(CareenError, match=r"\$MFTMirr does not match \$MFT"):
            volume_state(file_reader(disk))

    def test_truncated_volume(self, tmp_path: Path) -> None:
        data = mkntfs(tmp_path / "ntfs.img").read_bytes()
        with pytest.raises(CareenError, match="truncated"):
            volume_state(bytes_reader(data[: volume_record_offset(data) + 512]))

    def test_wrong_oem_id(self, tmp_path: Path) -> None:
        data = bytearray(mkntfs(tmp_path / "ntfs.img").read_bytes())
        data[3:11] = b"EXFAT   "
        with pytest.raises(CareenError, match="not NTFS: the boot sector's OEM ID"):
            volume_state(bytes_reader(bytes(data)))

    def test_not_a_file_record(self, tmp_path: Path) -> None:
        data = bytearray(mkntfs(tmp_path / "ntfs.img").read_bytes())
        record = volume_record_offset(data)
        data[record : record + 4] = b"BAAD"  # what NTFS writes over a record it found torn
        with pytest.raises(CareenError, match="MFT record 3 starts b'BAAD'"):
            volume_state(bytes_reader(bytes(data)))

    def test_fixup_mismatch(self, tmp_path: Path) -> None:
        data = bytearray(mkntfs(tmp_path / "ntfs.img").read_bytes())
        end_of_stride = volume_record_offset(data) + 512
        data[end_of_stride - 2] ^= 0xFF
        with pytest.raises(CareenError, match="fixup mismatch in MFT record 3 at byte 510"):
            volume_state(bytes_reader(bytes(data)))


def test_zeros_are_not_ntfs() -> None:
    with pytest.raises(CareenError, match="not NTFS"):
        volume_state(bytes_reader(bytes(MiB)))


def test_empty_read_is_truncated() -> None:
    with pytest.raises(CareenError, match="not NTFS: truncated at byte 0"):
        volume_state(bytes_reader(b""))


def test_boot_sector_without_a_valid_geometry() -> None:
    sector = bytearray(512)
    sector[3:11] = b"NTFS    "
    sector[510:512] = b"\x55\xaa"
    struct.pack_into("<HB", sector, 0x0B, 512, 3)  # three sectors per cluster
    with pytest.raises(CareenError, match="3 sectors per cluster"):
        volume_state(bytes_reader(bytes(sector)))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"HIBR" + bytes(60), True),
        (b"hibr", True),
        (b"HiBr\x01\x02", True),
        (b"wake" + bytes(60), False),
        (bytes(64), False),
        (b"RSTR", False),
        (b"hib", False),
        (b"", False),
    ],
)
def test_hibernated(header: bytes, expected: bool) -> None:
    assert hibernated(header) is expected
