"""The appliance backend: libguestfs's small VM mounts and edits the guest.

The host kernel never sees the guest's filesystems: no root, no loop devices, no
device-mapper and no mounts on the host. One appliance is launched per image; the disk
is added with its format given explicitly (never probed), libguestfs's inspection finds
the root and everything it mounts (LVM of any layout, /boot, an EFI partition), and
`ApplianceGuest` implements the `Guest` interface with libguestfs calls. guestfsd
resolves every path inside the guest's root, so a guest symlink cannot reach the
host. Programs run inside the guest root through libguestfs's `command`.

The appliance's qemu is journaled as a daemon with its PID, so `careen cleanup` can
stop one that a killed run left behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shlex
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from careen import accel, journal, limits
from careen.cleanup import Resources
from careen.errors import CareenError
from careen.guest import sandbox
from careen.image import ntfs
from careen.image.filesystems import parse_fstab
from careen.image.model import (
    Disk,
    Filesystem,
    FstabEntry,
    ImageFormat,
    ImageInfo,
    Partition,
    PartitionTable,
)
from careen.image.model import Region as DiskRegion
from careen.log import step
from careen.run import CommandError

log = logging.getLogger(__name__)

# The resolver that slirp, libguestfs's user-mode network, answers on. libguestfs
# configures the appliance itself; this is only the fallback when it cannot be read.
SLIRP_RESOLVER = b"nameserver 169.254.2.3\n"
# One libguestfs message holds at most 4 MiB; bigger files go through a host temp file.
_INLINE_LIMIT = 2 << 20
_STAT_BATCH = 2000
_STATUS_MARK = "\x1ecareen-exit-status:"
# Runs the command with stderr kept apart, then prints the status and the stderr's tail
# after a marker: libguestfs's `command` returns only stdout, and no exit status.
_WRAPPER = (
    'e=$(mktemp 2>/dev/null || echo /tmp/.careen-stderr-$$); "$@" 2>"$e"; s=$?; '
    f'printf \'\\n{_STATUS_MARK}%d\\n\' "$s"; tail -c 65536 "$e"; rm -f "$e"'
)
ESP_MOUNTPOINTS = ("/boot/efi", "/efi")


def _import_guestfs() -> Any:
    try:
        import guestfs
    except ImportError as e:
        raise CareenError(
            "the appliance backend needs libguestfs's Python binding (guestfs)",
            hint="apt-get install python3-guestfs libguestfs-tools, and use a Python that "
            "sees Debian's packages (scripts/setup does both); or use --backend host",
        ) from e
    return guestfs


_KNOWN_ERRNOS = (
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.ENOTEMPTY,
    errno.ELOOP,
    errno.EINVAL,
    errno.ENOSPC,
    errno.EROFS,
)


def _errno(e: RuntimeError) -> int:
    # The Python binding raises a bare RuntimeError and has no last_errno(); guestfsd's
    # messages end with strerror(), which names the errno.
    text = str(e)
    for code in _KNOWN_ERRNOS:
        if os.strerror(code) in text:
            return code
    return errno.EIO


def _os_error(e: RuntimeError, path: str) -> OSError:
    code = _errno(e)
    cls = {
        errno.ENOENT: FileNotFoundError,
        errno.ENOTDIR: NotADirectoryError,
        errno.EISDIR: IsADirectoryError,
        errno.EEXIST: FileExistsError,
        errno.EACCES: PermissionError,
    }.get(code, OSError)
    return cls(code, str(e), path)


def stat_result(st: Mapping[str, int]) -> os.stat_result:
    """An `os.stat_result` from libguestfs's `statns` fields."""
    times = [st[f"st_{w}time_sec"] + st[f"st_{w}time_nsec"] / 1e9 for w in ("a", "m", "c")]
    nanos = [st[f"st_{w}time_sec"] * 10**9 + st[f"st_{w}time_nsec"] for w in ("a", "m", "c")]
    return os.stat_result(
        (
            st["st_mode"],
            st["st_ino"],
            st["st_dev"],
            st["st_nlink"],
            st["st_uid"],
            st["st_gid"],
            st["st_size"],
            st["st_atime_sec"],
            st["st_mtime_sec"],
            st["st_ctime_sec"],
            *times,
            *nanos,
            st["st_blksize"],
            st["st_blocks"],
            st["st_rdev"],
        )
    )


