"""Decide, once and safely, what an untrusted image file is.

`qemu-img info` parses attacker-controlled headers, so it runs under memory and CPU
limits and a deadline (as OpenStack Nova does). What it reports is then checked against
an allow-list: encrypted images, backing files, external data files and VMDK extents
outside the image are refused unless the user named them, because each makes qemu open
other files on the host (pitfalls 7 and 20). The format found here is the one passed
explicitly to qemu everywhere after; `blockdev_options()` builds those arguments.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from careen.errors import CareenError
from careen.image.model import ImageFormat, ImageInfo
from careen.run import CommandError, Limits, run

PROBE_LIMITS = Limits(address_space=1024 * 1024 * 1024, cpu_seconds=30)
PROBE_TIMEOUT = 120.0

# VMDK subformats whose data lives inside the one file qemu-img was given.
SINGLE_FILE_VMDK = frozenset({"monolithicSparse", "streamOptimized"})

_LOCKED = ('Failed to get shared "write" lock', "Is another process using the image")
# qemu marks each permission it holds on an image with an OFD lock on byte 100 + the
# permission's bit (file-posix.c); bit 1 is "write". `qemu-img info` on a raw image does
# not notice a writer, so that byte is asked about directly.
_QEMU_WRITE_LOCK_BYTE = 101
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux

FLATTEN_HINT = "or flatten it first: qemu-img convert -O qcow2 IMAGE FLAT.qcow2"

# One sector: a raw file smaller than this holds no partition table or filesystem, and
# sfdisk cannot even open it ("Invalid argument"). Other formats that small are headers
# cut short, which qemu-img itself reports.
MIN_IMAGE_SIZE = 512
NOT_AN_IMAGE_HINT = (
    f"check the path: careen needs a disk image ({', '.join(ImageFormat)}) that holds an "
    "installed system"
)


def _error(path: Path, problem: str, hint: str = "") -> CareenError:
    return CareenError(f"{path}: {problem}", hint)


# --- the file itself -------------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Refuse what is not a readable, non-empty regular file or block device."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _error(path, "no such file", "check the path") from None
    except PermissionError:
        raise _error(path, "permission denied", "run careen as a user who can read it") from None
    if stat.S_ISDIR(st.st_mode):
        raise _error(path, "is a directory, not a disk image", "name the image file inside it")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise _error(path, "is not a regular file or block device", "name a disk image file")
    try:
        with path.open("rb") as f:
            first = f.read(1)
    except OSError as e:
        raise _error(path, f"cannot be read: {e.strerror}", "check its permissions") from e
    if not first:
        raise _error(path, "is empty", "the download or copy may have failed; fetch it again")


def _check_raw_size(path: Path) -> None:
    """Refuse a raw file smaller than one sector (qemu-img rounds its size up to one)."""
    st = path.stat()
    if stat.S_ISREG(st.st_mode) and st.st_size < MIN_IMAGE_SIZE:
        raise _error(
            path,
            f"is only {st.st_size} bytes: too small to hold a partition table or a filesystem",
            NOT_AN_IMAGE_HINT,
        )


def _in_use_error(path: Path) -> CareenError:
    return _error(
        path,
        "is in use by a running VM (qemu holds a lock on it)",
        "stop the VM first, or work on a copy of the image",
    )


def _check_not_in_use(path: Path) -> None:
    """Refuse an image that a qemu process has open for writing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # _check_file reported what matters
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _QEMU_WRITE_LOCK_BYTE, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
    except OSError:
        return  # no OFD locks on this filesystem: qemu cannot lock it either
    finally:
        os.close(fd)
    if _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK:
        raise _in_use_error(path)


# --- qemu-img --------------------------------------------------------------------------


def _qemu_img(path: Path, argv: list[str]) -> tuple[int, str]:
    """Run a qemu-img subcommand under limits; return its exit status and stdout.

    Deliberately without --force-share: an image a running VM has open must fail to
    lock rather than be read while it changes underneath.
    """
    try:
        proc = run(["qemu-img", *argv], check=False, limits=PROBE_LIMITS, timeout=PROBE_TIMEOUT)
    except CommandError as e:
        if e.returncode == 127:
            raise
        raise _limit_error(path) from e
    if proc.returncode < 0:
        raise _limit_error(path)
    if any(marker in proc.stderr for marker in _LOCKED):
        raise _in_use_error(path)
    if proc.returncode != 0 and not proc.stdout.strip():
        raise _unreadable_error(path, proc.stderr)
    return proc.returncode, proc.stdout


