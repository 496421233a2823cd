"""The main pipelines: inspect an image, and refit it into a new one.

    probe_image -> choose backend -> overlay -> attach (host: raw_view -> scan_disk
      -> find_root -> mount_tree; appliance: launch -> inspect -> mount)
      -> detect OS -> snapshot -> apply recipe -> snapshot -> trim -> unmount
      -> write_image (measured, temporary name, synced, renamed)

Both backends yield an `Attached`: a `Guest` plus what was mounted, so the recipe runs
the same way on either. `--backend auto` takes the host backend when it can do the job
(root, and every Linux filesystem reachable without device-mapper where the host has
none) and the appliance otherwise, and logs why.

The source is opened read-only under a copy-on-write overlay; only `in_place` writes
to it. Every resource is released in reverse order on success, error or Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from careen import journal, locks
from careen.accel import Accel, resolve
from careen.attach import appliance, export, host
from careen.cleanup import Resources
from careen.errors import CareenError, UsageError
from careen.guest import changes, ops, osinfo, pkg, selinux, session, windows
from careen.guest.base import Guest, RootGuest, read_text
from careen.image import filesystems, probe
from careen.image.model import Disk, ImageFormat, ImageInfo, OSInfo
from careen.interrupts import critical
from careen.log import step
from careen.output import check_destination, check_space, write_image
from careen.recipe import Op, Recipe

log = logging.getLogger(__name__)

_NEARLY_FULL = 32 << 20


class Backend(StrEnum):
    AUTO = "auto"
    HOST = "host"
    APPLIANCE = "appliance"


@dataclass(frozen=True)
class ApplianceOptions:
    accel: Accel = Accel.AUTO
    smp: int | None = None
    memsize: int | None = None  # MiB
    force_ntfs: bool = False  # write to an NTFS that Windows left dirty or hibernated


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
    backend: Backend = Backend.AUTO
    appliance: ApplianceOptions = field(default_factory=ApplianceOptions)
    # Checks the written output before it is published (boot verification); returns a
    # note for the result, raises to refuse the output.
    verify: Callable[[Path], str] | None = None
    # The source is careen's own copy (a new RBD image): in place is the plan, not a risk.
    scratch: bool = False


@dataclass
class RefitResult:
    source: ImageInfo
    output: Path | None
    os: OSInfo
    changes: changes.Changes
    notes: list[str] = field(default_factory=list)
    mounts: list[dict[str, str]] = field(default_factory=list)  # what was mounted where


@contextmanager
def workdir(
    parent: Path | None,
    *,
    prefix: str = "careen-",
    what: str = "work directory",
    clear: bool = False,
) -> Iterator[Path]:
    """A private directory for the overlay and mount points, removed afterwards.

    Only empty mount points may be left in it unless `clear`: anything else means a
    mount is still there, and must not be deleted through.
    """
    base = parent or Path(tempfile.gettempdir())
    with critical():  # journaled before Ctrl-C can strike
        try:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        except OSError as e:
            raise CareenError(
                f"cannot make a work directory in {base}: {e.strerror}",
                hint="give --workdir an existing directory you can write to",
            ) from e
        handle = journal.record("dir", path=str(path), what=what)
    try:
        yield path
    finally:
        if clear:
            shutil.rmtree(path)  # on failure it stays journaled, for `careen cleanup`
        else:
            for leftover in ("root", "probe"):
                with suppress(FileNotFoundError):
                    (path / leftover).rmdir()
            path.rmdir()
        handle.done()


@dataclass
class Attached:
    """A mounted guest, from either backend."""

    disk: Disk
    guest: Guest
    mounts: list[dict[str, str]]  # guest path, source, type
    notes: list[str]
    esp_unmounted: bool
    sync: Callable[[], None]
    trim: Callable[[], None]
    resolver: bytes | None = None  # for the run; None means the host's


def choose_backend(
    requested: Backend, *, is_root: bool, host_refusal: Callable[[], str | None]
) -> tuple[Backend, str]:
    """The backend to use and why; `host_refusal` says what the host could not mount."""
    if requested is not Backend.AUTO:
        return requested, "asked for"
    if not is_root:
        return Backend.APPLIANCE, "not running as root, which the host backend needs"
    refusal = host_refusal()
    if refusal:
        return Backend.APPLIANCE, f"the host cannot mount this image: {refusal}"
    return Backend.HOST, "running as root, and nothing in the image needs the appliance"


def scan_source(info: ImageInfo, parent: Path | None) -> Disk:
    """The source's partitions, volume groups and filesystems, read through a read-only view.

    Refuses a disk in which nothing is recognised, before any overlay or appliance.
    """
    with Resources() as res:
        work = res.enter_context(workdir(parent))
        raw = res.enter_context(export.raw_view(info.path, info.format, work, writable=False))
        with step("Scanning the image's partitions and filesystems"):
            table, vgs, fss = filesystems.scan_disk(raw, info)
    filesystems.check_found(info, table, fss)
    return Disk(info, table, vgs, fss)


def host_refusal(disk: Disk) -> str | None:
    """Why the host backend could not mount the image's Linux filesystems, if it could not."""
    fss = disk.filesystems
    if not any(fs.type in host.LINUX_FILESYSTEMS for fs in fss) and any(
        fs.type == "ntfs" for fs in fss
    ):
        return "it holds NTFS (Windows), which only the appliance mounts"
    refusals = []
    for fs in fss:
        if fs.type not in host.LINUX_FILESYSTEMS and not host.unreadable(fs):
            continue
        try:
            host.check_reachable(disk, fs)
        except CareenError as e:
            refusals.append(e.message)
    return "; ".join(refusals) or None