def _guest_path(path: str) -> str:
    return str(PurePosixPath("/" + path.lstrip("/")))


def _split(path: str) -> tuple[str, str]:
    p = PurePosixPath(_guest_path(path))
    if p.name in ("", ".", ".."):
        raise CareenError(f"{path!r} does not name a file in the guest")
    return str(p.parent), p.name


class ApplianceGuest:
    """A guest mounted inside a launched libguestfs appliance (`g`)."""

    def __init__(self, g: Any, *, case_insensitive: bool = False) -> None:
        self.g = g
        self.case_insensitive = case_insensitive

    def _path(self, path: str) -> str:
        """The guest path; on Windows, spelt the way the filesystem spells it."""
        path = _guest_path(path)
        if self.case_insensitive:
            with contextlib.suppress(RuntimeError):
                resolved: str = self.g.case_sensitive_path(path)
                return resolved
        return path

    def _call(self, path: str, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.g, fn)(*args)
        except RuntimeError as e:
            raise _os_error(e, path) from e

    def read_bytes(self, path: str, limit: int = 16 << 20) -> bytes:
        path = self._path(path)
        st = self._call(path, "statns", path)
        if not stat.S_ISREG(st["st_mode"]):
            raise CareenError(f"the guest's {path} is not a regular file; refusing to read it")
        if st["st_size"] > limit:
            raise CareenError(f"the guest's {path} is larger than {limit} bytes")
        if st["st_size"] <= _INLINE_LIMIT:
            data: bytes = self._call(path, "read_file", path)
            return data
        with tempfile.TemporaryDirectory(prefix="careen-") as tmp:
            local = Path(tmp) / "file"
            self._call(path, "download", path, str(local))
            return local.read_bytes()

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a regular file; a symlink or special file in its place is replaced."""
        parent, name = _split(self._path(path))
        tmp = f"{parent.rstrip('/')}/.{name}.careen-tmp-{secrets.token_hex(4)}"
        try:
            if len(data) <= _INLINE_LIMIT:
                self._call(tmp, "write", tmp, data)
            else:
                with tempfile.NamedTemporaryFile(prefix="careen-") as local:
                    local.write(data)
                    local.flush()
                    self._call(tmp, "upload", local.name, tmp)
            self._call(tmp, "chmod", mode, tmp)
            # rename(2) replaces a link in the last component instead of writing through it.
            self._call(path, "rename", tmp, self._path(path))
        except BaseException:
            with contextlib.suppress(RuntimeError):
                self.g.rm_f(tmp)
            raise

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return stat_result(self._call(path, "lstatns", self._path(path)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def readlink(self, path: str) -> str:
        target: str = self._call(path, "readlink", self._path(path))
        return target

    def symlink(self, target: str, path: str) -> None:
        self._call(path, "ln_s", target, self._path(path))

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._call(path, "lchown", uid, gid, self._path(path))

    def delete(self, path: str) -> bool:
        """Remove a file, link or whole directory tree; False when it was not there."""
        _split(path)
        st = self.lstat(path)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            self._call(path, "rm_rf", self._path(path))  # rm -rf never follows links
        else:
            self._call(path, "rm", self._path(path))
        return True

    def listdir(self, path: str) -> list[str]:
        names: list[str] = self._call(path, "ls", self._path(path))
        return names

    def walk(self, path: str = "/") -> Iterator[tuple[str, str]]:
        """Yield (guest path, kind) for everything under `path`, not crossing symlinks.

        One `find0` lists the tree and `lstatnslist` types it in batches: a call per file
        would cost a round trip to the appliance each.
        """
        base = self._path(path)
        st = self.lstat(base)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return
        with tempfile.TemporaryDirectory(prefix="careen-") as tmp:
            listing = Path(tmp) / "find0"
            self._call(base, "find0", base, str(listing))
            names = listing.read_bytes().decode(errors="surrogateescape").split("\0")
        # lstatnslist takes plain names in one directory: one call per directory, in
        # batches, instead of one call per file.
        by_dir: dict[str, list[str]] = {}
        for rel in names:
            if rel:
                parent, _, name = rel.rpartition("/")
                by_dir.setdefault(parent, []).append(name)
        top = PurePosixPath(base)
        for parent, children in by_dir.items():
            directory = str(top / parent) if parent else base
            for i in range(0, len(children), _STAT_BATCH):
                batch = children[i : i + _STAT_BATCH]
                stats = self._call(directory, "lstatnslist", directory, batch)
                for name, st in zip(batch, stats, strict=True):
                    mode = st["st_mode"]
                    kind = "l" if stat.S_ISLNK(mode) else "d" if stat.S_ISDIR(mode) else "f"
                    yield str(PurePosixPath(directory) / name), kind

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a guest program inside the guest root, in the appliance."""
        assignments = [f"{k}={v}" for k, v in sandbox.guest_env(env).items()]
        inner = ["env", "-i", *assignments, *argv]
        if timeout is not None:
            # libguestfs has no per-call deadline; the guest's coreutils provide one.
            inner = ["timeout", "-k", "10", str(max(1, int(timeout))), *inner]
        full = ["/bin/sh", "-c", _WRAPPER, "careen", *inner]
        log.debug("+ (appliance) %s", shlex.join(argv))
        try:
            out: str = self.g.command(full)
        except RuntimeError as e:
            raise CommandError(list(argv), 127, str(e)) from e
        stdout, sep, rest = out.rpartition(_STATUS_MARK)
        if not sep:
            raise CommandError(list(argv), 127, out)
        status_text, _, stderr = rest.partition("\n")
        status = int(status_text) if status_text.strip().isdigit() else 127
        stdout = stdout.removesuffix("\n")
        returncode: int | None = status
        if timeout is not None and status in (124, 137):
            returncode = None
        if check and status != 0:
            raise CommandError(list(argv), returncode, stderr, stdout)
        return subprocess.CompletedProcess(list(argv), status, stdout, stderr)


