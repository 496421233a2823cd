"""careen fleet run --engine celery against a real RabbitMQ, real `careen worker`
processes (two per test, each with its own state directory, standing in for two hosts)
and the session's real Glance: a worker's process or the worker itself killed in the
middle of an image, an image that kills every worker, routing by queue, and a recipe a
worker does not hold."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration.util import CAREEN, careen_env
from kombu import Connection
from services.fixtures import assert_stopped
from services.process import Daemon, log_tail, start_daemon, stop_daemon
from services.rabbitmq import RabbitMQ

from careen.fleet import celery as fleet_celery
from careen.fleet.state import derive_id

from .conftest import IDS, Fleet, fleet_recipe, new_images

pytestmark = [
    pytest.mark.glance,
    pytest.mark.images,
    pytest.mark.root,
    pytest.mark.celery,
]


@dataclass
class Worker:
    label: str
    node: str  # Celery's node name, NAME@HOST
    daemon: Daemon
    state: Path  # its CAREEN_STATE_DIR

    @property
    def pid(self) -> int:
        return self.daemon.pid

    def alive(self) -> bool:
        return self.daemon.process.poll() is None


class Workers:
    """`careen worker` processes a test starts; each stands in for a host of its own."""

    def __init__(self, rabbitmq: RabbitMQ, base: Path) -> None:
        self.rabbitmq = rabbitmq
        self.base = base
        self.started: list[Worker] = []
        self.app = fleet_celery.make_app(rabbitmq.url)
        self.trace = base / "trace.jsonl"  # every worker's CAREEN_FLEET_TRACE

    def start(
        self,
        label: str,
        queues: Sequence[str],
        recipes: Sequence[Path] = (),
        env: dict[str, str] | None = None,
    ) -> Worker:
        name = f"{label}-{uuid.uuid4().hex[:6]}"
        state = self.base / f"state-{label}"
        argv = [str(CAREEN), "worker", "--name", name, "--concurrency", "1"]
        argv += [a for q in queues for a in ("--queue", q)]
        argv += [a for r in recipes for a in ("--recipe", str(r))]
        worker_env = {
            **careen_env(self.base),
            "CAREEN_STATE_DIR": str(state),
            "CAREEN_BROKER": self.rabbitmq.url,  # never on a command line: it has a password
            "OS_CLOUD": "careen-admin",
            "CAREEN_FLEET_TRACE": str(self.trace),
            **(env or {}),
        }
        log = self.base / f"worker-{label}.log"
        daemon = start_daemon(f"worker {label}", argv, env=worker_env, log=log, cwd=self.base)
        worker = Worker(label, f"{name}@{socket.gethostname()}", daemon, state)
        self.started.append(worker)
        return worker

    def pair(
        self,
        queues: tuple[Sequence[str], Sequence[str]],
        recipes: Sequence[Path] = (),
        env: dict[str, str] | None = None,
    ) -> tuple[Worker, Worker]:
        a = self.start("a", queues[0], recipes, env)
        b = self.start("b", queues[1], recipes, env)
        self.wait_ready(a, b)
        return a, b

    def wait_ready(self, *workers: Worker, timeout: float = 120) -> None:
        """Until each worker answers a ping over the broker (it consumes by then)."""
        waiting = list(workers)
        deadline = time.monotonic() + timeout
        while waiting:
            for w in waiting:
                assert w.alive(), f"worker {w.label} exited:\n{log_tail(w.daemon.log)}"
            replies = self.app.control.ping([w.node for w in waiting], timeout=1.0)
            answered = {node for reply in replies for node in reply}
            waiting = [w for w in waiting if w.node not in answered]
            assert time.monotonic() < deadline, f"workers never ready: {waiting}"

    def by_node(self, node: str) -> Worker:
        (worker,) = [w for w in self.started if w.node == node]
        return worker

    def stop(self) -> None:
        for w in self.started:
            stop_daemon(w.daemon, timeout=30)
        assert_stopped([w.pid for w in self.started])
        for w in self.started:
            runs = w.state / "runs"
            journals = list(runs.glob("*.journal")) if runs.exists() else []
            assert journals == [], [j.read_text() for j in journals]
        self.app.close()


@pytest.fixture
def workers(rabbitmq: RabbitMQ, tmp_path: Path) -> Iterator[Workers]:
    """Start workers with `workers.pair(...)`; all are stopped (and checked gone, with
    nothing left in their state directories) at the end."""
    started = Workers(rabbitmq, tmp_path)
    try:
        yield started
    finally:
        started.stop()


def make_plan(run: Any, out: Path, recipe: Path, queue: str, *filters: str) -> dict[str, Any]:
    proc = run(
        "fleet",
        "plan",
        "-o",
        str(out),
        "--force",
        "-r",
        str(recipe),
        "--queue",
        queue,
        "--format",
        "json",
        "--backend",
        "host",
        *filters,
        "-x",
        "careen_source_image=*",  # never what an earlier refit made from the sources
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def coordinator_env(run: Any, rabbitmq: RabbitMQ, trace: Path) -> dict[str, str]:
    return {
        "CAREEN_STATE_DIR": str(run.state),
        "OS_CLOUD": "careen-admin",
        "CAREEN_BROKER": rabbitmq.url,
        "CAREEN_FLEET_TRACE": str(trace),
    }


def start_coordinator(
    tmp_path: Path, run: Any, rabbitmq: RabbitMQ, plan: Path, trace: Path, jobs: int = 1
) -> subprocess.Popen[str]:
    env = {**careen_env(tmp_path), **coordinator_env(run, rabbitmq, trace)}
    argv = ["fleet", "run", str(plan), "--engine", "celery", "--jobs", str(jobs)]
    return subprocess.Popen(
        [str(CAREEN), *argv, "--format", "json"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def events(trace: Path, source: str | None = None) -> list[dict[str, Any]]:
    if not trace.exists():
        return []
    found = [json.loads(line) for line in trace.read_text().splitlines()]
    return [e for e in found if source is None or e["source"] == source]


def wait_in_the_middle(
    fleet: Fleet, trace: Path, sid: str, new_id: str, coordinator: subprocess.Popen[str]
) -> dict[str, Any]:
    """The start event of the refit of `sid` once its new image exists in Glance and is
    not yet active: the refit is in the middle of the work."""
    deadline = time.monotonic() + 300
    while True:
        assert coordinator.poll() is None, coordinator.communicate()
        assert time.monotonic() < deadline, "the refit never got under way"
        starts = [e for e in events(trace, sid) if e["event"] == "start"]
        if starts:
            found = fleet.cloud.admin_images.get(f"/images/{new_id}")
            if found.status_code == 200:
                status = found.json()["status"]
                assert status != "active", "the refit finished before it could be killed"
                return starts[-1]
        time.sleep(0.2)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def finish(
    coordinator: subprocess.Popen[str], plan: Path, timeout: float = 600
) -> tuple[int, dict[str, Any], str]:
    """The coordinator's exit status, report (from the file: an interrupted run prints
    none) and standard error."""
    _, err = coordinator.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    report: dict[str, Any] = json.loads(plan.with_suffix(".report.json").read_text())
    return coordinator.returncode, report, err


def refits_running(*new_ids: str) -> list[int]:
    """careen refit processes still at work on one of these new image IDs."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if any(i.encode() in cmdline for i in new_ids):
                found.append(int(entry))
    return found


