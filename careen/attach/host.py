"""The host backend: the host kernel mounts the guest's filesystems.

Each filesystem gets a loop device over its byte range of the raw view (offset loops:
the kernel here creates no partition devices and has no device-mapper), the root is
found by looking, and then every filesystem the guest's fstab mounts locally is mounted
at its place, the target resolved inside the guest root so that a guest `/boot -> /etc`
symlink cannot put a mount on a host path. XFS is mounted with `nouuid`, so a host (or
a second copy) with the same UUID does not get in the way. Needs root.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from careen import journal, linux, run
from careen.attach import dm
from careen.cleanup import Resources
from careen.errors import CareenError
from careen.image.filesystems import parse_fstab
from careen.image.lvm import lv_region
from careen.image.model import Disk, Filesystem, FstabEntry, Region
from careen.interrupts import uninterrupted
from careen.log import step

log = logging.getLogger(__name__)

LINUX_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs")
_SKIP_TYPES = {"swap", "none", "proc", "sysfs", "tmpfs", "devpts", "nfs", "nfs4", "cifs", "bind"}
# Where an EFI system partition lives; if the host cannot mount it, boot-loader packages
# must not run, or grub/shim would write into the directory underneath.
ESP_MOUNTPOINTS = ("/boot/efi", "/efi")
_UMOUNT_NOFOLLOW = 0x8


@dataclass
class Mounted:
    guest_path: str
    host_path: str
    fs: Filesystem
    writable: bool


@dataclass
class GuestTree:
    """A guest's filesystems mounted under `root` on the host."""

    root: Path
    mounts: list[Mounted] = field(default_factory=list)
    devices: dict[Region | str, str] = field(default_factory=dict)  # device per filesystem
    fstab: tuple[FstabEntry, ...] = ()
    notes: list[str] = field(default_factory=list)
    esp_unmounted: bool = False

    def sync(self) -> None:
        """Flush every writable filesystem, failing if any write to the disk was lost.

        Writes to the guest land in the page cache first; when the disk behind them
        fails (the work directory's disk is full, the export died), the error shows only
        at writeback. Without this check such an image would be published half-written.
        """
        for m in reversed(self.mounts):
            if not m.writable:
                continue
            with linux.opened(os.open(m.host_path, os.O_RDONLY | os.O_DIRECTORY)) as fd:
                try:
                    linux.syncfs(fd)
                except OSError as e:
                    raise CareenError(
                        f"writing the guest's {m.guest_path} ({m.fs.source}) failed: {e.strerror}",
                        hint="the disk behind the overlay may be full, or the export died; "
                        "nothing was written",
                    ) from e

    def trim(self) -> None:
        """Discard free space on every writable filesystem, so the output stays small."""
        for m in reversed(self.mounts):
            if m.writable:
                run.run(["fstrim", m.host_path], check=False)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise CareenError(
            f"{what} with the host backend needs root",
            hint="run it as root (sudo), or use --backend appliance",
        )


def region_of(disk: Disk, fs: Filesystem) -> Region:
    """Where `fs` lies in the raw view; refuses what only device-mapper could assemble."""
    if fs.region is not None:
        return fs.region
    if fs.lv is not None:
        for vg in disk.volume_groups:
            if vg.name == fs.lv.vg:
                return lv_region(vg, fs.lv)  # raises with the reason
    raise CareenError(f"{fs.source} does not lie in one contiguous range of the disk")


def _mount_options(fs: Filesystem, subvol: str | None = None) -> str:
    opts = []
    if fs.type == "xfs":
        opts.append("nouuid")
    if fs.type == "btrfs" and subvol:
        opts.append(f"subvol={subvol}")
    return ",".join(opts)


@dataclass(frozen=True)
class Root:
    """The guest's root filesystem, and the btrfs subvolume holding it, if any."""

    fs: Filesystem
    subvol: str | None = None


