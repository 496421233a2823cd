"""The `careen fleet` verbs: plan, run, retire, rollback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from careen import limits
from careen.errors import CareenError, ExitCode, UsageError
from careen.fleet import display as fleet_display
from careen.fleet import plan as fleet_plan
from careen.fleet import run as fleet_run
from careen.fleet import select
from careen.glance import publish
from careen.glance.cloud import connect
from careen.recipe import BUILTIN
from careen.recipe import load as load_recipe

log = logging.getLogger(__name__)

# `careen refit` options a plan records and gives to every refit of the fleet.
PASSED = {
    "backend": "--backend",
    "disk_format": "--disk-format",
    "store": "--store",
    "ceph_conf": "--ceph-conf",
    "ceph_user": "--ceph-user",
    "keyring": "--keyring",
    "rbd_pool": "--rbd-pool",
    "timeout": "--timeout",
}
PASSED_FLAGS = {"use_import": "--import", "via_glance": "--via-glance"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="refit many Glance images: plan, run, retire, rollback")
    verbs = p.add_subparsers(dest="fleet_verb", required=True, metavar="FLEET_VERB")

    pl = verbs.add_parser("plan", help="select images and save what a run will refit")
    pl.add_argument("-o", "--output", type=Path, required=True, help="the plan file to write")
    pl.add_argument("--os-cloud", metavar="NAME", help="the cloud in clouds.yaml (or OS_CLOUD)")
    pl.add_argument(
        "-r",
        "--recipe",
        default="cloud-init-refresh",
        help=f"a recipe file or built-in ({', '.join(BUILTIN)}); default cloud-init-refresh",
    )
    pl.add_argument(
        "-w",
        "--where",
        action="append",
        default=[],
        metavar="EXPR",
        help="take images matching EXPR (all of them must match): name=GLOB, name~REGEX, "
        "owner=, visibility=, disk_format=, store=, tag=, hidden=yes|no|any, created<DATE, "
        "updated<DATE, refitted=no, PROPERTY=GLOB (PROPERTY=* : it exists), PROPERTY~REGEX",
    )
    pl.add_argument(
        "-x",
        "--exclude",
        action="append",
        default=[],
        metavar="EXPR",
        help="leave out images matching EXPR (any of them), same forms as --where",
    )
    pl.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="STORE=QUEUE",
        help="the Celery queue for images in STORE (one per region or Ceph cluster)",
    )
    pl.add_argument("--queue", default=fleet_plan.DEFAULT_QUEUE, help="the queue for the rest")
    pl.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="STORE=POOL",
        help="check the free space of the RBD pool behind STORE (with the Ceph options)",
    )
    pl.add_argument("--page-size", type=int, default=select.PAGE_SIZE, help=argparse.SUPPRESS)
    pl.add_argument("--format", choices=("table", "json"), default="table")
    pl.add_argument("--force", action="store_true", help="overwrite an existing plan file")
    g = pl.add_argument_group("given to every refit")
    g.add_argument("--backend", choices=("auto", "host", "appliance"))
    g.add_argument("--disk-format", choices=("qcow2", "raw"))
    g.add_argument("--store", help="the store to upload into (multi-store clouds)")
    g.add_argument("--import", dest="use_import", action="store_true", help="glance-direct")
    g.add_argument("--via-glance", action="store_true", help="never refit inside Ceph")
    g.add_argument("--ceph-conf", type=Path)
    g.add_argument("--ceph-user")
    g.add_argument("--keyring", type=Path)
    g.add_argument("--rbd-pool")
    g.add_argument("--timeout", help="seconds one command in the guest may run")

    r = verbs.add_parser("run", help="refit every image of a plan (resumes where it stopped)")
    r.add_argument("plan", type=Path)
    r.add_argument("-j", "--jobs", type=int, default=1, help="images refitted at once")
    r.add_argument("--max-failures", type=int, help="start no new work after this many failures")
    r.add_argument(
        "--canary",
        type=int,
        metavar="N",
        help="refit and verify by boot only the next N images, then stop for a look",
    )
    r.add_argument("--retry-failed", action="store_true", help="try failed images again")
    r.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="KIND=N",
        help="at most N at once on this host, of: downloads, appliances, rbd-copies; or "
        "glance-rate=N requests per second towards Glance",
    )
    r.add_argument(
        "--engine",
        choices=("local", "celery"),
        default="local",
        help="who refits: this host (--jobs at once), or careen workers through RabbitMQ, "
        "each image on its plan entry's queue (--jobs outstanding at once)",
    )
    r.add_argument(
        "--broker", metavar="URL", help="the RabbitMQ URL for --engine celery (or CAREEN_BROKER)"
    )
    _retire_options(r)
    r.add_argument("--dry-run", action="store_true", help="print what would be handed out")
    r.add_argument("--format", choices=("text", "json"), default="text")

    rt = verbs.add_parser("retire", help="retire the old images of a fleet's refitted ones")
    rt.add_argument("plan", type=Path)
    _retire_options(rt)

    rb = verbs.add_parser(
        "rollback", help="delete a fleet's new images and undo the retirement of the old ones"
    )
    rb.add_argument("plan", type=Path)


def _retire_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--retire",
        choices=[r.value for r in publish.Retire],
        default="keep",
        help="what happens to each old image once its new one is active",
    )
    p.add_argument("--retire-suffix", default="-retired", help="for --retire rename")


def run_fleet(args: argparse.Namespace) -> int:
    if args.fleet_verb == "plan":
        return _plan(args)
    if args.fleet_verb == "run":
        _check_run_args(args)  # before anything is read, written or logged in to
    path = args.plan.absolute()
    plan = fleet_plan.load(path)
    paths = fleet_run.Paths(path)
    if args.fleet_verb == "run" and args.dry_run:
        return _dry_run(plan, paths, args)
    cloud = connect(plan.cloud)
    try:
        with fleet_run.opened(plan, paths) as state:
            if args.fleet_verb == "run":
                return _run(cloud, plan, paths, state, args)
            if args.fleet_verb == "retire":
                how = publish.Retire(args.retire)
                for line in fleet_run.retire(cloud, plan, state, how, args.retire_suffix):
                    print(line)
            else:
                for line in fleet_run.rollback(cloud, plan, state):
                    print(line)
            fleet_run.write_report(paths, fleet_run.report(plan, state, None))
    finally:
        cloud.close()
    return ExitCode.OK


def _plan(args: argparse.Namespace) -> int:
    out = args.output.absolute()
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists", hint="add --force to replace it, or name another file")
    if args.page_size < 1:
        raise UsageError("--page-size must be 1 or more")
    recipe = load_recipe(args.recipe)
    ref = args.recipe if args.recipe in BUILTIN else str(Path(args.recipe).absolute())
    selection = select.Selection(select.parse_all(args.where), select.parse_all(args.exclude))
    routes = fleet_plan.parse_routes(args.route)
    cloud = connect(args.os_cloud)
    try:
        plan = fleet_plan.make_plan(
            cloud,
            selection,
            {"ref": ref, "name": recipe.name, "digest": recipe.digest},
            _refit_args(args),
            routes,
            args.queue,
            args.page_size,
        )
    finally:
        cloud.close()
    if args.pool:
        from careen.ceph.cluster import CephAccess

        access = CephAccess.from_options(args.ceph_conf, args.ceph_user, args.keyring)
        plan.warnings += fleet_plan.check_pools(plan, access, fleet_plan.parse_routes(args.pool))
    fleet_plan.save(plan, out)
    if args.format == "json":
        print(json.dumps(dataclasses.asdict(plan), indent=2))
    else:
        _print_plan(plan, out)
    return ExitCode.OK


def _refit_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for name, flag in PASSED.items():
        value = getattr(args, name)
        if value is not None:
            out += [flag, str(Path(value).absolute()) if isinstance(value, Path) else str(value)]
    out += [flag for name, flag in PASSED_FLAGS.items() if getattr(args, name)]
    return out


def _print_plan(plan: fleet_plan.Plan, out: Path) -> None:
    rows = [("IMAGE", "NAME", "SIZE", "FORMAT", "STORE", "QUEUE", "WHY")]
    for e in plan.images:
        rows.append(
            (
                e.id,
                e.name,
                f"{e.size >> 20} MiB",
                e.disk_format,
                ",".join(e.stores) or "-",
                e.queue,
                "; ".join(e.why),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    total = sum(e.size for e in plan.images)
    print(
        f"{len(plan.images)} image(s), {total >> 20} MiB, recipe {plan.recipe['name']} "
        f"({plan.recipe['digest']}); plan written to {out}"
    )
    for w in plan.warnings:
        print(f"warning: {w}")
    print("Nothing was changed.")


def _check_run_args(args: argparse.Namespace) -> None:
    if args.jobs < 1:
        raise UsageError("--jobs must be 1 or more", hint="give --jobs 1 to refit one at a time")
    limits.parse(args.limit)
    _broker(args)


def _broker(args: argparse.Namespace) -> str | None:
    """The broker's URL for --engine celery; None for the local engine."""
    if args.engine == "local":
        if args.broker:
            raise UsageError("--broker is for --engine celery", hint="add --engine celery")
        return None
    broker = args.broker or os.environ.get("CAREEN_BROKER")
    if not broker:
        raise UsageError(
            "--engine celery needs a broker", hint="give --broker URL or set CAREEN_BROKER"
        )
    return str(broker)