def select_backend(
    requested: Backend,
    info: ImageInfo,
    what: str,
    parent: Path | None,
    *,
    scanned: Disk | None = None,
) -> Backend:
    """Choose the backend (logged with the reason); `scanned` saves scanning the source again."""

    def refusal() -> str | None:
        return host_refusal(scanned if scanned is not None else scan_source(info, parent))

    backend, why = choose_backend(requested, is_root=os.geteuid() == 0, host_refusal=refusal)
    log.info("Backend: %s (%s)", backend, why)
    if backend is Backend.HOST:
        host.require_root(what)
    return backend


def force_ntfs_unused(backend: Backend, disk: Disk, *, writable: bool) -> str | None:
    """Why --force-ntfs cannot matter for this run, if it cannot."""
    if not writable:
        return "--force-ntfs has no effect: nothing is written"
    reasons = []
    if not any(fs.type == "ntfs" for fs in disk.filesystems):
        reasons.append(f"{disk.image.path} holds no NTFS filesystem")
    if backend is Backend.HOST:
        reasons.append("the host backend never writes NTFS (it applies only to the appliance)")
    return f"--force-ntfs has no effect: {'; and '.join(reasons)}" if reasons else None


@contextmanager
def attach_guest(
    backend: Backend,
    info: ImageInfo,
    image: Path,
    fmt: ImageFormat,
    work: Path,
    *,
    writable: bool,
    options: ApplianceOptions,
    network: bool = False,
) -> Iterator[Attached]:
    if backend is Backend.HOST:
        with attach(info, image, fmt, work, writable=writable) as att:
            _warn_force_ntfs(options, backend, att.disk, writable=writable)
            yield att
        return
    with appliance.attach(
        info,
        image,
        fmt,
        writable=writable,
        network=network,
        accelerator=resolve(options.accel),
        smp=options.smp,
        memsize=options.memsize,
        force_ntfs=options.force_ntfs,
    ) as app:
        journal.checkpoint("mounted")
        if app.os_type == "windows":
            facts = windows.detect(app.guest, app.root_device)
        else:
            facts = osinfo.detect(app.guest, appliance.read_fstab(app.guest))
        disk = replace(app.disk, os=facts, notes=tuple(app.notes))
        _warn_force_ntfs(options, backend, disk, writable=writable)
        mounts = [{"guest": m.guest_path, "source": m.source, "type": m.type} for m in app.mounts]
        resolver = app.resolver if network else None
        yield Attached(
            disk, app.guest, mounts, app.notes, app.esp_unmounted, app.sync, app.trim, resolver
        )


def _warn_force_ntfs(
    options: ApplianceOptions, backend: Backend, disk: Disk, *, writable: bool
) -> None:
    if options.force_ntfs and (why := force_ntfs_unused(backend, disk, writable=writable)):
        log.warning("%s", why)


@contextmanager
def attach(
    info: ImageInfo, image: Path, fmt: ImageFormat, work: Path, *, writable: bool
) -> Iterator[Attached]:
    """Mount the guest held in `image` (the overlay, or the source when in place)."""
    with Resources() as res:
        raw = res.enter_context(export.raw_view(image, fmt, work, writable=True))
        with step("Probing partitions, LVM and filesystems"):
            table, vgs, fss = filesystems.scan_disk(raw, info)
            filesystems.check_found(info, table, fss)
            disk = Disk(info, table, vgs, fss)
            root_fs = host.find_root(raw, disk, work / "probe")
        tree = res.enter_context(host.mount_tree(raw, disk, root_fs, work, writable=writable))
        journal.checkpoint("mounted")
        guest = RootGuest(tree.root, hostname=_hostname(tree.root))
        res.callback(guest.close)
        facts = osinfo.detect(guest, tree.fstab)
        disk = Disk(info, table, vgs, fss, root_fs.fs, facts, tuple(tree.notes))
        mounts = [
            {"guest": m.guest_path, "source": m.fs.source, "type": m.fs.type} for m in tree.mounts
        ]
        yield Attached(disk, guest, mounts, tree.notes, tree.esp_unmounted, tree.sync, tree.trim)