@uninterrupted  # no Ctrl-C between the mount and the registration of its release
def _mount_fs(
    res: Resources,
    raw: Path,
    disk: Disk,
    fs: Filesystem,
    target_fd: int,
    *,
    writable: bool,
    options: str,
    what: str,
    devices: dict[Region | str, str] | None = None,
) -> str:
    """Mount `fs` on the directory behind `target_fd`; returns the mount's host path.

    A filesystem mounted a second time (btrfs subvolumes, say) reuses the loop device of
    the first mount, which holds it: two loop devices over the same bytes would be two
    caches of one filesystem, and writes through one would be lost.
    """
    host_path = os.readlink(linux.fd_path(target_fd))
    key: Region | str = fs.region or (fs.lv.uuid if fs.lv else fs.source)
    handle = journal.record("mount", path=host_path, backing=str(raw), source=fs.source)
    try:
        if devices is not None and key in devices:
            dev = devices[key]
            handle.note(device=dev)
            _mount_device(dev, target_fd, fs, writable, options, what)
        elif fs.region is None and fs.lv is not None and dm.dm_available():
            dev = _assemble_lv(res, raw, disk, fs)
            handle.note(device=dev)
            _mount_device(dev, target_fd, fs, writable, options, what)
        else:
            region = region_of(disk, fs)
            handle.note(offset=region.offset)
            with linux.loop_device(raw, region.offset, region.size, read_only=False) as dev:
                handle.note(device=dev)
                _mount_device(dev, target_fd, fs, writable, options, what)
        if devices is not None:
            devices[key] = dev
    except BaseException:
        handle.done()  # nothing is mounted, and the unmounted loop device cleared itself
        raise

    def release() -> None:
        unmount(host_path)
        handle.done()

    res.release(f"mount {host_path}", release)
    return host_path


def _assemble_lv(res: Resources, raw: Path, disk: Disk, fs: Filesystem) -> str:
    """Assemble a non-linear LV with device-mapper, under a name unique to this run."""
    assert fs.lv is not None
    vg = next(vg for vg in disk.volume_groups if vg.name == fs.lv.vg)
    run_id = journal.current_run_id() or secrets.token_hex(4)
    name = dm.dm_name(run_id, vg.name, fs.lv.name)
    handle = journal.record("dm", name=name)
    device = res.enter_context(dm.lv_device(raw, vg, fs.lv, run_id, read_only=False))
    res.callback(handle.done)  # runs after the device is removed (the stack unwinds LIFO)
    return device


def unreadable(fs: Filesystem) -> bool:
    """An LV whose contents this host cannot read (striped, thin...: no device-mapper)."""
    return fs.lv is not None and fs.region is None and not dm.dm_available()


def check_reachable(disk: Disk, fs: Filesystem) -> None:
    """Refuse early a filesystem this host cannot assemble."""
    if fs.region is None and fs.lv is not None and dm.dm_available():
        vg = next(vg for vg in disk.volume_groups if vg.name == fs.lv.vg)
        dm.check_lv(vg, fs.lv)
    else:
        region_of(disk, fs)


def _mount_device(
    dev: str, target_fd: int, fs: Filesystem, writable: bool, options: str, what: str
) -> None:
    flags = linux.MS_NODEV | (0 if writable else linux.MS_RDONLY)
    try:
        linux.mount(dev, linux.fd_path(target_fd), fs.type, flags, options)
    except OSError as e:
        raise CareenError(
            f"the host kernel cannot mount the {fs.type} filesystem on {fs.source} "
            f"({what}): {e.strerror}",
            hint="its features may be too new or too old for this kernel (see dmesg); "
            "use --backend appliance",
        ) from e


def unmount(path: str) -> None:
    """Unmount, ending any process that still uses the tree; retry a little.

    If the filesystem is still busy after that, the holder is careen itself (a descriptor
    kept alive by an exception's frames): the mount is detached lazily and goes when the
    descriptor does, at the latest with careen's private mount namespace.
    """
    for attempt in range(5):
        try:
            linux.umount(path, _UMOUNT_NOFOLLOW)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            kill_processes_under(path)
            time.sleep(0.2 * (attempt + 1))
    log.warning("%s is still busy; detaching it lazily", path)
    linux.umount(path, _UMOUNT_NOFOLLOW | linux.MNT_DETACH)