@dataclass
class ApplianceMount:
    guest_path: str
    device: str
    source: str  # careen's name: "partition 1", "LV centos/root"
    type: str


@dataclass
class Appliance:
    """A launched appliance with the guest mounted: what `attach()` yields."""

    g: Any
    guest: ApplianceGuest
    disk: Disk
    mounts: list[ApplianceMount] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    esp_unmounted: bool = False
    resolver: bytes = SLIRP_RESOLVER
    trimmed: bool = False
    root_device: str = ""
    os_type: str = "linux"  # libguestfs's inspection: linux, windows...

    def sync(self) -> None:
        try:
            self.g.sync()
        except RuntimeError as e:
            raise CareenError(
                f"writing the guest's filesystems failed: {e}",
                hint="the disk behind the overlay may be full; nothing was written",
            ) from e

    def trim(self) -> None:
        self.trimmed = True
        for m in reversed(self.mounts):
            try:
                self.g.fstrim(m.guest_path)
            except RuntimeError as e:
                log.debug("fstrim %s: %s", m.guest_path, e)


def source_name(device: str) -> str:
    """careen's name for an appliance device: "partition 1", "LV vg/lv", "whole disk"."""
    if device.startswith("/dev/mapper/") or device.count("/") == 3:
        parts = device.removeprefix("/dev/").split("/")
        if len(parts) == 2 and parts[0] != "mapper":
            return f"LV {parts[0]}/{parts[1]}"
    tail = device.removeprefix("/dev/")
    digits = len(tail) - len(tail.rstrip("0123456789"))
    if digits and tail[:-digits].startswith(("sd", "vd")):
        return f"partition {tail[-digits:]}"
    return "whole disk" if tail in ("sda", "vda") else device


def launch(
    image: Path,
    fmt: ImageFormat,
    *,
    writable: bool,
    network: bool,
    accelerator: accel.Accel,
    smp: int | None = None,
    memsize: int | None = None,
) -> Any:
    """Create and launch a libguestfs handle with `image` as its one disk."""
    guestfs = _import_guestfs()
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")  # libvirt would need a system daemon and its permissions
    g.set_backend_settings(accel.guestfs_settings(accelerator))
    if smp:
        g.set_smp(smp)
    if memsize:
        g.set_memsize(memsize)
    if network:
        try:
            g.set_network(True)
        except RuntimeError as e:
            g.close()
            raise no_network(str(e)) from e
    g.add_drive_opts(str(image), format=fmt.value, readonly=not writable)
    return g


