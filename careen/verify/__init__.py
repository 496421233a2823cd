"""Boot verification: prove that an image boots and that cloud-init sets it up.

`verify_image()` boots the image on a throwaway overlay with QEMU, gives it metadata
the way a cloud does (NoCloud or ConfigDrive), follows the serial console and reports
pass or fail for each stage: kernel, cloud-init, hostname, password, SSH key. The
pieces: `guestcheck` (what the image holds, read before any boot), `seed` (metadata
and its ISO), `boot` (the VM), `console` (the serial console and what its lines mean),
`stages` (the checks) and `pipeline` (the whole run).
"""

from careen.verify.boot import BootProperties, DiskBus, Firmware, MachineType
from careen.verify.guestcheck import NotBootable
from careen.verify.pipeline import (
    DEFAULT_STAGE_TIMEOUT,
    VerifyFailed,
    VerifyOptions,
    VerifyResult,
    verify_image,
)
from careen.verify.seed import Datasource
from careen.verify.stages import Outcome, Stage, StageResult

__all__ = [
    "DEFAULT_STAGE_TIMEOUT",
    "BootProperties",
    "Datasource",
    "DiskBus",
    "Firmware",
    "MachineType",
    "NotBootable",
    "Outcome",
    "Stage",
    "StageResult",
    "VerifyFailed",
    "VerifyOptions",
    "VerifyResult",
    "verify_image",
]
