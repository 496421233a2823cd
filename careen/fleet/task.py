"""The one function that refits one image of a fleet, whoever calls it.

`fleet run --jobs N` calls it in N threads of the coordinator, and a Celery worker
calls it for each task it takes; both hand it the same JSON-able task and get the same
JSON-able result. It runs `careen refit glance:SOURCE -o glance: --new-image-id ID` as
a child process (one process per image, which dies with its caller: its rollback runs
on SIGTERM), with its output in a log file. A task names its recipe by reference and
digest; a recipe that is not here, or whose digest differs, is refused before anything
runs, so whoever can hand out tasks cannot make this host run something else.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from careen.errors import CareenError, ExitCode
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


def _trace(path: str | None, event: str, task: Mapping[str, Any]) -> None:
    """Append a start or end line to a shared trace file (tests read the overlap)."""
    if not path:
        return
    line = json.dumps(
        {"event": event, "source": task["source_id"], "time": time.time(), "pid": os.getpid()}
    )
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")


def refit_image(task: Mapping[str, Any]) -> dict[str, Any]:
    """Refit one image as `task` says; never raises for a failed refit, reports it."""
    result: dict[str, Any] = {
        "source_id": task["source_id"],
        "attempt": task["attempt"],
        "new_id": task["new_id"],
        "worker": task.get("worker") or os.uname().nodename,
    }
    try:
        recipe = load_recipe(task["recipe"])
        if recipe.digest != task["recipe_digest"]:
            raise CareenError(
                f"recipe {task['recipe']} here has digest {recipe.digest}, the task asks for "
                f"{task['recipe_digest']}",
                hint="give this host the same recipe file as the coordinator",
            )
        check_refit_args(list(task["refit_args"]))
    except CareenError as e:
        return {**result, "status": "refused", "error": e.message}
    log_path = Path(task["log"])
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
        task["recipe"],
        "--format",
        "json",
        *(["--os-cloud", task["cloud"]] if task.get("cloud") else []),
        *task["refit_args"],
    ]
    env = {**os.environ, "CAREEN_DIE_WITH_PARENT": "1", **task.get("env", {})}
    started = time.time()
    _trace(task.get("trace"), "start", task)
    try:
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env)
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
        _trace(task.get("trace"), "end", task)
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