def _limit_error(path: Path) -> CareenError:
    return _error(
        path,
        "qemu-img crashed or ran past its memory, CPU or time limit while reading it; "
        "the file looks malicious or corrupt",
        "do not use this image; fetch it again from a trusted source",
    )


def _unreadable_error(path: Path, stderr: str) -> CareenError:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    detail = lines[-1].removeprefix("qemu-img: ") if lines else "no reason given"
    return _error(
        path,
        f"qemu-img cannot read it: {detail}",
        "the file may be truncated or corrupt; check it with qemu-img check, or fetch it again",
    )


def _info(path: Path) -> dict[str, Any]:
    _, out = _qemu_img(path, ["info", "--output=json", str(path)])
    try:
        data = json.loads(out)
    except ValueError as e:
        raise _error(path, "qemu-img info printed something that is not JSON") from e
    if not isinstance(data, dict):
        raise _error(path, "qemu-img info printed an unexpected answer")
    return data


def _check_qcow2(path: Path) -> None:
    """Refuse a qcow2 whose metadata is corrupt or truncated (leaks alone are harmless)."""
    code, out = _qemu_img(path, ["check", "-f", "qcow2", "--output=json", str(path)])
    try:
        report = json.loads(out)
    except ValueError:
        report = {}
    corruptions = int(report.get("corruptions", 0))
    errors = int(report.get("check-errors", 0))
    # qemu-img check exits 2 for corruptions and 1 when it could not finish checking.
    if corruptions or errors or code in (1, 2):
        raise _error(
            path,
            f"qcow2 metadata is damaged ({corruptions} corruptions, {errors} check errors); "
            "the file may be truncated",
            "fetch the image again; `qemu-img check -r all` can repair a copy, at your risk",
        )


# --- what qemu-img reported ------------------------------------------------------------


def _format(path: Path, info: dict[str, Any]) -> ImageFormat:
    name = str(info.get("format", ""))
    if name == "luks" or info.get("encrypted"):
        raise _error(
            path, "is encrypted; encrypted images are not refitted", "decrypt a copy first"
        )
    try:
        return ImageFormat(name)
    except ValueError:
        allowed = ", ".join(f.value for f in ImageFormat)
        raise _error(
            path,
            f"has format {name or 'unknown'!r}, which careen does not accept",
            f"convert it to one of {allowed} with qemu-img convert",
        ) from None


def _specific(info: dict[str, Any]) -> dict[str, Any]:
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    return data if isinstance(data, dict) else {}


def _same_file(named: Path | None, reported: str, relative_to: Path) -> bool:
    """Whether qemu's file name (relative to the image's directory) is the named file."""
    if named is None:
        return False
    candidate = Path(reported)
    if not candidate.is_absolute():
        candidate = relative_to / candidate
    try:
        return os.path.samefile(candidate, named)
    except OSError:
        return False


def _check_backing(path: Path, info: dict[str, Any], backing_file: Path | None) -> None:
    reported = info.get("full-backing-filename") or info.get("backing-filename")
    if reported is None:
        if backing_file is not None:
            raise _error(path, "has no backing file, yet --backing-file was given")
        return
    if backing_file is not None and not backing_file.exists():
        raise _error(
            path,
            f"names a backing file ({reported}), and the --backing-file given "
            f"({backing_file}) does not exist",
            f"name the existing backing file {FLATTEN_HINT}",
        )
    if not _same_file(backing_file, str(reported), path.parent):
        raise _error(
            path,
            f"has a backing file ({reported}); qemu would read it from this host",
            f"if that file is meant, name it: --backing-file PATH; {FLATTEN_HINT}",
        )


def _check_data_file(path: Path, info: dict[str, Any], data_file: Path | None) -> None:
    reported = _specific(info).get("data-file")
    if reported is None:
        if data_file is not None:
            raise _error(path, "has no external data file, yet --data-file was given")
        return
    if not _same_file(data_file, str(reported), path.parent):
        raise _error(
            path,
            f"keeps its data in an external file ({reported}); qemu would read it from this host",
            f"if that file is meant, name it: --data-file PATH; {FLATTEN_HINT}",
        )


def _check_vmdk(path: Path, info: dict[str, Any]) -> None:
    """Refuse VMDKs whose descriptor points at other files (CVE-2024-32498)."""
    data = _specific(info)
    create_type = str(data.get("create-type", ""))
    hint = "convert it to a single file: qemu-img convert -O qcow2 IMAGE OUT.qcow2"
    if create_type not in SINGLE_FILE_VMDK:
        raise _error(path, f"is a {create_type or 'unknown'} VMDK, made of several files", hint)
    extents = data.get("extents")
    if not isinstance(extents, list) or not extents:
        raise _error(path, "is a VMDK whose extents qemu-img did not list", hint)
    for extent in extents:
        name = str(extent.get("filename", "")) if isinstance(extent, dict) else ""
        if not _same_file(path, name, path.parent):
            raise _error(path, f"is a VMDK naming another file as an extent ({name})", hint)


