"""The one function that refits one image of a fleet, whoever calls it.

`fleet run --jobs N` calls it in N threads of the coordinator, and a Celery worker
calls it for each task it takes; both hand it the same JSON-able task and get the same
JSON-able result. It runs `careen refit glance:SOURCE -o glance: --new-image-id ID` as
a child process (one process per image, which dies with its caller: its rollback runs
on SIGTERM), with its output in a log file. A task names its recipe by reference and
digest; a recipe that is not here, or whose digest differs, is refused before anything
runs, so whoever can hand out tasks cannot make this host run something else. A worker
goes further, since its tasks come from the network: it runs only the recipes it holds
(the built-ins and its `--recipe` files), looked up by the task's digest, never a path
from the task; it takes image and fleet IDs only as UUIDs, passes on only the
environment variables in `WORKER_ENV`, and chooses itself where logs, traces and the
limits' slot files go.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from careen import journal, run
from careen.errors import CareenError, ExitCode
from careen.recipe import BUILTIN
from careen.recipe import load as load_recipe

# Flags a task may carry on to `careen refit`; anything else is refused.
ALLOWED_FLAGS = {
    "--backend": 1,
    "--disk-format": 1,
    "--store": 1,
    "--import": 0,
    "--retire": 1,
    "--retire-suffix": 1,
    "--verify": 0,
    "--via-glance": 0,
    "--ceph-conf": 1,
    "--ceph-user": 1,
    "--keyring": 1,
    "--rbd-pool": 1,
    "--timeout": 1,
    "--smp": 1,
    "--memsize": 1,
}
# Environment variables a task may set for a refit a worker runs: the fleet's limits
# (a worker keeps their slot files in a directory of its own).
WORKER_ENV = frozenset({"CAREEN_LIMITS", "CAREEN_LIMITS_DIR"})
# Test hook, read only from a worker's own environment (a task cannot set it): a worker
# whose CAREEN_TEST_KILL_WORKER names the task's source image SIGKILLs its own process
# when it gets that task, as an image that crashes every worker would.
TEST_KILL_WORKER = "CAREEN_TEST_KILL_WORKER"
# The trace file (see `_trace`): the coordinator's, given to its tasks; a worker's own.
TRACE = "CAREEN_FLEET_TRACE"


def check_refit_args(args: list[str]) -> None:
    i = 0
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        if flag not in ALLOWED_FLAGS:
            raise CareenError(
                f"a fleet does not pass {args[i]!r} to refit",
                hint=f"allowed: {', '.join(sorted(ALLOWED_FLAGS))}",
            )
        i += 1 if "=" in args[i] else 1 + ALLOWED_FLAGS[flag]


def _trace(path: str | None, event: str, task: Mapping[str, Any], worker: str) -> None:
    """Append a start or end line to a shared trace file (tests read the overlap)."""
    if not path:
        return
    line = json.dumps(
        {
            "event": event,
            "source": task["source_id"],
            "attempt": task["attempt"],
            "time": time.time(),
            "pid": os.getpid(),
            "worker": worker,
        }
    )
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")


def held_recipes(refs: Sequence[str]) -> dict[str, str]:
    """The recipes a worker holds, by digest: every built-in, and `refs` (built-in names
    or files, kept as absolute paths)."""
    held: dict[str, str] = {}
    for ref in [*BUILTIN, *refs]:
        kept = ref if ref in BUILTIN else str(Path(ref).absolute())
        held.setdefault(load_recipe(kept).digest, kept)
    return held


def _recipe_for(task: Mapping[str, Any], held: Mapping[str, str] | None) -> str:
    """The recipe to run: the task's own (checked) in the coordinator, the one held
    under the task's digest in a worker."""
    digest = task["recipe_digest"]
    ref = task["recipe"] if held is None else held.get(digest)
    if ref is None:
        raise CareenError(
            f"this worker holds no recipe with digest {digest} (it holds "
            f"{', '.join(f'{r} ({d})' for d, r in held.items()) if held else 'none'})",
            hint="start the worker with --recipe FILE, the same file the plan names",
        )
    recipe = load_recipe(ref)
    if recipe.digest != digest:
        raise CareenError(
            f"recipe {ref} here has digest {recipe.digest}, the task asks for {digest}",
            hint="give this host the same recipe file as the coordinator",
        )
    return ref