def kill_processes_under(path: str) -> list[int]:
    """SIGKILL every process whose root or working directory lies under `path`."""
    killed = []
    prefix = path.rstrip("/") + "/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(f"/proc/{entry}/{link}")
            except OSError:
                continue
            if target == path or target.startswith(prefix):
                log.warning("ending process %s, which still uses %s", entry, path)
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    killed.append(int(entry))
                except ProcessLookupError:
                    pass
                break
    return killed


def _candidates(disk: Disk) -> list[Filesystem]:
    """Filesystems that could be the root, most likely first."""
    found = [fs for fs in disk.filesystems if fs.type in LINUX_FILESYSTEMS or unreadable(fs)]

    def rank(fs: Filesystem) -> tuple[int, int]:
        named_root = fs.lv is not None and fs.lv.name in ("root", "lv_root", "rootlv")
        size = fs.region.size if fs.region else 0
        return (0 if named_root else 1, -size)

    return sorted(found, key=rank)


def _looks_like_root(root_fd: int) -> bool:
    for path in ("etc/fstab", "etc/os-release", "usr/lib/os-release"):
        try:
            os.close(linux.open_in_root(root_fd, path, os.O_PATH))
            return True
        except OSError:
            continue
    return False


def _root_subvolume(top_fd: int) -> str | None:
    """The top-level directory of a btrfs that holds the root (Fedora's `root`, `@`)."""
    with linux.opened(os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top_fd)) as fd:
        names = sorted(os.listdir(fd))[:64]
    for name in ("@", "root", "@rootfs", *names):
        try:
            sub = linux.open_in_root(top_fd, name, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        with linux.opened(sub):
            if _looks_like_root(sub):
                return name
    return None


def _probe_root(raw: Path, disk: Disk, fs: Filesystem, probe_dir: Path) -> Root | None:
    with Resources() as res, linux.opened(os.open(probe_dir, os.O_PATH)) as fd:
        _mount_fs(
            res,
            raw,
            disk,
            fs,
            fd,
            writable=False,
            options=_mount_options(fs),
            what="looking for the root",
        )
        with linux.opened(os.open(probe_dir, os.O_PATH | os.O_DIRECTORY)) as top:
            if _looks_like_root(top):
                found: Root | None = Root(fs)
            else:
                subvol = _root_subvolume(top) if fs.type == "btrfs" else None
                found = Root(fs, subvol) if subvol else None
    return found


def find_root(raw: Path, disk: Disk, probe_dir: Path) -> Root:
    """Mount each candidate read-only until one holds a Linux root (etc/fstab)."""
    refusals: list[str] = []
    probe_dir.mkdir(exist_ok=True)
    for fs in _candidates(disk):
        try:
            check_reachable(disk, fs)
        except CareenError as e:
            refusals.append(e.message)
            continue
        root = _probe_root(raw, disk, fs, probe_dir)
        if root is not None:
            return root
    if refusals:
        raise CareenError(
            "no mountable Linux root found: " + "; ".join(refusals), hint="use --backend appliance"
        )
    encrypted = [fs.source for fs in disk.filesystems if fs.type == "crypto_LUKS"]
    if encrypted:
        raise CareenError(
            f"{disk.image.path} holds LUKS-encrypted volumes ({', '.join(encrypted)})",
            hint="careen does not open encrypted images; use the image from before encryption",
        )
    kinds = ", ".join(sorted({fs.type for fs in disk.filesystems})) or "none"
    if any(fs.type == "ntfs" for fs in disk.filesystems):
        raise CareenError(
            f"{disk.image.path} holds NTFS (a Windows disk?) and no Linux root",
            hint="Windows images need --backend appliance (or auto)",
        )
    raise CareenError(
        f"no Linux root filesystem found in {disk.image.path} (filesystems: {kinds})",
        hint="the host backend opens only Linux system disks; check that this is one "
        "(a Windows disk needs --backend appliance)",
    )


def _match(entry: FstabEntry, disk: Disk) -> Filesystem | None:
    spec = entry.spec.lower()
    for fs in disk.filesystems:
        if spec in {n.lower() for n in fs.names}:
            return fs
    return None


def _needs_mount(entry: FstabEntry) -> bool:
    return (
        entry.mountpoint.startswith("/")
        and entry.mountpoint != "/"
        and entry.type not in _SKIP_TYPES
        and "noauto" not in entry.options
        and "bind" not in entry.options
    )


@contextmanager
def mount_tree(
    raw: Path, disk: Disk, root_fs: Root, workdir: Path, *, writable: bool
) -> Iterator[GuestTree]:
    """Mount the root at WORKDIR/root and then what the guest's fstab mounts."""
    root = workdir / "root"
    root.mkdir(exist_ok=True)
    fs = root_fs.fs
    with Resources() as res:
        title = f"Mounting the root ({fs.type} on {fs.source})"
        if root_fs.subvol:
            title += f", subvolume {root_fs.subvol}"
        tree = GuestTree(root=root)
        with step(title), linux.opened(os.open(root, os.O_PATH | os.O_DIRECTORY)) as fd:
            host = _mount_fs(
                res,
                raw,
                disk,
                fs,
                fd,
                writable=writable,
                options=_mount_options(fs, root_fs.subvol),
                what="/",
                devices=tree.devices,
            )
        tree.mounts.append(Mounted("/", host, fs, writable))
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        res.callback(os.close, root_fd)
        tree.fstab = _read_fstab(root_fd)
        entries = sorted(filter(_needs_mount, tree.fstab), key=lambda e: e.mountpoint.count("/"))
        for entry in entries:
            _mount_entry(res, raw, disk, tree, root_fd, entry, writable=writable)
        yield tree


def _read_fstab(root_fd: int) -> tuple[FstabEntry, ...]:
    try:
        fd = linux.open_in_root(root_fd, "/etc/fstab", os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return ()
    with linux.opened(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CareenError("the guest's /etc/fstab is not a regular file")
        return parse_fstab(os.read(fd, 1 << 20).decode(errors="replace"))


def _mount_entry(
    res: Resources,
    raw: Path,
    disk: Disk,
    tree: GuestTree,
    root_fd: int,
    entry: FstabEntry,
    *,
    writable: bool,
) -> None:
    fs = _match(entry, disk)
    where = f"{entry.mountpoint} ({entry.spec})"
    if fs is None:
        tree.notes.append(f"fstab mounts {where}, which is not on this disk; left unmounted")
        log.warning("%s", tree.notes[-1])
        return
    if fs.type not in linux.filesystems_supported():
        if entry.mountpoint in ESP_MOUNTPOINTS:
            tree.esp_unmounted = True
            tree.notes.append(
                f"this kernel cannot mount {fs.type} ({where}): boot-loader "
                "packages are held back for this run"
            )
            log.warning("%s", tree.notes[-1])
            return
        raise CareenError(
            f"this kernel cannot mount {fs.type}, which the guest needs at {where}",
            hint="use --backend appliance",
        )
    try:
        target = linux.open_in_root(root_fd, entry.mountpoint, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        tree.notes.append(f"cannot mount {where}: the mount point: {e.strerror}")
        log.warning("%s", tree.notes[-1])
        return
    with step(f"Mounting {entry.mountpoint} ({fs.type} on {fs.source})"), linux.opened(target):
        host = _mount_fs(
            res,
            raw,
            disk,
            fs,
            target,
            writable=writable,
            options=_mount_options(fs, entry.subvolume),
            what=entry.mountpoint,
            devices=tree.devices,
        )
    tree.mounts.append(Mounted(entry.mountpoint, host, fs, writable))
