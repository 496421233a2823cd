"""Windows facts and recipe checks that need no image: versions, folders, refusals."""

from __future__ import annotations

import pytest

from careen import recipe
from careen.errors import CareenError
from careen.guest import windows
from careen.image.model import OSInfo
from careen.recipe import Op, Step

WINDOWS = OSInfo("windows", "windows", "10.0.17763", "Windows Server 2019 Standard")
DEBIAN = OSInfo("linux", "debian", "12", "Debian GNU/Linux 12 (bookworm)")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {
                "CurrentMajorVersionNumber": 10,
                "CurrentMinorVersionNumber": 0,
                "CurrentBuildNumber": "17763",
                "CurrentVersion": "6.3",
            },
            "10.0.17763",
        ),
        ({"CurrentVersion": "6.3", "CurrentBuild": "9600"}, "6.3.9600"),
        ({"CurrentVersion": "6.1"}, "6.1"),
        ({}, ""),
    ],
)
def test_version_from_current_version_key(values: dict[str, str | int], expected: str) -> None:
    assert windows._version(values) == expected


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        (
            "C:\\Program Files\\Cloudbase Solutions\\Cloudbase-Init",
            "/Program Files/Cloudbase Solutions/Cloudbase-Init",
        ),
        ("c:\\Tools\\", "/Tools"),
        ("D:\\Cloudbase-Init", None),
    ],
)
def test_guest_path_of_a_windows_folder(folder: str, expected: str | None) -> None:
    assert windows.guest_path(folder) == expected


def test_builtin_windows_recipe() -> None:
    r = recipe.load("cloudbase-init-reset")
    assert [s.op for s in r.steps] == [Op.RESET_CLOUDBASE_INIT]


def test_windows_takes_file_steps_and_the_reset() -> None:
    steps = [Step(Op.UPLOAD, path="/x"), Step(Op.DELETE, path="/y"), Step(Op.RESET_CLOUDBASE_INIT)]
    windows.check_recipe(WINDOWS, steps)


def test_windows_refuses_what_needs_its_programs() -> None:
    steps = recipe.load("cloud-init-refresh").all_steps
    with pytest.raises(CareenError, match="clean-caches, install, reset-cloud-init, update"):
        windows.check_recipe(WINDOWS, steps)


def test_linux_refuses_the_cloudbase_init_reset() -> None:
    with pytest.raises(CareenError, match="for Windows guests"):
        windows.check_recipe(DEBIAN, [Step(Op.RESET_CLOUDBASE_INIT)])
    windows.check_recipe(DEBIAN, recipe.load("cloud-init-refresh").all_steps)