def _run(cloud: Any, plan: Any, paths: Any, state: Any, args: argparse.Namespace) -> int:
    refit_args = ["--retire", args.retire, "--retire-suffix", args.retire_suffix]
    opts = fleet_run.RunOptions(
        jobs=args.jobs,
        max_failures=args.max_failures,
        canary=args.canary,
        retry_failed=args.retry_failed,
        trace=os.environ.get("CAREEN_FLEET_TRACE"),
        extra_args=refit_args if args.retire != "keep" else [],
        env=limits.as_env(limits.parse(args.limit), paths.plan.with_suffix(".limits")),
        retire=args.retire,
    )
    paths.logs.mkdir(exist_ok=True)
    outcome = None
    try:
        engine = _engine(args)
        so_far = state.counts()
        finished = sum(n for s, n in so_far.items() if s not in ("pending", "running"))
        display = fleet_display.for_run(args.format, len(plan.images), finished)
        outcome = fleet_run.run(cloud, plan, paths, state, opts, engine, display)
    finally:
        data = fleet_run.report(plan, state, outcome)
        fleet_run.write_report(paths, data)
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(data["counts"].items()))
        print(f"fleet {plan.fleet_id}: {counts}")
        if outcome.stopped:
            print(f"stopped: {outcome.stopped}")
        print(f"report: {paths.report_json} and {paths.report_csv}")
    if data["failed"]:
        raise CareenError(
            f"{len(data['failed'])} image(s) failed",
            hint="see the report; fix the cause and run again with --retry-failed",
        )
    return ExitCode.OK


