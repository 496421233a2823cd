"""The RBD side of a refit in the cluster: copy, snapshot, protect, hash, and undo.

The new image is a copy of `OLD@snap` (the data Glance serves for the old image), made
inside the cluster with librbd's copy, which reads only the objects that exist and keeps
the source's object size and features. A deep copy would bring `snap` itself along.
Every image careen creates is journaled first, so that `careen cleanup` can remove it,
with its snapshots, if the run dies.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from careen import journal
from careen.ceph.cluster import CephAccess, Cluster, ceph_error, connect
from careen.ceph.location import SNAP, RbdRef
from careen.errors import CareenError
from careen.interrupts import critical

log = logging.getLogger(__name__)

JOURNAL_KIND = "rbd-image"
CHUNK = 4 << 20
_ZEROS = bytes(CHUNK)

Progress = Callable[[int], None]


@dataclass
class NewRbd:
    """An RBD image this run created: removed on the way out unless kept."""

    ref: RbdRef
    size: int = 0
    seconds: float = 0.0
    kept: bool = False

    def keep(self) -> None:
        self.kept = True


def image_size(cluster: Cluster, ref: RbdRef) -> int:
    import rbd

    with cluster.pool(ref.pool) as ioctx:
        try:
            with rbd.Image(ioctx, ref.image, snapshot=ref.snap, read_only=True) as img:
                return int(img.size())
        except rbd.ImageNotFound:
            what = f"{ref.spec()}"
            raise CareenError(
                f"the Ceph cluster {cluster.fsid} has no RBD image {what}",
                hint="check the pool and name (the Glance image's location, or --rbd-pool)",
            ) from None
        except rbd.Error as e:
            raise ceph_error(e, f"open {ref.spec()}") from e


def children(cluster: Cluster, ref: RbdRef) -> list[str]:
    """The clones of `ref` (a snapshot), as POOL/NAME."""
    import rbd

    with cluster.pool(ref.pool) as ioctx:
        try:
            with rbd.Image(ioctx, ref.image, snapshot=ref.snap, read_only=True) as img:
                return [f"{c['pool']}/{c['image']}" for c in img.list_children2()]
        except rbd.Error as e:
            raise ceph_error(e, f"list the clones of {ref.spec()}") from e


@contextmanager
def new_copy(cluster: Cluster, source: RbdRef, dest: RbdRef) -> Iterator[NewRbd]:
    """`dest`, a flat copy of the snapshot `source` with its object size and features.

    Journaled before it is created; removed (snapshots and all) when the context is left
    without `keep()`, by an error, a Ctrl-C or a failure of the caller."""

    def make(src: Any, dst_io: Any, new: NewRbd) -> None:
        new.size = int(src.size())
        src.copy(dst_io, dest.image, features=int(src.features()), order=_order(src))

    with _new_image(cluster, source, dest, make, "copy") as new:
        yield new


@contextmanager
def new_empty(cluster: Cluster, like: RbdRef, dest: RbdRef, size: int) -> Iterator[NewRbd]:
    """`dest`, a new zero-filled image of `size` bytes with the object size and features
    of `like`; journaled and removed like a copy."""
    import rbd

    def make(src: Any, dst_io: Any, new: NewRbd) -> None:
        new.size = size
        rbd.RBD().create(
            dst_io,
            dest.image,
            size,
            order=_order(src),
            old_format=False,
            features=int(src.features()),
        )

    with _new_image(cluster, like, dest, make, "create") as new:
        yield new


def _order(img: Any) -> int:
    return int(img.stat()["order"])


@contextmanager
def _new_image(
    cluster: Cluster,
    source: RbdRef,
    dest: RbdRef,
    make: Callable[[Any, Any, NewRbd], None],
    what: str,
) -> Iterator[NewRbd]:
    import rbd

    new = NewRbd(dest)
    handle = journal.record(
        JOURNAL_KIND,
        pool=dest.pool,
        image=dest.image,
        what="new RBD image",
        **cluster.access.as_record(),
    )
    made = False
    try:
        with cluster.pool(source.pool) as src_io, cluster.pool(dest.pool) as dst_io:
            if dest.image in rbd.RBD().list(dst_io):
                raise CareenError(
                    f"an RBD image {dest.spec()} already exists",
                    hint="another run may be publishing the same image; check the pool",
                )
            start = time.monotonic()
            try:
                with rbd.Image(src_io, source.image, snapshot=source.snap, read_only=True) as img:
                    made = True  # from here on a failure may leave part of an image
                    make(img, dst_io, new)
            except rbd.ImageNotFound:
                if not made:
                    raise CareenError(
                        f"the Ceph cluster {cluster.fsid} has no RBD image {source.spec()}",
                        hint="check the pool and name (the Glance image's location, or --rbd-pool)",
                    ) from None
                raise
            except rbd.Error as e:
                raise ceph_error(e, f"{what} {dest.spec()} from {source.spec()}") from e
            new.seconds = time.monotonic() - start
        yield new
    except BaseException:
        if made and not new.kept:
            _roll_back(cluster, dest, handle, raising=False)  # the first error is the news
        else:
            handle.done()
        raise
    if made and not new.kept:
        _roll_back(cluster, dest, handle, raising=True)
    else:
        handle.done()


def _roll_back(cluster: Cluster, dest: RbdRef, handle: journal.Handle, *, raising: bool) -> None:
    """Remove the unfinished copy; when Ceph cannot, the journal keeps it for cleanup."""
    with critical():
        try:
            remove_image(cluster, dest)
        except CareenError as e:
            log.error("could not remove %s: %s (careen cleanup retries)", dest.spec(), e.message)
            if raising:
                raise
            return
        handle.done()


def snapshot_and_protect(cluster: Cluster, ref: RbdRef, snap: str = SNAP) -> RbdRef:
    import rbd

    with cluster.pool(ref.pool) as ioctx:
        try:
            with rbd.Image(ioctx, ref.image) as img:
                img.create_snap(snap)
                img.protect_snap(snap)
        except rbd.Error as e:
            raise ceph_error(e, f"snapshot and protect {ref.spec()}@{snap}") from e
    return RbdRef(ref.pool, ref.image, snap, cluster.fsid)


def remove_image(cluster: Cluster, ref: RbdRef) -> bool:
    """Remove `ref` and its snapshots (unprotecting them); False when it did not exist."""
    import rbd

    with cluster.pool(ref.pool) as ioctx:
        try:
            with rbd.Image(ioctx, ref.image) as img:
                for snap in list(img.list_snaps()):
                    if img.is_protected_snap(snap["name"]):
                        img.unprotect_snap(snap["name"])
                    img.remove_snap(snap["name"])
        except rbd.ImageNotFound:
            return False
        except rbd.Error as e:
            raise ceph_error(e, f"remove the snapshots of {ref.spec()}") from e
        try:
            rbd.RBD().remove(ioctx, ref.image)
        except rbd.ImageNotFound:
            return False
        except rbd.Error as e:
            raise ceph_error(e, f"remove {ref.spec()}") from e
    log.info("Removed the RBD image %s", ref.spec())
    return True


def hashes(
    cluster: Cluster, ref: RbdRef, algo: str, progress: Progress | None = None
) -> dict[str, str]:
    """Glance's hashes of the image's data (`algo` and md5), read in the cluster.

    Holes are hashed as the zeros they read as, without reading them."""
    import rbd

    digests = {algo: hashlib.new(algo), "md5": hashlib.md5(usedforsecurity=False)}
    with cluster.pool(ref.pool) as ioctx:
        try:
            with rbd.Image(ioctx, ref.image, snapshot=ref.snap, read_only=True) as img:
                size = int(img.size())
                extents: list[tuple[int, int]] = []

                def found(offset: int, length: int, exists: bool) -> None:
                    if exists:
                        extents.append((offset, length))

                img.diff_iterate(0, size, None, found)
                pos = 0
                for off, length in sorted(extents):
                    _zeros(digests, off - pos)
                    end = off + length
                    while off < end:
                        n = min(CHUNK, end - off)
                        data = img.read(off, n)
                        for h in digests.values():
                            h.update(data)
                        off += n
                        if progress:
                            progress(off)
                    pos = end
                _zeros(digests, size - pos)
        except rbd.Error as e:
            raise ceph_error(e, f"read {ref.spec()}") from e
    return {name: h.hexdigest() for name, h in digests.items()}


def _zeros(digests: dict[str, Any], count: int) -> None:
    while count > 0:
        n = min(CHUNK, count)
        for h in digests.values():
            h.update(_ZEROS[:n])
        count -= n


def release_journaled(entry: dict[str, Any], same_boot: bool) -> str | None:
    """Remove an RBD image a dead run created and never published."""
    ref = RbdRef(str(entry["pool"]), str(entry["image"]))
    with connect(CephAccess.from_record(entry)) as cluster:
        if not remove_image(cluster, ref):
            return None
    return f"removed the unfinished RBD image {ref.spec()}"
