"""`careen refit rbd:POOL/NAME[@SNAP] -o FILE`: an RBD image as the source of a refit.

The image (or its snapshot) is read through a read-only FUSE export, under the usual
copy-on-write overlay, and the result is written to a local file. `--in-place` on an
image (not a snapshot) changes the RBD image itself, as it would a local file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from careen.ceph.cluster import CephAccess
from careen.ceph.export import rbd_view
from careen.ceph.images import image_size
from careen.ceph.location import is_ref, parse_ref
from careen.ceph.publish import cluster_for
from careen.errors import ExitCode, UsageError
from careen.refit import RefitOptions, RefitResult, refit, workdir


def wanted(args: argparse.Namespace) -> bool:
    return is_ref(str(args.image))


def run_refit(
    args: argparse.Namespace,
    make_options: Callable[[argparse.Namespace], RefitOptions],
    jsonable: Callable[[object], Any],
    print_result: Callable[[RefitResult], None],
) -> int:
    ref = parse_ref(str(args.image))
    if args.output is not None and str(args.output).startswith(("glance:", "rbd:")):
        raise UsageError(
            "an rbd: source is refitted into a local file",
            hint="write -o FILE; to publish a Glance image stored in Ceph, refit glance:ID",
        )
    if args.in_place and ref.snap:
        raise UsageError(
            f"{ref.spec()} is a snapshot, which cannot change",
            hint="refit it into a file with -o FILE, or name the image without @SNAP",
        )
    opts = make_options(args)
    access = CephAccess.from_options(args.ceph_conf, args.ceph_user, args.keyring)
    with ExitStack() as stack:
        cluster = stack.enter_context(cluster_for(access))
        image_size(cluster, ref)  # a missing image or pool is named before any export
        parent = opts.workdir or (opts.output.parent if opts.output else None)
        work = stack.enter_context(workdir(parent, prefix="careen-rbd-", clear=True))
        view = stack.enter_context(rbd_view(cluster, ref, work, writable=args.in_place))
        result = refit(replace(opts, source=view, workdir=opts.workdir or work))
    if args.format == "json":
        print(json.dumps({**jsonable(result), "rbd": ref.spec()}, indent=2))
    else:
        print_result(result)
    return ExitCode.OK