def no_network(why: str) -> CareenError:
    return CareenError(
        f"the recipe installs or upgrades packages, but the appliance has no network ({why})",
        hint="use --backend host, or point the guest's package sources at a local "
        "repository; nothing was changed",
    )


def _check_network(g: Any) -> None:
    """Fail before anything changes when the appliance's network is down."""
    try:
        out = g.debug("sh", ["ip -4 -o addr show scope global"])
    except RuntimeError as e:
        # Builds without the debug call: trust set_network().
        log.debug("cannot check the appliance's network: %s", e)
        return
    if "inet " not in out:
        raise no_network("no IPv4 address inside the appliance")


def _resolver(g: Any) -> bytes:
    try:
        data = g.debug("sh", ["cat /etc/resolv.conf"]).encode()
    except RuntimeError:
        return SLIRP_RESOLVER
    return data if b"nameserver" in data else SLIRP_RESOLVER


def _disk(g: Any, info: ImageInfo, root_dev: str) -> Disk:
    """What the appliance sees: partitions and filesystems (LVM flattened into them)."""
    table = None
    with contextlib.suppress(RuntimeError):
        device = g.list_devices()[0]
        label = g.part_get_parttype(device)
        parts = tuple(
            Partition(
                int(p["part_num"]),
                DiskRegion(int(p["part_start"]), int(p["part_size"])),
                type=f"{g.part_get_mbr_id(device, p['part_num']):x}"
                if label == "msdos"
                else g.part_get_gpt_type(device, p["part_num"]).lower(),
            )
            for p in g.part_list(device)
        )
        table = PartitionTable("dos" if label == "msdos" else label, None, parts)
    found: list[Filesystem] = []
    root: Filesystem | None = None
    for dev, fstype in sorted(g.list_filesystems().items()):
        if dev.startswith("/dev/mapper/") and fstype == "unknown":
            continue  # device-mapper's own pieces: thin pools and their data and metadata
        uuid = label_ = None
        with contextlib.suppress(RuntimeError):
            uuid = g.vfs_uuid(dev) or None
            label_ = g.vfs_label(dev) or None
        fs = Filesystem(source_name(dev), fstype, None, uuid, label_)
        found.append(fs)
        if dev == root_dev:
            root = fs
    return Disk(info, table, (), tuple(found), root)


@contextmanager
def attach(
    info: ImageInfo,
    image: Path,
    fmt: ImageFormat,
    *,
    writable: bool,
    network: bool = False,
    accelerator: accel.Accel = accel.Accel.TCG,
    smp: int | None = None,
    memsize: int | None = None,
    force_ntfs: bool = False,
) -> Iterator[Appliance]:
    """Launch one appliance over `image`, mount the guest as inspection finds it.

    On exit (success or not) free space is trimmed and everything synced when writable,
    then the filesystems are unmounted and the appliance shut down, which is what makes
    its writes to `image` final.
    """
    g = launch(
        image,
        fmt,
        writable=writable,
        network=network,
        accelerator=accelerator,
        smp=smp,
        memsize=memsize,
    )
    handle = journal.record("daemon", argv0="qemu (libguestfs appliance)", image=str(image))
    with Resources() as res:
        res.release("the libguestfs handle", g.close)
        res.enter_context(limits.slot("appliances"))  # a fleet's limit, when it sets one
        with step(f"Launching the libguestfs appliance ({accelerator.upper()})"):
            try:
                g.launch()
            except RuntimeError as e:
                handle.done()
                raise CareenError(
                    f"the libguestfs appliance did not start: {e}",
                    hint="run libguestfs-test-tool to see why; or use --backend host",
                ) from e
        pid = g.get_pid()
        handle.note(pid=pid, start_time=journal.process_start_time(pid))

        def shut_down() -> None:
            g.shutdown()  # waits for qemu to flush and exit
            handle.done()

        res.release("the libguestfs appliance", shut_down)
        if network:
            _check_network(g)
        app = _mount(g, info, writable=writable, force_ntfs=force_ntfs)
        if network:
            app.resolver = _resolver(g)

        def unmount() -> None:
            if writable:
                if not app.trimmed:
                    app.trim()
                app.sync()
            g.umount_all()

        res.release("the appliance's mounts", unmount)
        yield app


