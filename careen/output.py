"""Write the refitted image: measured first, under a temporary name, synced, renamed.

Nothing half-written ever carries the output's name: qemu-img writes to a hidden
temporary file beside it, which is removed on any failure and renamed only after its
data and the directory entry are on disk. qemu-img skips zeroed ranges, so the result
is sparse (and compressed with `-c` for qcow2).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from careen import journal, run
from careen.errors import CareenError, UsageError
from careen.image.model import ImageFormat
from careen.log import step

_MARGIN = 64 << 20  # room for filesystem metadata and whatever else writes meanwhile


def partial_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.careen-partial")


def check_destination(dest: Path, source: Path, *, force: bool) -> None:
    """Refuse an output that would overwrite the source or an existing file."""
    if dest.exists() and dest.resolve() == source.resolve():
        raise UsageError(
            "the output is the source image", hint="name another output, or use --in-place"
        )
    if dest.is_dir():
        raise UsageError(f"the output {dest} is a directory", hint="name a file")
    if dest.exists() and not dest.is_file():
        # --force must never turn /dev/null or a FIFO into an image file.
        raise UsageError(
            f"the output {dest} exists and is not a regular file",
            hint="name a new file, or an existing image file with --force",
        )
    if dest.exists() and not force:
        raise UsageError(f"the output {dest} already exists", hint="remove it or add --force")
    if not dest.parent.is_dir():
        raise UsageError(
            f"the output's directory {dest.parent} does not exist",
            hint="create it first, or name another output",
        )
    if not os.access(dest.parent, os.W_OK):
        raise UsageError(
            f"cannot write to {dest.parent}", hint="name an output in a directory you can write to"
        )


def measure(image: Path, fmt: ImageFormat, out_fmt: ImageFormat) -> int:
    """Bytes the converted image needs, from `qemu-img measure`."""
    out = run.run(["qemu-img", "measure", "--output=json", "-f", fmt, "-O", out_fmt, image])
    return int(json.loads(out.stdout)["required"])


def check_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed + _MARGIN > free:
        raise CareenError(
            f"{directory} has {free >> 20} MiB free; {what} needs about {needed >> 20} MiB",
            hint="free some space, or write the output elsewhere",
        )


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_image(
    image: Path,
    fmt: ImageFormat,
    dest: Path,
    out_fmt: ImageFormat,
    *,
    compress: bool,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Convert `image` into `dest` atomically; `check` may refuse the written file first."""
    if compress and out_fmt is not ImageFormat.QCOW2:
        raise UsageError("only qcow2 output can be compressed", hint="drop -c or use qcow2")
    needed = measure(image, fmt, out_fmt)
    check_space(dest.parent, needed, f"the {out_fmt} output")
    tmp = partial_name(dest)
    argv: list[run.Arg] = ["qemu-img", "convert", "-f", fmt, "-O", out_fmt]
    if compress:
        argv.append("-c")
    handle = journal.record("file", path=str(tmp), what="partial output")
    try:
        with step(f"Writing {dest} ({out_fmt}{', compressed' if compress else ''})"):
            run.run([*argv, image, tmp])
            _fsync_path(tmp)
            if check is not None:
                check(tmp)  # raising here removes the temporary file: nothing is published
            journal.checkpoint("written")
            tmp.rename(dest)
            _fsync_path(dest.parent, directory=True)
        handle.done()
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        handle.done()
        if isinstance(e, run.CommandError) and "No space left" in e.stderr:
            raise CareenError(
                f"the disk holding {dest.parent} filled up while writing the output",
                hint="nothing was written under the output's name; free space and retry",
            ) from e
        raise
