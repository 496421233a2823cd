"""A Glance image as the source of a refit: find it, check it, stream it to a work file.

Everything that can refuse the image is checked before a byte is downloaded: it must be
active, in a disk and container format careen reads, not encrypted, small enough for
the work directory, and of a visibility the caller could give the new image. The data
is written sparse (zero blocks are skipped) and hashed as it streams; Glance's
`disk_format` is the authority, and the downloaded file is probed against it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careen import journal
from careen.errors import CareenError, UsageError
from careen.glance.cloud import Cloud, GlanceError, stream
from careen.glance.metadata import is_encrypted
from careen.image.model import ImageFormat

log = logging.getLogger(__name__)

PREFIX = "glance:"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# Glance's disk_format names for the formats careen reads (qemu calls vhd "vpc").
FORMATS = {
    "raw": ImageFormat.RAW,
    "qcow2": ImageFormat.QCOW2,
    "vmdk": ImageFormat.VMDK,
    "vdi": ImageFormat.VDI,
    "vhdx": ImageFormat.VHDX,
    "vhd": ImageFormat.VPC,
}
CHUNK = 1 << 20
_BLOCK = 64 << 10  # granularity of the holes left for zero data
_ZERO = bytes(_BLOCK)
_MARGIN = 64 << 20

Progress = Callable[[int], None]  # bytes done so far


def is_ref(text: str) -> bool:
    return text.startswith(PREFIX)


def ref_value(text: str) -> str:
    return text[len(PREFIX) :]


@dataclass(frozen=True)
class SourceImage:
    image: dict[str, Any]  # as the API shows it

    @property
    def id(self) -> str:
        return str(self.image["id"])

    @property
    def name(self) -> str:
        return str(self.image.get("name") or "")

    @property
    def size(self) -> int:
        return int(self.image.get("size") or 0)

    @property
    def format(self) -> ImageFormat:
        return FORMATS[str(self.image.get("disk_format"))]

    def label(self) -> str:
        return f"{self.id} ({self.name})" if self.name else self.id


def find_image(cloud: Cloud, ref: str) -> SourceImage:
    """The image named by an ID, or by a name that exactly one image (hidden included) has."""
    if not ref:
        raise UsageError("glance: needs an image ID or name", hint="write glance:ID or glance:NAME")
    if _UUID.fullmatch(ref):
        try:
            return SourceImage(cloud.get_json(f"/images/{ref}", what=f"show image {ref}"))
        except GlanceError as e:
            if e.status != 404:
                raise
            raise CareenError(
                f"Glance has no image {ref} that your project can see",
                hint="check the ID with `openstack image show`, and the cloud with --os-cloud",
            ) from None
    found: dict[str, dict[str, Any]] = {}
    for hidden in ("false", "true"):
        listing = cloud.get_json(
            "/images", what=f"list images named {ref!r}", params={"name": ref, "os_hidden": hidden}
        )
        found.update({str(i["id"]): i for i in listing.get("images", [])})
    if not found:
        raise CareenError(
            f"Glance has no image named {ref!r} that your project can see (hidden ones included)",
            hint="check the name with `openstack image list --include-hidden`, or give the ID",
        )
    if len(found) > 1:
        ids = ", ".join(sorted(found))
        raise CareenError(
            f"{len(found)} images are named {ref!r}: {ids}",
            hint="name the one you mean by its ID: glance:ID",
        )
    return SourceImage(next(iter(found.values())))


def check_refittable(src: SourceImage, *, may_publicize: bool) -> None:
    """Refuse, before any download, an image careen cannot refit or republish."""
    img = src.image
    status = img.get("status")
    if status != "active":
        raise CareenError(
            f"image {src.label()} is {status}, not active: there is no data to refit",
            hint="reactivate it (openstack image set --activate) or wait until it is active",
        )
    fmt = img.get("disk_format")
    if fmt not in FORMATS:
        raise CareenError(
            f"image {src.label()} has disk_format {fmt!r}, which careen cannot refit",
            hint=f"careen reads {', '.join(FORMATS)}",
        )
    if not src.size:
        raise CareenError(
            f"image {src.label()} has no size: it holds no data (a volume-backed snapshot?)",
            hint="refit the volume's image instead",
        )
    check_template(src, may_publicize=may_publicize)


def check_template(src: SourceImage, *, may_publicize: bool) -> None:
    """Refuse an image whose metadata a new image of refitted data cannot take."""
    img = src.image
    if is_encrypted(img):
        raise CareenError(
            f"image {src.label()} is encrypted (cinder_encryption_key_*); careen does not "
            "refit encrypted images",
            hint="decrypt a copy first",
        )
    container = img.get("container_format")
    if container not in ("bare", None):
        raise CareenError(
            f"image {src.label()} has container_format {container!r}; careen refits bare disks",
            hint="unpack the disk and upload it as a bare image first",
        )
    if img.get("visibility") == "public" and not may_publicize:
        raise CareenError(
            f"image {src.label()} is public, and your user may not publish public images",
            hint="refit it as an admin (the publicize_image policy), or ask one",
        )


def check_space(directory: Path, src: SourceImage) -> None:
    # The download, the overlay and the output all land there.
    needed = 2 * src.size + _MARGIN
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise CareenError(
            f"{directory} has {free >> 20} MiB free; image {src.label()} "
            f"({src.size >> 20} MiB) needs about {needed >> 20} MiB there",
            hint="use --workdir on a disk with more free space",
        )


def _hashers(img: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    algo, value = img.get("os_hash_algo"), img.get("os_hash_value")
    if algo and value:
        try:
            out[str(algo)] = (hashlib.new(str(algo)), str(value))
        except ValueError:
            log.warning("Glance's hash algorithm %s is unknown here; not checked", algo)
    if img.get("checksum"):
        out["md5"] = (hashlib.md5(usedforsecurity=False), str(img["checksum"]))
    return out


def download(cloud: Cloud, src: SourceImage, dest: Path, progress: Progress | None = None) -> None:
    """Stream the image's data into `dest` (sparse), checking Glance's hashes on the way."""
    hashers = _hashers(src.image)
    if not hashers:
        log.warning(
            "image %s has no checksum or os_hash_value: its data cannot be checked", src.label()
        )
    response = cloud.request(
        "GET", f"/images/{src.id}/file", what=f"download image {src.id}", stream=True
    )
    done = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for chunk in stream(response, CHUNK):
            for h, _ in hashers.values():
                h.update(chunk)
            _write_sparse(fd, chunk, done)
            if not done:
                journal.checkpoint("glance-download")
            done += len(chunk)
            if progress:
                progress(done)
        os.ftruncate(fd, done)
        os.fsync(fd)
    finally:
        os.close(fd)
        response.close()
    if done != src.size:
        raise CareenError(
            f"image {src.label()}: downloaded {done} bytes, Glance says {src.size}",
            hint="the transfer was cut short; try again",
        )
    for algo, (h, expected) in hashers.items():
        if h.hexdigest() != expected:
            raise CareenError(
                f"image {src.label()}: the data Glance served does not match its {algo} "
                f"({h.hexdigest()[:16]}... instead of {expected[:16]}...)",
                hint="the stored data is damaged or was changed behind Glance's back; "
                "restore it from a backup",
            )


def _write_sparse(fd: int, chunk: bytes, offset: int) -> None:
    view = memoryview(chunk)
    for start in range(0, len(view), _BLOCK):
        piece = view[start : start + _BLOCK]
        if piece == _ZERO[: len(piece)]:
            continue  # a hole; ftruncate at the end gives the file its full size
        os.pwrite(fd, piece, offset + start)