def _check_for_worker(task: Mapping[str, Any]) -> None:
    """What a worker checks beyond the recipe and the flags: IDs that are UUIDs (they
    name files and go on a command line), a plain cloud name, no other environment."""
    for key in ("fleet_id", "source_id", "new_id"):
        value = task.get(key)
        if not isinstance(value, str) or not _is_uuid(value):
            raise CareenError(f"the task's {key} {value!r} is not a UUID")
    if not isinstance(task["attempt"], int) or task["attempt"] < 1:
        raise CareenError(f"the task's attempt {task['attempt']!r} is not a positive number")
    cloud = task.get("cloud")
    if cloud is not None and not re.fullmatch(r"[\w.-]+", str(cloud)):
        raise CareenError(f"the task's cloud {cloud!r} is not a clouds.yaml name")
    if unknown := sorted(set(task.get("env", {})) - WORKER_ENV):
        raise CareenError(
            f"a worker does not pass {', '.join(unknown)} to refit",
            hint=f"allowed: {', '.join(sorted(WORKER_ENV))}",
        )


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def worker_log(task: Mapping[str, Any]) -> Path:
    """Where a worker keeps a task's log: under its own state directory."""
    name = f"{task['source_id']}.{task['attempt']}.log"
    return journal.state_dir() / "fleet-logs" / str(task["fleet_id"]) / name


def _refit_env(task: Mapping[str, Any], held: Mapping[str, str] | None) -> dict[str, str]:
    env = {**os.environ, "CAREEN_DIE_WITH_PARENT": "1", **task.get("env", {})}
    if held is not None and "CAREEN_LIMITS_DIR" in env:
        env["CAREEN_LIMITS_DIR"] = str(journal.state_dir() / "fleet-limits" / task["fleet_id"])
    return env


def refit_image(
    task: Mapping[str, Any], held: Mapping[str, str] | None = None, worker: str | None = None
) -> dict[str, Any]:
    """Refit one image as `task` says; never raises for a failed refit, reports it.

    `held` (digest to recipe reference) is given by a worker: it then runs the held
    recipe with the task's digest, and refuses a digest it does not hold, and a task
    that fails `_check_for_worker`; the log goes to `worker_log`, the trace to the
    worker's own CAREEN_FLEET_TRACE. `worker` names who ran it in the result (default:
    the host name). Test hook: a worker whose environment has CAREEN_TEST_KILL_WORKER
    set to the task's source image kills itself (see `TEST_KILL_WORKER`)."""
    who = worker or os.uname().nodename
    result: dict[str, Any] = {
        "source_id": task["source_id"],
        "attempt": task["attempt"],
        "new_id": task["new_id"],
        "worker": who,
    }
    try:
        recipe = _recipe_for(task, held)
        check_refit_args(list(task["refit_args"]))
        if held is not None:
            _check_for_worker(task)
    except CareenError as e:
        return {**result, "status": "refused", "error": e.message}
    log_path = Path(task["log"]) if held is None else worker_log(task)
    trace = task.get("trace") if held is None else os.environ.get(TRACE)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "careen",
        "refit",
        f"glance:{task['source_id']}",
        "-o",
        "glance:",
        "--new-image-id",
        task["new_id"],
        "-r",
        recipe,
        "--format",
        "json",
        *(["--os-cloud", task["cloud"]] if task.get("cloud") else []),
        *task["refit_args"],
    ]
    env = _refit_env(task, held)
    started = time.time()
    _trace(trace, "start", task, who)
    if held is not None and os.environ.get(TEST_KILL_WORKER) == task["source_id"]:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = run.start_child(argv, env=env, stderr=log)
            pid_file(log_path).write_text(f"{proc.pid}\n")
            try:
                out, _ = proc.communicate()
            except BaseException:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                raise
            log.write(out)
    finally:
        pid_file(log_path).unlink(missing_ok=True)
        _trace(trace, "end", task, who)
    result |= {"log": str(log_path), "started": started, "ended": time.time()}
    code = proc.returncode
    if code == ExitCode.OK:
        data = json.loads(out)
        new = data["glance"]["new_image"]
        figures = data["glance"].get("figures") or {}
        moved = figures.get("copied_bytes") or int(task.get("size") or 0) + int(
            new.get("size") or 0
        )
        return {**result, "status": "done", "new_id": new["id"], "bytes": moved}
    if code == ExitCode.ID_TAKEN:
        status = "taken"
    elif code in (ExitCode.INTERRUPTED, 128 + signal.SIGTERM, -signal.SIGTERM):
        status = "interrupted"
    else:
        status = "failed"
    return {**result, "status": status, "error": _error_line(log_path, code)}


def pid_file(log_path: Path) -> Path:
    """Where the refit's process ID is kept while it runs (a new coordinator waits for it)."""
    return log_path.with_suffix(".pid")


def _error_line(log_path: Path, code: int) -> str:
    """careen's own `careen: error:` line from the log, else the exit status."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("careen: error: "):
            return line.removeprefix("careen: error: ")
    return f"careen refit exited with status {code}"
