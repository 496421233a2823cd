"""`careen worker`: take a fleet's tasks from RabbitMQ queues and refit them on this host.

A worker first cleans up what its own dead runs left (`careen cleanup`), then runs
Celery's worker in this process with the prefork pool: `--concurrency` processes, each
running one `careen refit` child at a time. It holds the built-in recipes and the
`--recipe` files, and runs a task only when it holds the recipe with the task's digest.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

from careen import recover
from careen.errors import ExitCode, UsageError
from careen.fleet import plan as fleet_plan
from careen.fleet import task as fleet_task

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("worker", help="refit a fleet's images that a coordinator hands out")
    w.add_argument(
        "--queue",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a queue to take tasks from (repeatable; default {fleet_plan.DEFAULT_QUEUE})",
    )
    w.add_argument(
        "--broker", metavar="URL", help="the RabbitMQ URL (default: CAREEN_BROKER), amqps:// ..."
    )
    w.add_argument(
        "-r",
        "--recipe",
        action="append",
        default=[],
        metavar="RECIPE",
        help="a recipe file this worker may run (repeatable; it always may run the built-ins)",
    )
    w.add_argument("-c", "--concurrency", type=int, default=1, help="refits at once")
    w.add_argument("--name", help="the worker's node name (default: careen-RANDOM@HOST)")


def run_worker(args: argparse.Namespace) -> int:
    broker = args.broker or os.environ.get("CAREEN_BROKER")
    if not broker:
        raise UsageError("no broker", hint="give --broker URL or set CAREEN_BROKER")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be 1 or more")
    queues = args.queue or [fleet_plan.DEFAULT_QUEUE]
    held = fleet_task.held_recipes(args.recipe)
    for digest, ref in held.items():
        log.info("holding recipe %s (%s)", ref, digest)
    _clean_up()
    from careen.fleet import celery as fleet_celery

    app = fleet_celery.make_app(broker, held, queues)
    fleet_celery.check_broker(app)
    # Refits need root (loop devices, mounts). Celery warns about a worker running as
    # root, and would refuse one that accepts pickle: careen's accept only JSON.
    warnings.filterwarnings("ignore", message="You're running the worker with superuser")
    worker = app.Worker(
        hostname=fleet_celery.node_name(args.name),
        queues=queues,
        concurrency=args.concurrency,
        pool_cls="prefork",
        loglevel="DEBUG" if log.isEnabledFor(logging.DEBUG) else "INFO",
        without_gossip=True,
        without_heartbeat=True,
    )
    worker.start()
    return int(worker.exitcode or ExitCode.OK)


def _clean_up() -> None:
    """Release what this host's dead runs left before taking new work."""
    report = recover.cleanup()
    for line in report.actions:
        log.info("cleanup: %s", line)
    for line in report.failures:
        log.warning("cleanup failed: %s", line)
