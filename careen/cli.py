"""The `careen` command: verbs, options, exit codes, and everything printed for humans.

Library code only logs; this module configures logging and prints results (a table,
or JSON with `--format json`). A `CareenError` becomes one line with a hint and its
exit code; a traceback appears only with `--debug`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from careen import __version__, interrupts, journal, linux, recipe, recover
from careen.accel import Accel
from careen.attach import host
from careen.ceph import command as ceph_command
from careen.errors import CareenError, ExitCode, UsageError
from careen.fleet import command as fleet_command
from careen.fleet import worker as worker_command
from careen.glance import command as glance_command
from careen.image.model import Disk, ImageFormat, OSInfo, Segment
from careen.refit import (
    ApplianceOptions,
    Backend,
    RefitOptions,
    RefitResult,
    inspect_image,
    refit,
)
from careen.verify import command as verify_command

log = logging.getLogger("careen")
_LIST_LIMIT = 40


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # Unwind like Ctrl-C so every resource is released; repeats only say so meanwhile.
    signal.signal(signal.SIGINT, _cleanup_in_progress)
    signal.signal(signal.SIGTERM, _cleanup_in_progress)
    interrupts.deliver(signum)


def _cleanup_in_progress(signum: int, _frame: FrameType | None) -> None:
    print("careen: cleaning up, please wait (releasing mounts and devices)", file=sys.stderr)


class _OpAction(argparse.Action):
    """Append an operation step in command-line order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        steps = list(getattr(namespace, "ops", None) or [])
        value = values if isinstance(values, str) else None
        steps.append((recipe.Op(self.const), value))
        namespace.ops = steps


_VALUED_OPS = {
    "--update": ("PKG[,PKG]", "upgrade named packages"),
    "--install": ("PKG[,PKG]", "install packages"),
    "--remove": ("PKG[,PKG]", "remove packages"),
    "--run": ("CMD", "run a shell command inside the guest"),
    "--script": ("FILE", "run a local script inside the guest"),
    "--upload": ("SRC:DEST", "copy a local file into the guest"),
    "--write": ("PATH:CONTENT", "write a file in the guest"),
    "--delete": ("PATH", "delete a path in the guest (wildcards in the last part)"),
}
_FLAG_OPS = {
    "--update-all": ("update", "upgrade every package"),
    "--clean-caches": ("clean-caches", "clean the package manager's caches"),
    "--reset-cloud-init": ("reset-cloud-init", "reset cloud-init state and network identity"),
    "--reset-machine-id": ("reset-machine-id", "empty /etc/machine-id"),
    "--remove-ssh-host-keys": ("remove-ssh-host-keys", "remove the SSH host keys"),
    "--reset-cloudbase-init": (
        "reset-cloudbase-init",
        "Windows: empty cloudbase-init's LocalScripts and remove its plugin state",
    ),
}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="careen", description="Refit existing cloud images offline, without booting them."
    )
    p.add_argument("--version", action="version", version=f"careen {__version__}")
    p.add_argument("--debug", action="store_true", help="log commands and show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    ins = sub.add_parser("inspect", help="show what is inside an image")
    ins.add_argument("image", type=Path)
    ins.add_argument("--format", choices=("table", "json"), default="table")
    ins.add_argument("--workdir", type=Path, help="where temporary files go")
    _add_backend_options(ins)

    ref = sub.add_parser("refit", help="refit an image into a new one")
    ref.add_argument("image", type=Path)
    ref.add_argument("-o", "--output", type=Path, help="the new image to write")
    ref.add_argument(
        "-r", "--recipe", help=f"a recipe file or built-in ({', '.join(recipe.BUILTIN)})"
    )
    ref.add_argument("-O", "--output-format", choices=("qcow2", "raw"), default="qcow2")
    ref.add_argument("-c", "--compress", action="store_true", help="compress qcow2 output")
    ref.add_argument("--in-place", action="store_true", help="change the source image itself")
    ref.add_argument("--force", action="store_true", help="overwrite an existing output")
    ref.add_argument("--workdir", type=Path, help="where the overlay goes (default: beside -o)")
    ref.add_argument("--backing-file", type=Path, help="allow this backing file of the source")
    ref.add_argument("--data-file", type=Path, help="allow this external data file")
    ref.add_argument(
        "--timeout", type=_seconds, default=3600.0, help="seconds one command in the guest may run"
    )
    ref.add_argument("--format", choices=("text", "json"), default="text")
    _add_backend_options(ref)
    glance_command.add_options(ref)
    ref.add_argument(
        "--verify",
        action="store_true",
        help="boot the output before publishing it, and refuse it unless cloud-init sets "
        "its password and key (see careen verify)",
    )
    verify_command.add_parser(sub)
    glance_command.add_publish_parser(sub)
    fleet_command.add_parser(sub)
    worker_command.add_parser(sub)
    clean = sub.add_parser("cleanup", help="undo what killed or crashed runs left behind")
    clean.add_argument("--dry-run", action="store_true", help="list what would be released")
    clean.add_argument("--format", choices=("text", "json"), default="text")
    ops = ref.add_argument_group("operations (appended after the recipe's steps, in order)")
    for flag, (metavar, text) in _VALUED_OPS.items():
        ops.add_argument(
            flag, action=_OpAction, const=flag[2:], metavar=metavar, help=text, dest="ops"
        )
    for flag, (op, text) in _FLAG_OPS.items():
        ops.add_argument(flag, action=_OpAction, const=op, nargs=0, help=text, dest="ops")
    return p


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=Backend.AUTO.value,
        help="who mounts the guest: the host kernel (needs root), libguestfs's appliance, "
        "or auto (the host when it can, and says why)",
    )
    p.add_argument(
        "--accel",
        choices=[a.value for a in Accel],
        default=Accel.AUTO.value,
        help="the appliance's CPU acceleration (auto tests KVM once per boot)",
    )
    p.add_argument("--smp", type=int, help="the appliance's virtual CPUs")
    p.add_argument("--memsize", type=int, metavar="MiB", help="the appliance's memory")
    p.add_argument(
        "--force-ntfs",
        action="store_true",
        help="write to an NTFS that Windows left dirty or hibernated (the hibernated "
        "session is lost)",
    )