def _virtual_size(path: Path, info: dict[str, Any]) -> int:
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise _error(path, "has a virtual size of 0: there is no disk in it", "fetch it again")
    return size


# --- the probe -------------------------------------------------------------------------


def probe_image(
    path: Path,
    *,
    backing_file: Path | None = None,
    data_file: Path | None = None,
    expected_format: ImageFormat | None = None,
) -> ImageInfo:
    """Probe an untrusted image file once, refusing anything careen cannot safely open."""
    # Absolute, so that qemu never reads a "json:" or "proto:" prefix into the name.
    path = Path(os.path.abspath(path))
    _check_file(path)
    _check_not_in_use(path)
    info = _info(path)
    fmt = _format(path, info)
    if expected_format is not None and fmt != expected_format:
        raise _error(
            path,
            f"is recorded as {expected_format.value} but its content is {fmt.value}",
            "a raw disk whose first bytes look like another format must not be opened as "
            "that format; check where the image came from",
        )
    if fmt == ImageFormat.RAW:
        _check_raw_size(path)
    _check_backing(path, info, backing_file)
    _check_data_file(path, info, data_file)
    if fmt == ImageFormat.QCOW2:
        if _specific(info).get("encrypt") is not None:
            raise _error(path, "is an encrypted qcow2; encrypted images are not refitted")
        _check_qcow2(path)
    if fmt == ImageFormat.VMDK:
        _check_vmdk(path, info)
    return ImageInfo(
        path=path,
        format=fmt,
        virtual_size=_virtual_size(path, info),
        actual_size=int(info.get("actual-size", 0)),
        backing_file=Path(os.path.abspath(backing_file)) if backing_file else None,
        backing_format=_backing_format(path, info, backing_file),
        data_file=Path(os.path.abspath(data_file)) if data_file else None,
        cluster_size=info.get("cluster-size"),
    )


def _backing_format(
    path: Path, info: dict[str, Any], backing_file: Path | None
) -> ImageFormat | None:
    """Probe a named backing file in its own right; its header must agree with the probe."""
    if backing_file is None:
        return None
    declared = info.get("backing-filename-format")
    expected = ImageFormat(declared) if declared in set(ImageFormat) else None
    if declared is not None and expected is None:
        raise _error(path, f"declares its backing file as {declared!r}, which is not accepted")
    backing = probe_image(backing_file, expected_format=expected)
    return backing.format


# --- qemu arguments --------------------------------------------------------------------


def blockdev_options(
    info: ImageInfo, *, read_only: bool, node_name: str
) -> list[dict[str, object]]:
    """The `--blockdev` definitions that open a probed image, children first.

    The format is always explicit, and qcow2 never opens a backing file or data file from
    its header: only the ones the user named, each with the format probed for it.
    """
    nodes: list[dict[str, object]] = []
    backing: str | None = None
    if info.backing_file is not None and info.backing_format is not None:
        backing = f"{node_name}-backing"
        nodes += _format_nodes(info.backing_file, info.backing_format, backing, True, None)
    top = _format_nodes(info.path, info.format, node_name, read_only, backing)
    if info.data_file is not None:
        data_node = f"{node_name}-data"
        nodes.append(_file_node(info.data_file, data_node, read_only))
        top[-1]["data-file"] = data_node
    return nodes + top


def _file_node(path: Path, node: str, read_only: bool) -> dict[str, object]:
    driver = "host_device" if _is_block_device(path) else "file"
    return {"driver": driver, "node-name": node, "filename": str(path), "read-only": read_only}


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def _format_nodes(
    path: Path, fmt: ImageFormat, node: str, read_only: bool, backing: str | None
) -> list[dict[str, object]]:
    file_node = _file_node(path, f"{node}-file", read_only)
    top: dict[str, object] = {
        "driver": fmt.value,
        "node-name": node,
        "file": file_node["node-name"],
        "read-only": read_only,
    }
    if fmt == ImageFormat.QCOW2:
        top["backing"] = backing  # None stops qemu from following the header
    return [file_node, top]


def blockdev_args(options: list[dict[str, object]]) -> list[str]:
    """`--blockdev {...}` arguments (JSON form) for qemu-storage-daemon, in order."""
    args: list[str] = []
    for node in options:
        args += ["--blockdev", json.dumps(node, separators=(",", ":"))]
    return args
