"""`refit --verify`: the written output is checked under its temporary name, and a
refusal publishes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from careen import output, run
from careen.errors import CareenError
from careen.image.model import ImageFormat

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def fake_qemu_img(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(argv: Any, *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        argv = [str(a) for a in argv]
        if argv[:2] == ["qemu-img", "measure"]:
            return subprocess.CompletedProcess(argv, 0, '{"required": 1024}', "")
        assert argv[:2] == ["qemu-img", "convert"]
        Path(argv[-1]).write_bytes(b"image")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(run, "run", fake)


def test_the_check_sees_the_temporary_file_before_the_rename(
    tmp_path: Path, fake_qemu_img: None
) -> None:
    dest = tmp_path / "out.qcow2"
    seen: list[tuple[Path, bytes, bool]] = []

    def check(path: Path) -> None:
        seen.append((path, path.read_bytes(), dest.exists()))

    output.write_image(
        tmp_path / "in.qcow2", ImageFormat.QCOW2, dest, ImageFormat.QCOW2, compress=False,
        check=check,
    )  # fmt: skip
    assert seen == [(output.partial_name(dest), b"image", False)]
    assert dest.read_bytes() == b"image"


def test_a_refused_output_is_removed_and_never_published(
    tmp_path: Path, fake_qemu_img: None
) -> None:
    dest = tmp_path / "out.qcow2"

    def refuse(path: Path) -> None:
        raise CareenError("the refitted image failed boot verification at: password")

    with pytest.raises(CareenError, match="password"):
        output.write_image(
            tmp_path / "in.qcow2", ImageFormat.QCOW2, dest, ImageFormat.QCOW2, compress=False,
            check=refuse,
        )  # fmt: skip
    assert not dest.exists()
    assert not output.partial_name(dest).exists()
