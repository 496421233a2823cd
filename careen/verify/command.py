"""The command-line side of boot verification, for `careen.cli`: options and the report.

`careen verify IMAGE` and `careen refit ... --verify` share the options built here;
`show()` prints the stage table (or JSON) on the console the CLI hands it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from careen.accel import Accel
from careen.errors import UsageError
from careen.refit import Backend
from careen.verify.boot import BootProperties, DiskBus, Firmware, MachineType
from careen.verify.pipeline import (
    DEFAULT_STAGE_TIMEOUT,
    VerifyFailed,
    VerifyOptions,
    VerifyResult,
    verify_image,
)
from careen.verify.seed import Datasource
from careen.verify.stages import Outcome

_STYLE = {Outcome.PASS: "green", Outcome.FAIL: "bold red", Outcome.SKIPPED: "yellow"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify", help="boot an image and check that cloud-init sets its password and key"
    )
    p.add_argument("image", type=Path)
    p.add_argument(
        "--datasource",
        choices=[d.value for d in Datasource],
        default=Datasource.NOCLOUD.value,
        help="how the metadata reaches the guest: a cidata seed or an OpenStack config drive",
    )
    p.add_argument(
        "--firmware",
        choices=[f.value for f in Firmware],
        default=Firmware.BIOS.value,
        help="as Glance's hw_firmware_type (uefi needs OVMF)",
    )
    p.add_argument(
        "--disk-bus",
        choices=[b.value for b in DiskBus],
        default=DiskBus.VIRTIO.value,
        help="as hw_disk_bus (scsi is virtio-scsi)",
    )
    p.add_argument(
        "--machine",
        choices=[m.value for m in MachineType],
        default=MachineType.PC.value,
        help="as hw_machine_type",
    )
    p.add_argument(
        "--stage-timeout",
        type=float,
        default=DEFAULT_STAGE_TIMEOUT,
        metavar="S",
        help=f"seconds each stage may wait (default {DEFAULT_STAGE_TIMEOUT:.0f})",
    )
    p.add_argument("--user", help="the image's default user (default: from its cloud.cfg)")
    p.add_argument("--serial-log", type=Path, metavar="FILE", help="keep the serial log here")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--workdir", type=Path, help="where the overlay and the seed go")
    p.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=Backend.AUTO.value,
        help="who reads the image's files before the boot (as for inspect)",
    )
    p.add_argument(
        "--accel",
        choices=[a.value for a in Accel],
        default=Accel.AUTO.value,
        help="the VM's CPU acceleration (auto tests KVM once per boot)",
    )
    p.add_argument("--smp", type=int, default=2, help="the VM's virtual CPUs")
    p.add_argument("--memsize", type=int, default=1024, metavar="MiB", help="the VM's memory")


def options(args: argparse.Namespace, image: Path) -> VerifyOptions:
    """Verify options from `careen verify` or from `careen refit --verify`.

    refit has no boot options of its own: its output is verified with the defaults, and
    with its --accel, --smp and --memsize when given.
    """
    timeout = getattr(args, "stage_timeout", DEFAULT_STAGE_TIMEOUT)
    if not timeout > 0:
        raise UsageError(
            "--stage-timeout must be a positive number of seconds",
            hint=f"give it more than 0, or leave it out for {DEFAULT_STAGE_TIMEOUT:.0f} s",
        )
    boot = BootProperties(
        Firmware(getattr(args, "firmware", Firmware.BIOS)),
        DiskBus(getattr(args, "disk_bus", DiskBus.VIRTIO)),
        MachineType(getattr(args, "machine", MachineType.PC)),
    )
    return VerifyOptions(
        image=image,
        datasource=Datasource(getattr(args, "datasource", Datasource.NOCLOUD)),
        boot=boot,
        accel=Accel(args.accel),
        memsize=1024 if args.memsize is None else args.memsize,
        smp=2 if args.smp is None else args.smp,
        stage_timeout=timeout,
        user=getattr(args, "user", None),
        serial_log=getattr(args, "serial_log", None),
        workdir=args.workdir,
        backend=Backend(args.backend),
    )


def run_verify(args: argparse.Namespace, out: Console) -> VerifyResult:
    """`careen verify`: the report is printed; a failed stage raises `VerifyFailed`."""
    result = verify_image(options(args, args.image.absolute()))
    show(result, args.format, out)
    if not result.passed:
        raise VerifyFailed(
            result, f"{args.image} failed boot verification at: {', '.join(result.failed)}"
        )
    return result


def verify_output(args: argparse.Namespace, out: Console, image: Path) -> str:
    """`careen refit --verify`: verify the written output before it is renamed into place."""
    result = verify_image(options(args, image))
    if args.format == "text":
        show(result, "table", out)
    if not result.passed:
        if args.format == "json":
            show(result, "json", out)
        raise VerifyFailed(
            result,
            f"the refitted image failed boot verification at: {', '.join(result.failed)}; "
            "it was not written",
        )
    return result.summary()


def show(result: VerifyResult, fmt: str, out: Console) -> None:
    if fmt == "json":
        print(json.dumps(result.as_dict(), indent=2))
        return
    title = (
        f"Boot verification of {result.image.name} ({result.accelerator.upper()}, "
        f"{result.datasource}, {result.boot.firmware}/{result.boot.disk_bus}/"
        f"{result.boot.machine}, user {result.user})"
    )
    t = Table(title=title, title_justify="left")
    for col in ("stage", "result", "time", "detail"):
        t.add_column(col)
    for s in result.stages:
        t.add_row(
            s.stage.value,
            f"[{_STYLE[s.outcome]}]{s.outcome.value}[/]",
            f"{s.seconds:.1f} s",
            Text(s.detail),
        )
    out.print(t)
    out.print(result.summary(), markup=False)
    if result.serial_log:
        out.print(f"Serial log: {result.serial_log}", markup=False, highlight=False)
