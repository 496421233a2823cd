"""Benchmark a fleet run: --jobs 1 against --jobs 2 on this host, and the local engine
against Celery with two workers.

A fleet of N copies of the demo's qcow2 sample (a used Debian 12, 2 GiB virtual) is
uploaded once to a Glance of the test suite's helpers (tests/services: Keystone and
Glance with a file store, and a RabbitMQ for the workers, all under one temporary
directory, stopped at the end, on an error or Ctrl-C too). Each run plans the fleet
afresh (a new fleet ID, so new image IDs), times `careen fleet run PLAN` alone, checks
that every image succeeded, then rolls the fleet back (not timed). The methods run in
one order in even rounds and in the reverse order in odd ones; the figures are medians
with the spread (fastest to slowest), and the ratios are of medians.

Methods: `local-1` (`--jobs 1`), `local-2` (`--jobs 2`), and `celery-2` (two `careen
worker` processes of concurrency 1 on one queue, standing in for two hosts on this one
machine, and `--engine celery --jobs 2`). Run as root:
`.venv/bin/python scripts/benchmark_fleet.py [--rounds N] [--images N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from services.cloud import Cloud, image_v2, start_cloud
from services.process import Daemon, NotInstalled, service_venv, start_daemon, stop_daemon
from services.rabbitmq import RabbitMQ, missing_binaries, start_rabbitmq

from careen.samples import Layout, sample_image

CAREEN = Path(sys.executable).parent / "careen"
METHODS = ("local-1", "local-2", "celery-2")
QUEUE = "bench"
RUN_TIMEOUT = 1800.0


class BenchError(Exception):
    """A run failed or the machine cannot run the benchmark."""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Bench:
    root: Path
    cloud: Cloud
    broker: RabbitMQ
    tag: str
    images: int

    def env(self, state: str) -> dict[str, str]:
        return {
            **os.environ,
            "OS_CLIENT_CONFIG_FILE": str(self.cloud.clouds_yaml),
            "OS_CLOUD": self.cloud.admin_cloud,
            "CAREEN_STATE_DIR": str(self.root / f"state-{state}"),
            "CAREEN_BROKER": self.broker.url,
            "TMPDIR": str(self.root / "tmp"),
        }


def careen(bench: Bench, *args: str, state: str = "coordinator") -> str:
    done = subprocess.run(
        [str(CAREEN), *args],
        env=bench.env(state),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise BenchError(f"careen {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def upload_fleet(bench: Bench, sample: Path) -> None:
    images = image_v2(bench.cloud.admin)
    for n in range(bench.images):
        body = {
            "name": f"{bench.tag}-{n}",
            "disk_format": "qcow2",
            "container_format": "bare",
            "tags": [bench.tag],
        }
        made = images.post("/images", json=body)
        if made.status_code != 201:
            raise BenchError(f"cannot create an image: {made.text}")
        with sample.open("rb") as f:
            up = images.put(
                f"/images/{made.json()['id']}/file",
                data=f,
                headers={"Content-Type": "application/octet-stream"},
            )
        if up.status_code != 204:
            raise BenchError(f"cannot upload an image: {up.text}")


def one_run(bench: Bench, method: str, n: int) -> float:
    plan = bench.root / f"{method}-{n}.json"
    careen(
        bench, "fleet", "plan", "-o", str(plan), "-w", f"tag={bench.tag}",
        "-x", "careen_source_image=*", "-r", "reset-identity", "--backend", "host",
        "--queue", QUEUE,
    )  # fmt: skip
    jobs = "1" if method == "local-1" else "2"
    engine = ["--engine", "celery"] if method.startswith("celery") else []
    start = time.monotonic()
    out = careen(bench, "fleet", "run", str(plan), "--jobs", jobs, *engine, "--format", "json")
    seconds = time.monotonic() - start
    report = json.loads(out)
    if len(report["succeeded"]) != bench.images:
        raise BenchError(f"{method}: not every image succeeded: {report['counts']}")
    careen(bench, "fleet", "rollback", str(plan))
    return seconds


@contextmanager
def workers(bench: Bench) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        for label in ("a", "b"):
            argv = [str(CAREEN), "worker", "--name", f"bench-{label}", "--queue", QUEUE]
            argv += ["--concurrency", "1"]
            log = bench.root / f"worker-{label}.log"
            env = bench.env(f"worker-{label}")
            started.append(start_daemon(f"worker {label}", argv, env=env, log=log))
        time.sleep(5)  # let both connect before the first task
        yield started
    finally:
        for daemon in started:
            stop_daemon(daemon, timeout=60)


def run_rounds(bench: Bench, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {m: [] for m in METHODS}
    for n in range(rounds):
        order = METHODS if n % 2 == 0 else tuple(reversed(METHODS))
        for method in order:
            seconds = one_run(bench, method, n)
            results[method].append(seconds)
            progress(f"round {n + 1}/{rounds}: {method} {seconds:.1f} s")
    return results


def report(bench: Bench, rounds: int, results: dict[str, list[float]]) -> str:
    med = {m: statistics.median(v) for m, v in results.items()}
    lines = [
        f"careen fleet benchmark: {bench.images} images (the mbr-qcow2 sample), recipe "
        f"reset-identity, host backend, {rounds} rounds; {os.cpu_count()} cores",
        "",
        f"{'method':<10} {'median s':>9} {'spread s':>14}  runs (s, in round order)",
    ]
    for m in METHODS:
        runs = results[m]
        spread = f"{min(runs):.1f}-{max(runs):.1f}"
        lines.append(f"{m:<10} {med[m]:>9.1f} {spread:>14}  {' '.join(f'{s:.1f}' for s in runs)}")
    lines += [
        "",
        f"local-2/local-1 {med['local-2'] / med['local-1']:.2f}x; "
        f"celery-2/local-2 {med['celery-2'] / med['local-2']:.2f}x; "
        f"per image: local-1 {med['local-1'] / bench.images:.1f} s",
    ]
    return "\n".join(lines)


def check_machine() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the host backend mounts the images")
    if missing := missing_binaries():
        raise BenchError(f"no RabbitMQ here (missing {', '.join(missing)}): scripts/setup --tests")
    service_venv("keystone")
    service_venv("glance")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each method (default 3)")
    parser.add_argument("--images", type=int, default=4, help="images in the fleet (default 4)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.images < 1:
        parser.error("--rounds and --images must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    root = Path(tempfile.mkdtemp(prefix="careen-bench-fleet-"))
    try:
        check_machine()
        sample = sample_image(Layout.MBR_QCOW2)
        (root / "tmp").mkdir()
        progress(f"everything under {root}")
        with ExitStack() as stack:
            progress("starting Keystone, Glance and RabbitMQ ...")
            cloud = stack.enter_context(start_cloud(root / "cloud"))
            broker = stack.enter_context(start_rabbitmq(root / "rabbitmq"))
            bench = Bench(root, cloud, broker, f"bench-{uuid.uuid4().hex[:6]}", args.images)
            progress(f"uploading {args.images} images ...")
            upload_fleet(bench, sample)
            stack.enter_context(workers(bench))
            results = run_rounds(bench, args.rounds)
            text = report(bench, args.rounds, results)
    except (BenchError, NotInstalled, subprocess.TimeoutExpired) as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmark: interrupted; everything was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(text)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