def _hostname(root: Path) -> str:
    guest = RootGuest(root)
    try:
        name = (read_text(guest, "/etc/hostname") or "").strip()
    except (OSError, CareenError):
        name = ""
    finally:
        guest.close()
    return name if name and len(name) < 64 and name.isprintable() else "localhost"


def inspect_image(
    source: Path,
    *,
    workdir_parent: Path | None = None,
    backend: Backend = Backend.AUTO,
    options: ApplianceOptions | None = None,
) -> Disk:
    """Everything careen can tell about an image, without changing it."""
    info = probe.probe_image(source)
    backend = select_backend(backend, info, "inspect", workdir_parent)
    with Resources() as res:
        work = res.enter_context(workdir(workdir_parent))
        ovl = res.enter_context(export.overlay(info, work / "overlay.qcow2"))
        att = res.enter_context(
            attach_guest(
                backend,
                info,
                ovl,
                ImageFormat.QCOW2,
                work,
                writable=False,
                options=options or ApplianceOptions(),
            )
        )
        disk = att.disk
    return disk


def _check_recipe(recipe: Recipe, facts: OSInfo) -> None:
    """Refuse before changing anything what the guest cannot do."""
    windows.check_recipe(facts, recipe.all_steps)
    if any(s.op.needs_package_manager for s in recipe.all_steps):
        pkg.get(facts.package_manager)  # raises with a hint
    ops.check_package_names(recipe.all_steps)


def refit(opts: RefitOptions) -> RefitResult:
    if not opts.in_place and opts.output is None:
        raise UsageError(
            "refit needs an output",
            hint="add -o FILE for a new image, or --in-place to change this one",
        )
    if opts.in_place and opts.verify is not None:
        raise UsageError(
            "--verify needs -o: an in-place refit changes the image before it could be verified",
            hint="refit into a new image with -o and --verify, or run careen verify afterwards",
        )
    info = probe.probe_image(opts.source, backing_file=opts.backing_file, data_file=opts.data_file)
    if opts.output is not None:
        check_destination(opts.output, opts.source, force=opts.force)
    backend = select_backend(opts.backend, info, "refit", opts.workdir or _default_workdir(opts))
    if opts.in_place and not opts.scratch:
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
            with attach_guest(
                backend,
                info,
                image,
                fmt,
                work,
                writable=True,
                options=opts.appliance,
                network=_needs_network(opts.recipe),
            ) as att:
                result = _change_guest(opts, info, att)
                att.sync()
                with step("Trimming free space"):
                    att.trim()
                att.sync()
        except (CareenError, OSError) as e:
            _explain_full_disk(work, e)
            raise
        if opts.output is not None and not opts.in_place:
            check = _output_check(opts.verify, result)
            write_image(
                image, fmt, opts.output, opts.output_format, compress=opts.compress, check=check
            )
    return result


def _output_check(
    verify: Callable[[Path], str] | None, result: RefitResult
) -> Callable[[Path], None] | None:
    """Verify the written output before it is renamed into place; its note joins the result."""
    if verify is None:
        return None
    return lambda path: result.notes.append(verify(path))


def _needs_network(recipe: Recipe) -> bool:
    # Removing packages and cleaning caches work offline; fetching them does not.
    return any(s.op in (Op.UPDATE, Op.INSTALL) for s in recipe.all_steps)


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
    linux = facts.family == "linux"
    prepared = session.prepared(att.guest, debian, att.resolver) if linux else nullcontext()
    with prepared, _boot_loader_held(ctx, att.esp_unmounted):
        ops.apply_steps(ctx, opts.recipe.all_steps)
    if opts.recipe.all_steps and (note := selinux.relabel(att.guest, facts, ctx.timeout)):
        ctx.notes.append(note)
    after = changes.snapshot(att.guest, _installed(ctx))
    notes = [*att.notes, *ctx.notes]
    return RefitResult(info, opts.output, facts, changes.diff(before, after), notes, att.mounts)


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


__all__ = [
    "ApplianceOptions",
    "Backend",
    "Op",
    "RefitOptions",
    "RefitResult",
    "inspect_image",
    "refit",
]