def _mount(g: Any, info: ImageInfo, *, writable: bool, force_ntfs: bool) -> Appliance:
    with step("Finding the guest's filesystems (libguestfs inspection)"):
        roots = g.inspect_os()
    if not roots:
        kinds = ", ".join(sorted(set(g.list_filesystems().values()))) or "none"
        raise CareenError(
            f"no operating system found in {info.path} (filesystems: {kinds})",
            hint="check that this is a system disk",
        )
    if len(roots) > 1:
        raise CareenError(f"{info.path} holds {len(roots)} operating systems: {', '.join(roots)}")
    root_dev = roots[0]
    os_type = g.inspect_get_type(root_dev)
    guest = ApplianceGuest(g, case_insensitive=os_type == "windows")
    app = Appliance(g, guest, _disk(g, info, root_dev), root_device=root_dev, os_type=os_type)
    points = g.inspect_get_mountpoints(root_dev)
    fstypes = g.list_filesystems()
    # Parents before children: "/" first, then "/boot", then "/boot/efi".
    for guest_path, device in sorted(points.items(), key=lambda kv: kv[0].count("/") + len(kv[0])):
        fstype = fstypes.get(device, "unknown")
        options = ""
        if fstype == "ntfs":
            options = _check_ntfs(g, device, guest_path, app, writable=writable, force=force_ntfs)
        with step(f"Mounting {guest_path} ({fstype} on {source_name(device)}) in the appliance"):
            try:
                if writable:
                    g.mount_options(options, device, guest_path)
                else:
                    g.mount_ro(device, guest_path)
            except RuntimeError as e:
                if guest_path == "/":
                    raise CareenError(
                        f"the appliance cannot mount the guest's root {device}: {e}"
                    ) from e
                app.notes.append(f"could not mount {guest_path} ({device}): {e}")
                log.warning("%s", app.notes[-1])
                app.esp_unmounted |= guest_path in ESP_MOUNTPOINTS
                continue
        app.mounts.append(ApplianceMount(guest_path, device, source_name(device), fstype))
    return app


def _check_ntfs(
    g: Any, device: str, guest_path: str, app: Appliance, *, writable: bool, force: bool
) -> str:
    """Refuse to write to an NTFS that Windows left dirty or hibernated; mount options.

    Windows keeps part of such a volume's state in memory or in hiberfil.sys: writing to
    it from outside and booting Windows again can corrupt it. Forced, ntfs-3g is told to
    remove the hibernation file (the hibernated session is lost).
    """
    where = f"the NTFS on {source_name(device)}"
    try:
        state = ntfs.volume_state(lambda offset, size: g.pread_device(device, size, offset))
    except RuntimeError as e:
        raise CareenError(f"cannot read {where}: {e}") from e
    g.mount_ro(device, guest_path)
    try:
        hibernated = ntfs.hibernated(_hiberfil_header(g, guest_path))
    finally:
        g.umount(guest_path)
    problems = []
    if state.dirty:
        problems.append("Windows did not close it cleanly (the volume is marked dirty)")
    if hibernated:
        problems.append("Windows is hibernated on it (hiberfil.sys says so; fast startup too)")
    if not problems:
        return ""
    what = f"{where}: {'; and '.join(problems)}"
    if not writable:
        app.notes.append(what)
        return ""
    if not force:
        raise CareenError(
            f"refusing to write to {what}",
            hint="boot the image and shut Windows down fully (`shutdown /s /t 0`, with fast "
            "startup off), or add --force-ntfs to write anyway (a hibernated session is "
            "discarded); nothing was changed",
        )
    app.notes.append(f"written although {what} (--force-ntfs)")
    log.warning("%s", app.notes[-1])
    return "remove_hiberfile" if hibernated else ""


def _hiberfil_header(g: Any, guest_path: str) -> bytes:
    path = f"{guest_path.rstrip('/')}/hiberfil.sys"
    try:
        path = g.case_sensitive_path(path)
        header: bytes = g.pread(path, 8, 0)
    except RuntimeError:
        return b""  # no hibernation file
    return header


def read_fstab(guest: ApplianceGuest) -> tuple[FstabEntry, ...]:
    try:
        return parse_fstab(guest.read_bytes("/etc/fstab").decode(errors="replace"))
    except FileNotFoundError:
        return ()
