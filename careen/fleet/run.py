"""`careen fleet run|retire|rollback PLAN`: refit a planned fleet, resumably.

Before any work, a run reconciles the database with the world: it waits for refits a
killed coordinator left running (they roll back when it dies), lets `careen cleanup`
release what dead ones left, and asks Glance about every attempt still marked running:
the new image ID derived from it is either active (the attempt published: done) or not
(the image is deleted if a leftover, and the source is pending again, for a new attempt
with a new ID). Then it hands out each pending image: it checks that the source has not
changed since planning, records the attempt, and gives the task to the engine.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from careen import interrupts, recover
from careen.errors import CareenError
from careen.fleet import task as fleet_task
from careen.fleet.display import Lines
from careen.fleet.plan import Plan
from careen.fleet.state import Row, State, derive_id
from careen.glance import publish
from careen.glance.cloud import Cloud
from careen.glance.source import SourceImage

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # per image, counting attempts whose ID was found spent
WAIT_FOR_ORPHANS = 120.0  # seconds a dying refit of a killed coordinator gets to roll back


@dataclass(frozen=True)
class Paths:
    plan: Path

    @property
    def db(self) -> Path:
        return self.plan.with_suffix(".db")

    @property
    def logs(self) -> Path:
        return self.plan.with_suffix(".logs")

    @property
    def report_json(self) -> Path:
        return self.plan.with_suffix(".report.json")

    @property
    def report_csv(self) -> Path:
        return self.plan.with_suffix(".report.csv")

    def log(self, source_id: str, attempt: int) -> Path:
        return self.logs / f"{source_id}.{attempt}.log"


@dataclass
class RunOptions:
    jobs: int = 1
    max_failures: int | None = None
    canary: int | None = None
    retry_failed: bool = False
    trace: str | None = None  # a file where tasks append their start and end
    env: dict[str, str] = field(default_factory=dict)  # for the refits (limits...)
    extra_args: list[str] = field(default_factory=list)  # for the refits, after the plan's
    retire: str = "keep"


@dataclass
class Outcome:
    stopped: str | None = None  # why no more work was started, if it stopped early
    finished: list[str] = field(default_factory=list)  # the lines printed as images ended


# --- reconciling -----------------------------------------------------------------------


def _alive(pid: int, new_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return new_id.encode() in cmdline


def wait_for_orphans(state: State, paths: Paths, deadline: float = WAIT_FOR_ORPHANS) -> None:
    """Refits a dead coordinator handed out die with it (SIGTERM) and roll back: wait for
    them; kill one that takes longer than `deadline` (cleanup then releases its work)."""
    for row in state.rows("running"):
        assert row.new_id is not None
        pid_path = fleet_task.pid_file(paths.log(row.source_id, row.attempt))
        try:
            pid = int(pid_path.read_text())
        except (OSError, ValueError):
            continue
        end = time.monotonic() + deadline
        while _alive(pid, row.new_id):
            if time.monotonic() > end:
                log.warning("refit %d of %s did not stop: killing it", pid, row.source_id)
                os.kill(pid, signal.SIGKILL)
                end = time.monotonic() + 10
            time.sleep(0.5)
        pid_path.unlink(missing_ok=True)


def published(cloud: Cloud, row: Row, digest: str) -> dict[str, Any] | None:
    """The image the row's attempt published, if it did: active, of this source and
    recipe, with Glance's hash (Glance computed it from the data it holds), finished.

    Otherwise the attempt's ID is spent before the row is handed out again: an unfinished
    image there is deleted, and an ID nobody used yet is taken and deleted at once (Glance
    never gives a deleted ID out again). A task of that attempt still waiting in a queue,
    or still running on a host careen cannot see, can then never publish."""
    assert row.new_id is not None
    for _ in range(3):
        found = cloud.request(
            "GET", f"/images/{row.new_id}", ok=(200, 404), what="look for an attempt's image"
        )
        if found.status_code == 404:
            if _spend(cloud, row, digest):
                return None
            continue  # someone created it meanwhile: look at it
        image: dict[str, Any] = found.json()
        ours = image.get("careen_source_image") == row.source_id and (
            image.get("careen_recipe_digest") == digest
        )
        if not ours:
            raise CareenError(
                f"image {row.new_id} (derived for {row.source_id}) is not this fleet's work",
                hint="look at that image; careen leaves it alone",
            )
        finished = "careen_run" not in image and image.get("os_hash_value")
        if image.get("status") == "active" and finished:
            return image
        log.warning("deleting %s, an unfinished attempt for %s", row.new_id, row.source_id)
        cloud.request("DELETE", f"/images/{row.new_id}", ok=(204, 404), what="delete a leftover")
        return None
    raise CareenError(
        f"the image ID {row.new_id} keeps changing under careen",
        hint="another coordinator may be running this plan: stop it first",
    )


def _spend(cloud: Cloud, row: Row, digest: str) -> bool:
    """Take the attempt's ID with an empty image and delete it; False when someone else's
    image holds it by now."""
    body = {
        "id": row.new_id,
        "name": f"careen-spent-attempt-{row.attempt}",
        "disk_format": "raw",
        "container_format": "bare",
        "visibility": "private",
        "os_hidden": True,
        "careen_source_image": row.source_id,
        "careen_recipe_digest": digest,
    }
    made = cloud.request(
        "POST", "/images", ok=(201, 409), what="spend an attempt's image ID", json=body
    )
    if made.status_code == 409:
        gone = cloud.request(
            "GET", f"/images/{row.new_id}", ok=(200, 404), what="look for an attempt's image"
        )
        return bool(gone.status_code == 404)  # used and deleted before: spent already
    cloud.request("DELETE", f"/images/{row.new_id}", ok=(204, 404), what="spend an image ID")
    return True


def reconcile(cloud: Cloud, state: State, plan: Plan, paths: Paths) -> list[str]:
    """Bring every row marked running in line with Glance; return what was found."""
    wait_for_orphans(state, paths)
    report = recover.cleanup()
    found = list(report.actions)
    for row in state.rows("running"):
        image = published(cloud, row, plan.recipe["digest"])
        if image is not None:
            state.update(row.source_id, state="done", ended=time.time())
            found.append(f"{row.source_id}: attempt {row.attempt} had published {row.new_id}")
        else:
            state.update(row.source_id, state="pending")
            found.append(f"{row.source_id}: attempt {row.attempt} did not publish; pending")
    return found


# --- handing out -----------------------------------------------------------------------


def changed(cloud: Cloud, plan: Plan, source_id: str) -> str | None:
    """Why the source may not be refitted as planned, or None."""
    from careen.fleet.plan import checksum_of

    found = cloud.request(
        "GET", f"/images/{source_id}", ok=(200, 404), what="check the source image"
    )
    if found.status_code == 404:
        return "deleted since planning"
    image = found.json()
    entry = plan.entry(source_id)
    if image.get("updated_at") != entry.updated_at or checksum_of(image) != entry.checksum:
        return f"changed since planning (updated_at {image.get('updated_at')})"
    return None


def make_task(plan: Plan, paths: Paths, row: Row, opts: RunOptions, verify: bool) -> dict[str, Any]:
    assert row.new_id is not None
    entry = plan.entry(row.source_id)
    args = [*plan.refit_args, *opts.extra_args, *(["--verify"] if verify else [])]
    return {
        "fleet_id": plan.fleet_id,
        "source_id": row.source_id,
        "attempt": row.attempt,
        "new_id": row.new_id,
        "recipe": plan.recipe["ref"],
        "recipe_digest": plan.recipe["digest"],
        "cloud": plan.cloud,
        "refit_args": args,
        "size": entry.size,
        "log": str(paths.log(row.source_id, row.attempt)),
        "trace": opts.trace,
        "env": opts.env,
    }


class Engine(Protocol):
    """Who runs the tasks: threads of this process (`LocalEngine`) or Celery workers."""

    def submit(self, task: dict[str, Any], queue: str) -> Any:
        """Start `task`; return a handle for `wait`."""

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        """The handles that finished within `timeout` seconds, with their results."""

    def cancel(self, handles: Sequence[Any]) -> None:
        """Ask the running tasks to stop (they roll back and report `interrupted`)."""

    def close(self) -> None: ...


class LocalEngine:
    """`--jobs N`: N threads, each running one `careen refit` child process at a time."""

    def __init__(self, jobs: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="careen-fleet")
        self.tasks: dict[Future[dict[str, Any]], dict[str, Any]] = {}

    def submit(self, task: dict[str, Any], queue: str) -> Future[dict[str, Any]]:
        future = self.pool.submit(fleet_task.refit_image, task)
        self.tasks[future] = task
        return future

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        done, _ = wait(list(handles), timeout=timeout, return_when=FIRST_COMPLETED)
        for f in done:
            del self.tasks[f]
        return [(f, f.result()) for f in done]

    def cancel(self, handles: Sequence[Any]) -> None:
        # A SIGTERM that the coordinator alone received goes on to its refits (Ctrl-C
        # from a terminal has reached them already).
        for handle in handles:
            pid_path = fleet_task.pid_file(Path(self.tasks[handle]["log"]))
            with suppress(OSError, ValueError):
                os.kill(int(pid_path.read_text()), signal.SIGTERM)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def record_result(
    cloud: Cloud, state: State, plan: Plan, result: dict[str, Any], retire: str = "keep"
) -> str:
    """Write a task's result to its row; return the line that tells it. A row whose
    attempt found its ID spent (a leftover deleted) goes back to pending, for a new
    attempt, until MAX_ATTEMPTS."""
    sid = str(result["source_id"])
    row = state.row(sid)
    name = plan.entry(sid).name
    status = result["status"]
    common = {"log": result.get("log"), "ended": result.get("ended") or time.time()}
    if status == "taken":
        if published(cloud, row, plan.recipe["digest"]) is not None:
            status, result = "done", {**result, "bytes": None}
        elif row.attempt < MAX_ATTEMPTS:
            state.update(sid, state="pending", error=result.get("error"), **common)
            return f"again   {sid} {name!r}: attempt {row.attempt}'s ID was spent; pending"
    if status == "done":
        retired = None if retire == "keep" else retire
        state.update(
            sid,
            state="done",
            new_id=result["new_id"],
            bytes=result.get("bytes"),
            error=None,
            old_name=name,
            retired=retired,
            **common,
        )
        return f"done    {sid} {name!r} -> {result['new_id']}"
    if status == "interrupted":
        state.update(sid, state="pending", error="interrupted", **common)
        return f"stopped {sid} {name!r} (interrupted; pending)"
    error = str(result.get("error") or status)
    state.update(sid, state="failed", error=error, **common)
    return f"failed  {sid} {name!r}: {error}"


def run(
    cloud: Cloud,
    plan: Plan,
    paths: Paths,
    state: State,
    opts: RunOptions,
    engine: Engine,
    display: Lines | None = None,
) -> Outcome:
    """Hand out the pending images, at most `opts.jobs` at once, and record the results."""
    show = display or Lines(print)
    if opts.retry_failed:
        for row in state.rows("failed"):
            state.update(row.source_id, state="pending", error=None)
    for line in reconcile(cloud, state, plan, paths):
        show.say(f"reconciled: {line}")
    outcome = Outcome()
    failures = 0
    started = 0
    running: dict[Any, str] = {}
    queue = [r.source_id for r in state.rows("pending")]
    try:
        while queue or running:
            while queue and len(running) < opts.jobs and outcome.stopped is None:
                if opts.canary is not None and started >= opts.canary:
                    outcome.stopped = f"canary: {started} image(s) refitted; look at them first"
                    break
                sid = queue.pop(0)
                entry = plan.entry(sid)
                why = changed(cloud, plan, sid)
                if why is not None:
                    state.update(sid, state="skipped", error=why)
                    show.say(f"skipped {sid} {entry.name!r}: {why}")
                    continue
                attempt = state.row(sid).attempt + 1
                new_id = derive_id(plan.fleet_id, sid, plan.recipe["digest"], attempt)
                state.start(sid, attempt, new_id, worker=entry.queue)
                task = make_task(plan, paths, state.row(sid), opts, opts.canary is not None)
                running[engine.submit(task, entry.queue)] = sid
                show.started(sid, entry.name, attempt)
                started += 1
            if not running:
                break
            for handle, result in engine.wait(list(running), timeout=1.0):
                sid = running.pop(handle)
                line = record_result(cloud, state, plan, result, opts.retire)
                outcome.finished.append(line)
                show.ended(sid, line)
                if line.startswith("again"):
                    queue.append(sid)
                if line.startswith("failed"):
                    failures += 1
                    if opts.max_failures is not None and failures >= opts.max_failures:
                        outcome.stopped = f"{failures} failure(s): --max-failures reached"
    except interrupts.Interrupted:
        show.say("stopping: waiting for the running refits to roll back")
        engine.cancel(list(running))
        deadline = time.monotonic() + WAIT_FOR_ORPHANS
        while running and time.monotonic() < deadline:
            for handle, result in engine.wait(list(running), timeout=1.0):
                sid = running.pop(handle)
                show.ended(sid, record_result(cloud, state, plan, result, opts.retire))
        raise
    finally:
        engine.close()
        show.close()
    return outcome


# --- report ----------------------------------------------------------------------------


def report(plan: Plan, state: State, outcome: Outcome | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fleet_id": plan.fleet_id,
        "recipe": plan.recipe,
        "counts": state.counts(),
        "stopped": outcome.stopped if outcome else None,
        "succeeded": [],
        "failed": [],
        "skipped": [],
        "pending": [],
        "rolled_back": [],
    }
    for row in state.rows():
        item: dict[str, Any] = {"source_id": row.source_id, "name": row.name}
        if row.state == "done":
            seconds = round(row.ended - row.started, 1) if row.ended and row.started else None
            item |= {"new_id": row.new_id, "seconds": seconds, "bytes": row.bytes}
            item["retired"] = row.retired
            out["succeeded"].append(item)
        elif row.state == "failed":
            out["failed"].append(item | {"error": row.error, "log": row.log})
        elif row.state == "skipped":
            out["skipped"].append(item | {"reason": row.error})
        elif row.state == "rolled-back":
            out["rolled_back"].append(item | {"new_id": row.new_id})
        else:
            out["pending"].append(item | {"state": row.state, "attempt": row.attempt})
    return out


def write_report(paths: Paths, data: dict[str, Any]) -> None:
    paths.report_json.write_text(json.dumps(data, indent=2) + "\n")
    with paths.report_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["result", "source_id", "name", "new_id", "seconds", "bytes", "detail", "log"])
        for key, label in (
            ("succeeded", "succeeded"),
            ("failed", "failed"),
            ("skipped", "skipped"),
            ("pending", "pending"),
            ("rolled_back", "rolled back"),
        ):
            for item in data[key]:
                detail = item.get("error") or item.get("reason") or item.get("retired") or ""
                w.writerow(
                    [
                        label,
                        item["source_id"],
                        item["name"],
                        item.get("new_id") or "",
                        item.get("seconds") or "",
                        item.get("bytes") or "",
                        detail,
                        item.get("log") or "",
                    ]
                )


# --- retire and rollback ---------------------------------------------------------------


def retire(
    cloud: Cloud, plan: Plan, state: State, how: publish.Retire, suffix: str
) -> Iterator[str]:
    """Retire the old image of every done row whose new image is active."""
    for row in state.rows("done"):
        if row.retired or how is publish.Retire.KEEP:
            continue
        assert row.new_id is not None
        new = cloud.request("GET", f"/images/{row.new_id}", ok=(200, 404), what="check a new image")
        if new.status_code == 404 or new.json().get("status") != "active":
            yield f"kept    {row.source_id}: its new image {row.new_id} is not active"
            continue
        src = SourceImage(cloud.get_json(f"/images/{row.source_id}", what="show an old image"))
        done = publish.retire(cloud, src, how, suffix)
        state.update(row.source_id, retired=str(how), old_name=src.name)
        yield f"retired {row.source_id}: {done}"


def rollback(cloud: Cloud, plan: Plan, state: State) -> Iterator[str]:
    """Undo the retirement and delete the new image of every done row."""
    for row in state.rows("done"):
        assert row.new_id is not None
        how = row.retired
        if how == "rename" and row.old_name is not None:
            publish.set_field(cloud, row.source_id, "name", row.old_name, "rename back")
        elif how == "hide":
            publish.set_field(cloud, row.source_id, "os_hidden", False, "unhide")
        elif how == "deactivate":
            cloud.request("POST", f"/images/{row.source_id}/actions/reactivate", what="reactivate")
        elif how == "delete":
            yield f"kept    {row.source_id}: the old image was deleted and cannot come back"
            continue
        found = cloud.request(
            "GET", f"/images/{row.new_id}", ok=(200, 404), what="find a new image"
        )
        if found.status_code == 200:
            if found.json().get("protected"):
                publish.set_field(cloud, row.new_id, "protected", False, "unprotect")
            cloud.request(
                "DELETE", f"/images/{row.new_id}", ok=(204, 404), what="delete a new image"
            )
        state.update(row.source_id, state="rolled-back", retired=None)
        undone = {
            "rename": ", old name back",
            "hide": ", old image shown",
            "deactivate": ", old image reactivated",
        }.get(how or "", "")
        yield f"rolled back {row.source_id}: {row.new_id} deleted{undone}"


@contextmanager
def opened(plan: Plan, paths: Paths) -> Iterator[State]:
    state = State.open(paths.db, plan)
    try:
        yield state
    finally:
        state.close()