def _appliance_options(args: argparse.Namespace) -> ApplianceOptions:
    for name in ("smp", "memsize"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(
                f"--{name} must be a positive number",
                hint=f"give --{name} 1 or more, or leave it out for the default",
            )
    return ApplianceOptions(Accel(args.accel), args.smp, args.memsize, args.force_ntfs)


def _console(stderr: bool = False) -> Console:
    # Not a terminal: do not wrap at 80 columns, or UUIDs and paths get cut.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(
            console=_console(stderr=True), show_time=debug, show_path=False, markup=False
        )
        logging.basicConfig(level=level, handlers=[handler], format="%(message)s")
        return
    # A log file or a pipe: plain lines, unwrapped, nothing padded.
    fmt = "%(asctime)s %(levelname)s %(message)s" if debug else "%(levelname)s %(message)s"
    logging.basicConfig(level=level, handlers=[logging.StreamHandler()], format=fmt)


def _recipe(args: argparse.Namespace) -> recipe.Recipe:
    ops = getattr(args, "ops", None) or []
    extra = tuple(recipe.step_from_option(op, value, Path.cwd()) for op, value in ops)
    if args.recipe is None and extra:
        return recipe.Recipe("command line", (), origin="command line", extra=extra)
    return recipe.load(args.recipe or "cloud-init-refresh").with_steps(extra)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.debug, args.quiet)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if os.environ.get("CAREEN_DIE_WITH_PARENT") == "1":
        linux.die_with_parent(signal.SIGTERM)
    try:
        if os.geteuid() == 0 and not linux.enter_private_mount_namespace():
            log.debug("no private mount namespace; mounts are visible to the host meanwhile")
        return _dispatch(args)
    except CareenError as e:
        if args.debug:
            log.exception("failed")
        print(f"careen: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"careen: hint: {e.hint}", file=sys.stderr)
        return int(e.exit_code)
    except interrupts.Interrupted as e:
        print(f"careen: interrupted ({e}); everything was released", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:
        # The reader went away (`careen inspect ... | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "cleanup":
        return _cleanup(args)
    if args.verb == "fleet":  # the coordinator holds nothing itself; each refit journals
        return fleet_command.run_fleet(args)
    if args.verb == "worker":  # nor does a worker
        return worker_command.run_worker(args)
    if Backend(getattr(args, "backend", "auto")) is Backend.HOST:
        host.require_root(args.verb)  # before anything is written to the state directory
    with journal.run_journal():
        return _dispatch_run(args)


def _cleanup(args: argparse.Namespace) -> int:
    report = recover.cleanup(dry_run=args.dry_run)
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.actions:
            print(line)
        for run_id in report.live:
            print(f"{run_id}: still running; left alone")
        for line in report.failures:
            print(f"failed: {line}", file=sys.stderr)
        if not report.actions and not report.failures:
            print("nothing to clean up")
    if report.failures:
        raise CareenError(
            f"{len(report.failures)} resource(s) could not be released",
            hint="see the lines above; fix the cause and run cleanup again",
        )
    return ExitCode.OK


def _dispatch_run(args: argparse.Namespace) -> int:
    if args.verb == "inspect":
        disk = inspect_image(
            args.image.absolute(),
            workdir_parent=args.workdir,
            backend=Backend(args.backend),
            options=_appliance_options(args),
        )
        if args.format == "json":
            print(json.dumps(_jsonable(disk), indent=2))
        else:
            _print_disk(disk)
        return ExitCode.OK
    if args.verb == "refit" and ceph_command.wanted(args):
        return ceph_command.run_refit(args, _refit_options, _jsonable, _print_result)
    if args.verb == "refit" and glance_command.wanted(args):
        return glance_command.run_refit(args, _refit_options, _jsonable, _print_result)
    if args.verb == "refit":
        result = refit(_refit_options(args))
        if args.format == "json":
            print(json.dumps(_jsonable(result), indent=2))
        else:
            _print_result(result)
        return ExitCode.OK
    if args.verb == "publish":
        return glance_command.run_publish(args, _jsonable)
    if args.verb == "verify":
        verify_command.run_verify(args, _console())
        return ExitCode.OK
    raise UsageError(f"unknown verb {args.verb}", hint="see careen --help")


def _refit_options(args: argparse.Namespace) -> RefitOptions:
    if args.in_place and args.output:
        raise UsageError(
            "--in-place and -o exclude each other",
            hint="drop -o to change IMAGE itself, or drop --in-place to write a new image to -o",
        )
    return RefitOptions(
        source=args.image.absolute(),
        recipe=_recipe(args),
        output=args.output.absolute() if args.output else None,
        output_format=ImageFormat(args.output_format),
        compress=args.compress,
        in_place=args.in_place,
        force=args.force,
        workdir=args.workdir,
        backing_file=args.backing_file,
        data_file=args.data_file,
        command_timeout=args.timeout,
        backend=Backend(args.backend),
        appliance=_appliance_options(args),
        verify=partial(verify_command.verify_output, args, _console()) if args.verify else None,
    )


def _jsonable(obj: object) -> Any:
    if isinstance(obj, RefitResult):
        return {
            "source": _jsonable(obj.source),
            "output": str(obj.output) if obj.output else None,
            "os": _jsonable(obj.os),
            "changes": obj.changes.as_dict(),
            "notes": obj.notes,
            "mounts": obj.mounts,
        }
    data = asdict(obj)  # type: ignore[call-overload]
    return json.loads(json.dumps(data, default=str))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _print_disk(disk: Disk) -> None:
    out = _console()
    img = disk.image
    out.print(
        f"[bold]{img.path}[/]: {img.format}, virtual size {_size(img.virtual_size)}, "
        f"{_size(img.actual_size)} on disk"
    )
    if disk.table:
        t = Table(title=f"Partition table ({disk.table.label})", title_justify="left")
        for col in ("#", "start", "size", "type", "name"):
            t.add_column(col)
        for part in disk.table.partitions:
            t.add_row(
                str(part.number),
                str(part.region.offset),
                _size(part.region.size),
                part.type,
                part.name or "",
            )
        out.print(t)
    else:
        out.print("No partition table (a filesystem on the whole disk)")
    for vg in disk.volume_groups:
        pvs = ", ".join(
            next((fs.source for fs in disk.filesystems if fs.region == pv.region), pv.name)
            for pv in vg.pvs
        )
        title = f"LVM volume group {vg.name} (extent {_size(vg.extent_size)}, PVs: {pvs})"
        t = Table(title=title, title_justify="left")
        for col in ("LV", "size", "layout", "segments"):
            t.add_column(col)
        for lv in vg.lvs:
            size = sum(s.extent_count for s in lv.segments) * vg.extent_size
            segs = "" if lv.layout == "linear" else _segments(lv.segments)
            t.add_row(lv.name, _size(size), lv.layout, segs)
        out.print(t)
    t = Table(title="Filesystems", title_justify="left")
    for col in ("on", "type", "UUID", "label", "mounted at"):
        t.add_column(col)
    mounts = _mountpoints(disk)
    for fs in disk.filesystems:
        t.add_row(fs.source, fs.type, fs.uuid or "", fs.label or "", mounts.get(fs.source, ""))
    out.print(t)
    if disk.os:
        o = disk.os
        rows = [("OS", f"{o.pretty_name} ({o.distro} {o.version})")]
        if o.family == "windows":
            rows.append(("cloudbase-init", _cloudbase_init(o)))
        else:
            rows += [
                ("package manager", o.package_manager or "none found"),
                ("cloud-init", o.cloud_init or "not installed"),
                ("resolv.conf", o.resolv_conf),
                ("SELinux", o.selinux),
            ]
        rows.append(("root", disk.root.source if disk.root else "?"))
        t = Table(show_header=False, title="Guest", title_justify="left")
        for k, v in rows:
            t.add_row(k, v)
        out.print(t)
    for note in disk.notes:
        out.print(f"note: {note}")


def _cloudbase_init(o: OSInfo) -> str:
    if o.cloudbase_init is None:
        return "not installed"
    return f"{o.cloudbase_init} in {o.cloudbase_init_folder}"


def _segments(segments: Sequence[Segment]) -> str:
    return ", ".join(
        f"{s.type} ({len(s.stripes)} stripe(s), {s.extent_count} extents)" for s in segments
    )


def _mountpoints(disk: Disk) -> dict[str, str]:
    found: dict[str, str] = {}
    if disk.root:
        found[disk.root.source] = "/"
    if disk.os:
        for entry in disk.os.fstab:
            for fs in disk.filesystems:
                if entry.spec.lower() in {n.lower() for n in fs.names}:
                    found.setdefault(fs.source, entry.mountpoint)
    return found


def _print_result(result: RefitResult) -> None:
    out = _console()
    ch = result.changes
    t = Table(title="Packages", title_justify="left")
    for col in ("package", "before", "after"):
        t.add_column(col)
    for name, before, after in ch.upgraded:
        t.add_row(name, before, after)
    for name, version in ch.installed:
        t.add_row(name, "-", version)
    for name, version in ch.removed_packages:
        t.add_row(name, version, "-")
    out.print(t if t.row_count else "Packages: no change")
    for title, paths in (("Paths removed", ch.removed), ("Paths created", ch.created)):
        out.print(f"[bold]{title}[/] ({len(paths)})")
        for path in paths[:_LIST_LIMIT]:
            out.print(f"  {path}", markup=False, highlight=False)
        if len(paths) > _LIST_LIMIT:
            out.print(f"  ... and {len(paths) - _LIST_LIMIT} more (--format json lists all)")
    for note in result.notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"Wrote {result.output}" if result.output else "Changed the image in place")


if __name__ == "__main__":
    sys.exit(main())
