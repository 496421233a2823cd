"""Refit a Glance image whose data lives in Ceph, inside the cluster.

The order is Nova's direct snapshot's, which needs no rename: create the new Glance
image (queued, journaled, tagged with the run) to learn its ID; copy `OLD@snap` into
`POOL/<new ID>`; refit that copy in place through a FUSE export; create and protect
`snap`; hash the data as Glance would; register `rbd://FSID/POOL/<new ID>/snap` with the
hashes; wait until the image is active. Nothing goes through the Glance API but
metadata, and the old image's RBD data is only ever read. A failure at any step removes
what was made, newest first: the RBD copy with its snapshot, then the Glance record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from careen import journal, limits, run
from careen.ceph import images
from careen.ceph.cluster import CephAccess, Cluster, connect
from careen.ceph.export import rbd_view
from careen.ceph.location import SNAP, RbdRef
from careen.errors import CareenError
from careen.glance import metadata, publish
from careen.glance.cloud import Cloud
from careen.glance.source import SourceImage
from careen.image import probe
from careen.image.model import ImageFormat
from careen.log import progress_bar, step
from careen.refit import RefitOptions, RefitResult, refit, workdir

log = logging.getLogger(__name__)

HASH_ALGO = "sha512"  # Glance's default hashing_algorithm


@dataclass
class Figures:
    """Bytes and seconds per step, for the output."""

    copied_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 2)

    def as_dict(self) -> dict[str, Any]:
        return {"copied_bytes": self.copied_bytes, "seconds": dict(self.seconds)}


@dataclass
class InCluster:
    result: RefitResult
    new_id: str
    location: str
    api: str
    hash_algo: str
    hash_value: str
    pending: list[str]
    notes: list[str]
    figures: Figures


def source_ref(src: SourceImage, found: RbdRef | None, pool: str | None) -> RbdRef | None:
    """Where the source's data is in Ceph: its location, or `--rbd-pool` and its ID."""
    if found is not None:
        if pool and pool != found.pool:
            raise CareenError(
                f"image {src.label()} lives in pool {found.pool}, not {pool}",
                hint="drop --rbd-pool or name the pool its location names",
            )
        return found
    if pool:
        return RbdRef(pool, src.id, SNAP)
    return None


def check_cluster(cluster: Cluster, ref: RbdRef) -> None:
    if ref.fsid and ref.fsid != cluster.fsid:
        raise CareenError(
            f"the image lives in the Ceph cluster {ref.fsid}, but {cluster.access.conf} "
            f"is the cluster {cluster.fsid}",
            hint="name the image's cluster with --ceph-conf",
        )


def check_deletable(cluster: Cluster, ref: RbdRef, label: str) -> None:
    """Refuse to delete an image whose snapshot still has clones (servers, volumes)."""
    kids = images.children(cluster, ref)
    if kids:
        raise CareenError(
            f"image {label} cannot be deleted: its RBD snapshot {ref.spec()} has "
            f"{len(kids)} clone(s): {', '.join(kids)}",
            hint="retire it with --retire hide, rename or deactivate; delete it once "
            "nothing is cloned from it",
        )