def _engine(args: argparse.Namespace) -> fleet_run.Engine:
    broker = _broker(args)
    if broker is None:
        return fleet_run.LocalEngine(args.jobs)
    from careen.fleet.celery import CeleryEngine

    return CeleryEngine(broker)


def _dry_run(plan: fleet_plan.Plan, paths: fleet_run.Paths, args: argparse.Namespace) -> int:
    from careen.fleet.state import derive_id

    states: dict[str, tuple[str, int]] = {}
    if paths.db.exists():
        import sqlite3

        db = sqlite3.connect(f"file:{paths.db}?mode=ro", uri=True)
        try:
            states = {
                s: (st, a)
                for s, st, a in db.execute("SELECT source_id, state, attempt FROM images")
            }
        finally:
            db.close()
    items = []
    for e in plan.images:
        st, attempt = states.get(e.id, ("pending", 0))
        if st not in ("pending", "running") and not (st == "failed" and args.retry_failed):
            continue
        new_id = derive_id(plan.fleet_id, e.id, plan.recipe["digest"], attempt + 1)
        items.append({"source_id": e.id, "name": e.name, "attempt": attempt + 1, "new_id": new_id})
    if args.canary is not None:
        items = items[: args.canary]
    if args.format == "json":
        print(json.dumps({"dry_run": True, "would_refit": items}, indent=2))
    else:
        for i in items:
            print(
                f"Would refit {i['source_id']} ({i['name']!r}) as {i['new_id']} "
                f"(attempt {i['attempt']})"
            )
        print(f"{len(items)} image(s) with recipe {plan.recipe['name']}, {args.jobs} at once")
        print("Nothing was changed (--dry-run)")
    return ExitCode.OK
