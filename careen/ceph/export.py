"""An RBD image as a raw file on the host: a qemu-storage-daemon FUSE export.

qemu's rbd driver talks to the cluster itself; the host needs neither krbd nor rbd-nbd.
The client key reaches qemu through a secret object read from a file that only root can
read and that is removed with the export, so it never appears on a command line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from careen import journal
from careen.attach.export import fuse_export, qsd_export_argv
from careen.ceph.cluster import Cluster
from careen.ceph.location import RbdRef


@contextmanager
def rbd_view(cluster: Cluster, ref: RbdRef, workdir: Path, *, writable: bool) -> Iterator[Path]:
    """`ref` (an image, or a snapshot read-only) as a raw file while the context lasts."""
    key_file = workdir / "ceph.key"
    handle = journal.record("file", path=str(key_file), what="Ceph key for qemu")
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cluster.key())
        node: dict[str, object] = {
            "driver": "rbd",
            "node-name": "disk0",
            "pool": ref.pool,
            "image": ref.image,
            "conf": str(cluster.access.conf),
            "user": cluster.access.user,
            "key-secret": "cephkey0",
            "read-only": not writable,
            "discard": "unmap",
        }
        if ref.snap:
            node["snapshot"] = ref.snap
        mountpoint = workdir / "rbd.raw"
        argv = qsd_export_argv(
            [node],
            mountpoint,
            writable=writable,
            objects=[f"secret,id=cephkey0,format=base64,file={key_file}"],
        )
        with fuse_export(argv, f"RBD image {ref.spec()}", mountpoint) as view:
            yield view
    finally:
        key_file.unlink(missing_ok=True)
        handle.done()
