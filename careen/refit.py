"""The main pipelines: inspect an image, and refit it into a new one.

    probe_image -> overlay -> raw_view -> scan_disk -> find_root -> mount_tree
      -> detect OS -> snapshot -> apply recipe -> snapshot -> trim -> unmount
      -> write_image (measured, temporary name, synced, renamed)

The source is opened read-only under a copy-on-write overlay; only `in_place` writes
to it. Every resource is released in reverse order on success, error or Ctrl-C.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

from careen import journal, locks
from careen.attach import export, host
from careen.cleanup import Resources
from careen.errors import CareenError
from careen.guest import changes, ops, osinfo, pkg, session
from careen.guest.base import RootGuest, read_text
from careen.image import filesystems, probe
from careen.image.model import Disk, ImageFormat, ImageInfo, OSInfo
from careen.log import step
from careen.output import check_destination, check_space, write_image
from careen.recipe import Op, Recipe

log = logging.getLogger(__name__)

_NEARLY_FULL = 32 << 20


@dataclass(frozen=True)
class RefitOptions:
    source: Path
    recipe: Recipe
    output: Path | None = None
    output_format: ImageFormat = ImageFormat.QCOW2
    compress: bool = False
    in_place: bool = False
    force: bool = False
    workdir: Path | None = None
    backing_file: Path | None = None
    data_file: Path | None = None
    command_timeout: float | None = 3600.0


@dataclass
class RefitResult:
    source: ImageInfo
    output: Path | None
    os: OSInfo
    changes: changes.Changes
    notes: list[str] = field(default_factory=list)
    mounts: list[dict[str, str]] = field(default_factory=list)  # what was mounted where


@contextmanager
def workdir(parent: Path | None) -> Iterator[Path]:
    """A private directory for the overlay and mount points, removed afterwards."""
    base = parent or Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix="careen-", dir=base))
    handle = journal.record("dir", path=str(path), what="work directory")
    try:
        yield path
    finally:
        for leftover in ("root", "probe"):
            with suppress(FileNotFoundError):
                (path / leftover).rmdir()
        path.rmdir()
        handle.done()


@dataclass
class Attached:
    disk: Disk
    tree: host.GuestTree
    guest: RootGuest


@contextmanager
def attach(
    info: ImageInfo, image: Path, fmt: ImageFormat, work: Path, *, writable: bool
) -> Iterator[Attached]:
    """Mount the guest held in `image` (the overlay, or the source when in place)."""
    with Resources() as res:
        raw = res.enter_context(export.raw_view(image, fmt, work, writable=True))
        with step("Probing partitions, LVM and filesystems"):
            table, vgs, fss = filesystems.scan_disk(raw, info)
            disk = Disk(info, table, vgs, fss)
            root_fs = host.find_root(raw, disk, work / "probe")
        tree = res.enter_context(host.mount_tree(raw, disk, root_fs, work, writable=writable))
        journal.checkpoint("mounted")
        guest = RootGuest(tree.root, hostname=_hostname(tree.root))
        res.callback(guest.close)
        facts = osinfo.detect(guest, tree.fstab)
        disk = Disk(info, table, vgs, fss, root_fs.fs, facts, tuple(tree.notes))
        yield Attached(disk, tree, guest)


def _hostname(root: Path) -> str:
    guest = RootGuest(root)
    try:
        name = (read_text(guest, "/etc/hostname") or "").strip()
    except (OSError, CareenError):
        name = ""
    finally:
        guest.close()
    return name if name and len(name) < 64 and name.isprintable() else "localhost"


def inspect_image(source: Path, *, workdir_parent: Path | None = None) -> Disk:
    """Everything careen can tell about an image, without changing it."""
    info = probe.probe_image(source)
    host.require_root("inspect")
    with Resources() as res:
        work = res.enter_context(workdir(workdir_parent))
        ovl = res.enter_context(export.overlay(info, work / "overlay.qcow2"))
        att = res.enter_context(attach(info, ovl, ImageFormat.QCOW2, work, writable=False))
        disk = att.disk
    return disk


def _check_recipe(recipe: Recipe, facts: OSInfo) -> None:
    """Refuse before changing anything what the guest cannot do."""
    if any(s.op.needs_package_manager for s in recipe.all_steps):
        pkg.get(facts.package_manager)  # raises with a hint
    ops.check_package_names(recipe.all_steps)


def refit(opts: RefitOptions) -> RefitResult:
    if not opts.in_place and opts.output is None:
        raise CareenError("refit needs an output (-o FILE), or --in-place")
    info = probe.probe_image(opts.source, backing_file=opts.backing_file, data_file=opts.data_file)
    if opts.output is not None:
        check_destination(opts.output, opts.source, force=opts.force)
    host.require_root("refit")
    if opts.in_place:
        log.warning("--in-place: %s itself is changed; there is no undo", opts.source)
    with Resources() as outer:
        outer.enter_context(locks.hold_for_refit(opts.source, opts.output))
        work = outer.enter_context(workdir(opts.workdir or _default_workdir(opts)))
        check_space(work, min(info.virtual_size // 4, 2 << 30), "the overlay")
        if opts.in_place:
            image, fmt = info.path, info.format
        else:
            image = outer.enter_context(export.overlay(info, work / "overlay.qcow2"))
            fmt = ImageFormat.QCOW2
        try:
            with attach(info, image, fmt, work, writable=True) as att:
                result = _change_guest(opts, info, att)
                att.tree.sync()
                with step("Trimming free space"):
                    att.tree.trim()
                att.tree.sync()
        except (CareenError, OSError) as e:
            _explain_full_disk(work, e)
            raise
        if opts.output is not None and not opts.in_place:
            write_image(image, fmt, opts.output, opts.output_format, compress=opts.compress)
    return result


def _explain_full_disk(work: Path, error: BaseException) -> None:
    """Say so when a failure came from the work directory's disk filling up."""
    free = shutil.disk_usage(work).free
    if free < _NEARLY_FULL:
        raise CareenError(
            f"the disk holding the work directory {work.parent} filled up during the run "
            f"({free >> 20} MiB left; the overlay holds every change): {error}",
            hint="nothing was written; use --workdir on a disk with more free space",
        ) from error