def roll_back(run: Any, plan: Path, fleet: Fleet, digest: str) -> None:
    back = run("fleet", "rollback", str(plan))
    assert back.returncode == 0, back.stderr
    assert new_images(fleet.cloud, digest) == []


def _killed_mid_image(
    fleet: Fleet,
    fleet_careen: Any,
    workers: Workers,
    rabbitmq: RabbitMQ,
    tmp_path: Path,
    what: str,
) -> tuple[Worker, Worker, list[dict[str, Any]]]:
    """Refit one image with two workers on one queue; SIGKILL `what` ("pool": the
    process running the task; "worker": the worker's main process) while the image is
    in the middle of its refit. Returns the killed worker, the other and the image's
    trace; checks that the image was published once."""
    recipe, digest = fleet_recipe(tmp_path, f"celery-{what}")
    queue = f"careen-t-{uuid.uuid4().hex[:8]}"
    sid = IDS["deb-public"]
    out = tmp_path / f"{what}.json"
    data = make_plan(fleet_careen, out, recipe, queue, "-w", "name=fleet-deb-public")
    workers.pair(([queue], [queue]), recipes=[recipe])
    trace = workers.trace
    coordinator = start_coordinator(tmp_path, fleet_careen, rabbitmq, out, trace)
    first = derive_id(data["fleet_id"], sid, digest, 1)
    start = wait_in_the_middle(fleet, trace, sid, first, coordinator)
    killed = workers.by_node(start["worker"])
    other = next(w for w in workers.started if w is not killed)
    assert parent_of(start["pid"]) == killed.pid  # the task runs in a pool process
    os.kill(start["pid"] if what == "pool" else killed.pid, signal.SIGKILL)
    code, report, err = finish(coordinator, out)
    assert code == 0, err
    (done,) = report["succeeded"]
    assert done["source_id"] == sid
    # The killed attempt's ID is spent (its refit rolled back, or the task's second
    # delivery found the leftover): the coordinator handed out attempt 2.
    assert done["new_id"] == derive_id(data["fleet_id"], sid, digest, 2), err
    made = new_images(fleet.cloud, digest)
    assert [(i["id"], i["status"]) for i in made] == [(done["new_id"], "active")]
    trace_of = events(trace, sid)
    # Attempt 1 went out once and came back once (the broker's redelivery, which found
    # the ID spent); attempt 2 ran once, to the end. The killed process never ended.
    runs = [(e["event"], e["attempt"]) for e in trace_of]
    assert sorted(runs) == sorted(
        [("start", 1), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    ), trace_of
    assert start["pid"] not in {e["pid"] for e in trace_of if e["event"] == "end"}
    assert refits_running(first, done["new_id"]) == []
    roll_back(fleet_careen, out, fleet, digest)
    return killed, other, trace_of


@pytest.mark.timeout(600)
def test_a_killed_pool_process_hands_the_image_on_and_it_is_published_once(
    fleet: Fleet, fleet_careen: Any, workers: Workers, rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    killed, other, trace = _killed_mid_image(
        fleet, fleet_careen, workers, rabbitmq, tmp_path, "pool"
    )
    assert killed.alive() and other.alive()  # the worker replaced its pool process
    # Either worker may take the redelivery and attempt 2: the killed one is free again.
    killed_pid = trace[0]["pid"]
    assert all(e["pid"] != killed_pid for e in trace[1:])


@pytest.mark.timeout(600)
def test_a_killed_worker_hands_the_image_to_the_other_and_it_is_published_once(
    fleet: Fleet, fleet_careen: Any, workers: Workers, rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    killed, other, trace = _killed_mid_image(
        fleet, fleet_careen, workers, rabbitmq, tmp_path, "worker"
    )
    assert not killed.alive() and other.alive()
    assert trace[0]["worker"] == killed.node
    assert {e["worker"] for e in trace[1:]} == {other.node}


@pytest.mark.timeout(600)
def test_an_image_that_kills_every_worker_is_dead_lettered_and_reported_failed(
    fleet: Fleet, fleet_careen: Any, workers: Workers, rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    recipe, digest = fleet_recipe(tmp_path, "celery-dead")
    queue = f"careen-t-{uuid.uuid4().hex[:8]}"
    sid = IDS["broken-noroot"]
    out = tmp_path / "dead.json"
    make_plan(fleet_careen, out, recipe, queue, "-w", "name=fleet-broken-noroot")
    a, b = workers.pair(([queue], [queue]), [recipe], env={"CAREEN_TEST_KILL_WORKER": sid})
    trace = workers.trace
    proc = fleet_careen(
        "fleet",
        "run",
        str(out),
        "--engine",
        "celery",
        "--format",
        "json",
        env=coordinator_env(fleet_careen, rabbitmq, trace),
        timeout=400,
    )
    assert proc.returncode == 1, proc.stderr
    assert "1 image(s) failed" in proc.stderr
    (failed,) = json.loads(proc.stdout)["failed"]
    assert failed["source_id"] == sid
    assert "killed its workers 4 times" in failed["error"], failed
    assert "dead-lettered to careen.dead" in failed["error"]
    starts = [e for e in events(trace, sid) if e["event"] == "start"]
    assert len(starts) == fleet_celery.DELIVERY_LIMIT + 1  # then no more: not a loop
    assert len({e["pid"] for e in starts}) == len(starts)  # a new pool process each time
    assert a.alive() and b.alive()
    with Connection(rabbitmq.url) as connection, connection.channel() as channel:
        work = fleet_celery.work_queue(queue)(channel)
        assert work.queue_declare(passive=True).message_count == 0
        dead = fleet_celery.dead_queue()(channel)
        letters = []
        while (message := dead.get(no_ack=True, accept=["json"])) is not None:
            if message.headers.get("x-first-death-queue") == queue:
                letters.append(message)
    (letter,) = letters
    assert letter.headers["x-first-death-reason"] == "delivery_limit"
    assert letter.payload[0][0]["source_id"] == sid
    assert new_images(fleet.cloud, digest) == []


@pytest.mark.timeout(600)
def test_each_image_runs_on_a_worker_of_its_queue(
    fleet: Fleet, fleet_careen: Any, workers: Workers, rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    recipe, digest = fleet_recipe(tmp_path, "celery-routes")
    east, west = (f"careen-t-{uuid.uuid4().hex[:8]}-{side}" for side in ("east", "west"))
    out = tmp_path / "routes.json"
    filters = ("-w", "name~^fleet-(deb-public|cent-shared)$")
    make_plan(fleet_careen, out, recipe, east, *filters)
    # The session's Glance has one store, so `--route STORE=QUEUE` (tested with the
    # planning) would put both images on one queue: move one by hand, as an operator may.
    data = json.loads(out.read_text())
    queues = {IDS["deb-public"]: east, IDS["cent-shared"]: west}
    for entry in data["images"]:
        entry["queue"] = queues[entry["id"]]
    out.write_text(json.dumps(data, indent=2))
    a, b = workers.pair(([east], [west]), recipes=[recipe])
    trace = workers.trace
    # One at a time: two uploads at once now and then meet "database is locked" in the
    # session Glance's SQLite, which has nothing to do with routing.
    proc = fleet_careen(
        "fleet",
        "run",
        str(out),
        "--engine",
        "celery",
        "--jobs",
        "1",
        "--format",
        "json",
        env=coordinator_env(fleet_careen, rabbitmq, trace),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {i["source_id"] for i in report["succeeded"]} == set(queues)
    ran_on = {(e["source"], e["event"], e["worker"]) for e in events(trace)}
    node = {east: a.node, west: b.node}
    assert ran_on == {(s, ev, node[q]) for s, q in queues.items() for ev in ("start", "end")}
    assert len(new_images(fleet.cloud, digest)) == 2
    roll_back(fleet_careen, out, fleet, digest)


@pytest.mark.timeout(300)
def test_a_worker_refuses_a_recipe_it_does_not_hold(
    fleet: Fleet, fleet_careen: Any, workers: Workers, rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    recipe, digest = fleet_recipe(tmp_path, "celery-refused")
    queue = f"careen-t-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "refused.json"
    make_plan(fleet_careen, out, recipe, queue, "-w", "name=fleet-deb-public")
    workers.pair(([queue], [queue]))  # the built-in recipes only
    trace = workers.trace
    proc = fleet_careen(
        "fleet",
        "run",
        str(out),
        "--engine",
        "celery",
        "--format",
        "json",
        env=coordinator_env(fleet_careen, rabbitmq, trace),
        timeout=200,
    )
    assert proc.returncode == 1, proc.stderr
    (failed,) = json.loads(proc.stdout)["failed"]
    assert f"holds no recipe with digest {digest}" in failed["error"], failed
    assert events(trace) == []  # refused before anything ran
    # The same from a sender that is not careen's coordinator.
    task = {
        "source_id": IDS["deb-public"],
        "attempt": 1,
        "new_id": str(uuid.uuid4()),
        "recipe": "reset-identity",
        "recipe_digest": "0" * 16,
        "cloud": "careen-admin",
        "refit_args": ["--backend", "host"],
        "log": str(tmp_path / "direct.log"),
        "env": {},
    }
    sent = workers.app.send_task(
        fleet_celery.TASK, args=[task], queue=fleet_celery.work_queue(queue)
    )
    result = sent.get(timeout=60)
    assert result["status"] == "refused", result
    assert "holds no recipe with digest 0000000000000000" in result["error"]
    assert new_images(fleet.cloud, digest) == []


@pytest.mark.timeout(600)
def test_a_stopped_coordinator_revokes_its_tasks_and_the_refit_rolls_back(
    fleet: Fleet, fleet_careen: Any, workers: Workers, rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    recipe, digest = fleet_recipe(tmp_path, "celery-revoke")
    queue = f"careen-t-{uuid.uuid4().hex[:8]}"
    sid = IDS["deb-public"]
    out = tmp_path / "revoke.json"
    data = make_plan(fleet_careen, out, recipe, queue, "-w", "name=fleet-deb-public")
    workers.pair(([queue], [queue]), recipes=[recipe])
    trace = workers.trace
    coordinator = start_coordinator(tmp_path, fleet_careen, rabbitmq, out, trace)
    first = derive_id(data["fleet_id"], sid, digest, 1)
    start = wait_in_the_middle(fleet, trace, sid, first, coordinator)
    coordinator.send_signal(signal.SIGTERM)
    code, report, err = finish(coordinator, out, timeout=200)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped " in err and "(interrupted; pending)" in err
    assert report["pending"] == [
        {"source_id": sid, "name": "fleet-deb-public", "state": "pending", "attempt": 1}
    ]
    # The process running the revoked task got SIGTERM: it stopped its refit, which
    # rolled back, and waited for it.
    deadline = time.monotonic() + 120
    while refits_running(first):
        assert time.monotonic() < deadline, "the revoked refit never ended"
        time.sleep(0.5)
    assert new_images(fleet.cloud, digest) == []
    ran = workers.by_node(start["worker"])
    log = ran.state / "fleet-logs" / data["fleet_id"] / f"{sid}.1.log"
    assert "careen: interrupted (SIGTERM); everything was released" in log.read_text()
    assert [e["event"] for e in events(trace, sid)] == ["start", "end"]
    assert ran.alive()
    # The next run hands out attempt 2, and the revoked attempt never comes back.
    again = fleet_careen(
        "fleet",
        "run",
        str(out),
        "--engine",
        "celery",
        "--format",
        "json",
        env=coordinator_env(fleet_careen, rabbitmq, trace),
    )
    assert again.returncode == 0, again.stderr
    (done,) = json.loads(again.stdout)["succeeded"]
    assert done["new_id"] == derive_id(data["fleet_id"], sid, digest, 2)
    assert [i["id"] for i in new_images(fleet.cloud, digest)] == [done["new_id"]]
    assert [(e["event"], e["attempt"]) for e in events(trace, sid)] == [
        ("start", 1),
        ("end", 1),
        ("start", 2),
        ("end", 2),
    ]
    roll_back(fleet_careen, out, fleet, digest)