def refit_in_cluster(
    cloud: Cloud,
    cluster: Cluster,
    src: SourceImage,
    ref: RbdRef,
    plan: metadata.Plan,
    opts: RefitOptions,
) -> InCluster:
    """Everything up to the active, checked new image; the caller retires the old one."""
    figures = Figures()
    stores = str(src.image.get("stores") or "").split(",")
    store = _location_store(src) or (stores[0] if stores[0] else None)
    with ExitStack() as stack:
        with figures.timed("create"), step("Creating the new image record (no data yet)"):
            new = stack.enter_context(publish.queued_image(cloud, plan.body))
        dest = RbdRef(ref.pool, new.id)
        with figures.timed("copy"), limits.slot("rbd-copies"):
            size = images.image_size(cluster, ref)
            if src.format is ImageFormat.QCOW2:
                what = f"Converting {ref.spec()} (qcow2) into {dest.spec()} (raw) in the cluster"
                with step(what):
                    copy = stack.enter_context(_converted(cluster, ref, dest, opts.workdir))
            else:
                with step(
                    f"Copying {ref.spec()} to {dest.spec()} in the cluster ({size >> 20} MiB)"
                ):
                    copy = stack.enter_context(images.new_copy(cluster, ref, dest))
        figures.copied_bytes = copy.size
        journal.checkpoint("rbd-copied")
        with figures.timed("refit"):
            result = _refit_copy(cluster, dest, opts)
        journal.checkpoint("rbd-snapshot")
        with figures.timed("snapshot"), step(f"Creating and protecting {dest.spec()}@{SNAP}"):
            snap = images.snapshot_and_protect(cluster, dest)
        with (
            figures.timed("hash"),
            ExitStack() as bar,
            step(f"Hashing the new image's data ({HASH_ALGO}, md5)"),
        ):
            digests = images.hashes(cluster, snap, HASH_ALGO, progress_bar("hash", copy.size, bar))
        validation = {
            "checksum": digests["md5"],
            "os_hash_algo": HASH_ALGO,
            "os_hash_value": digests[HASH_ALGO],
        }
        journal.checkpoint("rbd-register")
        with figures.timed("register"), step(f"Registering {snap.url()}"):
            api = publish.add_location(cloud, new.id, snap.url(), store, validation)
            image = publish.wait_active(cloud, new.id)
        algo, value = publish.check_hashes(image, None, dict(digests))
        members = publish.members_of(cloud, src)
        with figures.timed("finish"):
            notes, pending = publish.finish(
                cloud, new.id, protected=plan.protected, members=members
            )
        copy.keep()
        new.keep()
    result.output = None
    return InCluster(result, new.id, snap.url(), api, algo, value, pending, notes, figures)


@contextmanager
def _converted(
    cluster: Cluster, source: RbdRef, dest: RbdRef, parent: Path | None
) -> Iterator[images.NewRbd]:
    """`dest`, a raw image holding the disk that the qcow2 in `source` describes: both are
    exported through FUSE and qemu-img converts between them, writing only data."""
    with ExitStack() as views:
        work = views.enter_context(workdir(parent, prefix="careen-rbd-", clear=True))
        (work / "from").mkdir()
        (work / "to").mkdir()
        source_view = views.enter_context(rbd_view(cluster, source, work / "from", writable=False))
        info = probe.probe_image(source_view, expected_format=ImageFormat.QCOW2)
        with images.new_empty(cluster, source, dest, info.virtual_size) as new:
            target = views.enter_context(rbd_view(cluster, dest, work / "to", writable=True))
            argv: list[run.Arg] = ["qemu-img", "convert", "-n", "--target-is-zero"]
            run.run([*argv, "-f", "qcow2", "-O", "raw", source_view, target])
            views.close()
            yield new


def _refit_copy(cluster: Cluster, dest: RbdRef, opts: RefitOptions) -> RefitResult:
    """Refit the new RBD image in place, through a FUSE export of it."""
    with ExitStack() as stack:
        work = stack.enter_context(workdir(opts.workdir, prefix="careen-rbd-", clear=True))
        view = stack.enter_context(rbd_view(cluster, dest, work, writable=True))
        probe.probe_image(view, expected_format=ImageFormat.RAW)
        return refit(
            replace(opts, source=view, in_place=True, scratch=True, output=None, workdir=work)
        )


def _location_store(src: SourceImage) -> str | None:
    for loc in src.image.get("locations") or []:
        store = (loc.get("metadata") or {}).get("store")
        if store:
            return str(store)
    return None


@contextmanager
def cluster_for(access: CephAccess) -> Iterator[Cluster]:
    with step(f"Connecting to the Ceph cluster of {access.conf} as client.{access.user}"):
        stack = ExitStack()
        cluster = stack.enter_context(connect(access))
    with stack:
        yield cluster