def _default_workdir(opts: RefitOptions) -> Path:
    # Beside the output: the overlay grows with the changes, and that disk must have
    # room for the output anyway.
    return opts.output.resolve().parent if opts.output else Path(tempfile.gettempdir())


def _change_guest(opts: RefitOptions, info: ImageInfo, att: Attached) -> RefitResult:
    facts = att.disk.os
    assert facts is not None
    log.info("Guest: %s, package manager %s", facts.pretty_name, facts.package_manager or "none")
    _check_recipe(opts.recipe, facts)
    ctx = ops.Context(att.guest, facts, timeout=opts.command_timeout)
    before = changes.snapshot(att.guest, _installed(ctx))
    debian = facts.package_manager == "apt"
    with session.prepared(att.guest, debian), _boot_loader_held(ctx, att.tree.esp_unmounted):
        ops.apply_steps(ctx, opts.recipe.all_steps)
    after = changes.snapshot(att.guest, _installed(ctx))
    notes = [*att.tree.notes, *ctx.notes]
    mounts = [
        {"guest": m.guest_path, "source": m.fs.source, "type": m.fs.type} for m in att.tree.mounts
    ]
    return RefitResult(info, opts.output, facts, changes.diff(before, after), notes, mounts)


def _installed(ctx: ops.Context) -> dict[str, str]:
    if ctx.os.package_manager is None:
        return {}
    return ctx.packages.installed(ctx.guest)


@contextmanager
def _boot_loader_held(ctx: ops.Context, esp_unmounted: bool) -> Iterator[None]:
    touches_packages = ctx.os.package_manager is not None
    if not esp_unmounted or not touches_packages:
        with nullcontext():
            yield
        return
    held = ctx.packages.hold(ctx.guest, pkg.BOOT_LOADER_PATTERNS)
    ctx.notes.append(
        "boot-loader packages held back (EFI partition not mounted): "
        + (", ".join(held) or "none installed")
    )
    try:
        yield
    finally:
        ctx.packages.unhold(ctx.guest, held)


__all__ = ["Op", "RefitOptions", "RefitResult", "inspect_image", "refit"]
