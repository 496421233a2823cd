"""The on-disk cache of sample roots and images, keyed by the recipe that made them.

Layout of `${CAREEN_CACHE:-~/.cache/careen}/samples/`:

    root-<key>/                 the used guest root (a directory, read-only by convention)
    selinux-root-<key>/         its SELinux variant (policy installed, files labelled)
    <layout>-<key>.raw|qcow2    one image per layout
    .lock                       held (flock) while anything is built

Keys digest the build recipe, so a changed recipe builds afresh next to old entries.
Everything is built under a temporary name and renamed into place when complete, so a
cache entry that exists is whole; a warm lookup is a stat and no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from careen.errors import CareenError
from careen.log import step
from careen.samples import root as guest_root
from careen.samples.build import Layout, convert_qcow2, layout_recipe, make_image

log = logging.getLogger(__name__)

# Raise whenever the builder changes what it makes in a way the recipes do not show.
BUILD_VERSION = 1
_TMP = ".tmp-"


def cache_dir(cache: Path | None = None) -> Path:
    """The samples directory inside `cache`, or inside $CAREEN_CACHE / ~/.cache/careen."""
    if cache is None:
        base = os.environ.get("CAREEN_CACHE") or Path.home() / ".cache/careen"
        cache = Path(base)
    return cache / "samples"


def _digest(recipe: dict[str, object]) -> str:
    text = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def root_key() -> str:
    return _digest({"build_version": BUILD_VERSION, **guest_root.recipe()})


def selinux_root_key() -> str:
    return _digest(
        {"build_version": BUILD_VERSION, "base": root_key(), **guest_root.selinux_recipe()}
    )


def image_key(layout: Layout) -> str:
    root = selinux_root_key() if layout.selinux else root_key()
    return _digest({"root": root, **layout_recipe(layout)})


def root_path(cache: Path | None = None) -> Path:
    return cache_dir(cache) / f"root-{root_key()}"


def selinux_root_path(cache: Path | None = None) -> Path:
    return cache_dir(cache) / f"selinux-root-{selinux_root_key()}"


def image_path(layout: Layout, cache: Path | None = None) -> Path:
    return cache_dir(cache) / f"{layout}-{image_key(layout)}.{layout.suffix}"


def sample_root(cache: Path | None = None) -> Path:
    """The used guest root directory, built if missing. Do not change it; copy it."""
    path = root_path(cache)
    if not path.is_dir():
        with _build_lock(cache_dir(cache)):
            _ensure_root(path)
    return path


def sample_image(layout: Layout, cache: Path | None = None) -> Path:
    """The cached sample image in `layout`, built if missing. Copy it before changing it."""
    path = image_path(layout, cache)
    if not path.is_file():
        with _build_lock(cache_dir(cache)):
            _ensure_image(layout, cache)
    return path


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold the cache's build lock, so parallel test processes build each entry once."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_leftovers(directory)
        yield


def _remove_leftovers(directory: Path) -> None:
    """Drop half-built entries from builds that died; nobody else builds while we lock."""
    for leftover in directory.glob(f"*{_TMP}*"):
        _discard(leftover)


def _discard(path: Path) -> None:
    """Remove an unfinished entry, unless something is still mounted inside it."""
    if _has_mounts(path):
        # A killed mmdebstrap may leave its bind mounts of /dev or /proc behind; deleting
        # through them would delete the host's files.
        log.warning("leaving %s alone: something is still mounted in it", path)
        return
    log.debug("removing the unfinished %s", path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _has_mounts(path: Path) -> bool:
    prefix = os.fspath(path.resolve())
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    return any(p == prefix or p.startswith(prefix + "/") for p in points)


def _ensure_root(path: Path) -> None:
    _ensure_dir(path, guest_root.build_root)


def _ensure_selinux_root(cache: Path | None) -> Path:
    base, path = root_path(cache), selinux_root_path(cache)
    _ensure_root(base)
    _ensure_dir(path, lambda tmp, _work: guest_root.build_selinux_root(base, tmp))
    return path


def _ensure_dir(path: Path, build: Callable[[Path, Path], None]) -> None:
    """Build a root directory with `build(tmp, work)` under a temporary name, then rename."""
    if path.is_dir():
        return
    _check_root_privileges()
    with step(f"Building the sample guest root {path.name}"):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + _TMP))
        try:
            with tempfile.TemporaryDirectory(dir=path.parent, prefix="work" + _TMP) as work:
                build(tmp, Path(work))
        except BaseException:
            _discard(tmp)
            raise
        tmp.rename(path)


def _ensure_image(layout: Layout, cache: Path | None) -> None:
    path = image_path(layout, cache)
    if path.is_file():
        return
    _check_root_privileges()
    tmp = path.with_name(path.name + _TMP + str(os.getpid()))
    try:
        if layout.base:
            _ensure_image(layout.base, cache)
            convert_qcow2(image_path(layout.base, cache), tmp)
        elif layout.selinux:
            make_image(_ensure_selinux_root(cache), layout, tmp)
        else:
            _ensure_root(root_path(cache))
            make_image(root_path(cache), layout, tmp)
    except BaseException:
        _discard(tmp)
        raise
    tmp.rename(path)


def _check_root_privileges() -> None:
    if os.geteuid() != 0:
        raise CareenError(
            "building sample images needs root (mmdebstrap, chroot, loop devices, mounts)",
            hint="run as root, or use a cache that already holds the samples (CAREEN_CACHE)",
        )
