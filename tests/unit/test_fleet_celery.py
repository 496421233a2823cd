"""The Celery engine's pure parts: queue arguments, the app's settings, the results a
coordinator records, and what a worker refuses before anything runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from careen.errors import UsageError
from careen.fleet import celery as fleet_celery
from careen.fleet import command, task
from careen.recipe import BUILTIN
from careen.recipe import load as load_recipe

TASK: dict[str, Any] = {
    "fleet_id": "0b6c3f56-6ad4-4a4c-9d5e-2f0f4a4f8c01",
    "source_id": "5f0d5a0e-8f43-4d6b-a3c4-8d1f0f7d7a11",
    "attempt": 2,
    "new_id": "7d3a0c52-2a6b-5b9e-8f1c-3c9e4e1b2d22",
}


def test_work_queues_are_quorum_queues_that_dead_letter_after_the_delivery_limit() -> None:
    queue = fleet_celery.work_queue("east")
    assert (queue.name, queue.routing_key, queue.exchange.name) == ("east", "east", "east")
    assert queue.durable
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": fleet_celery.DELIVERY_LIMIT,
        "x-dead-letter-exchange": fleet_celery.DEAD,
    }
    assert fleet_celery.work_queue("east", 7).queue_arguments["x-delivery-limit"] == 7
    dead = fleet_celery.dead_queue()
    assert dead.name == dead.exchange.name == "careen.dead"
    assert dead.exchange.type == "fanout"  # every coordinator sees every dead letter
    assert dead.queue_arguments == {"x-queue-type": "quorum"}


def test_the_app_accepts_only_json_and_acknowledges_late() -> None:
    app = fleet_celery.make_app("amqp://u:p@127.0.0.1:1/v", {}, ["east", "west"])
    conf = app.conf
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
    assert conf.accept_content == conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.result_backend == "rpc://"
    assert [q.name for q in conf.task_queues] == ["east", "west"]
    assert not conf.task_create_missing_queues
    assert fleet_celery.TASK in app.tasks
    steps = conf.worker_consumer.Blueprint.default_steps
    assert not [s for s in steps if "delayed_delivery" in s]
    assert any(s.endswith(":Tasks") for s in steps)


def test_results_from_celery_become_refit_results() -> None:
    done = {**TASK, "status": "done"}
    assert fleet_celery.task_outcome(TASK, "SUCCESS", done) is done
    revoked = fleet_celery.task_outcome(TASK, "REVOKED", Exception("revoked"))
    assert revoked["status"] == "interrupted" and revoked["new_id"] == TASK["new_id"]
    failed = fleet_celery.task_outcome(TASK, "FAILURE", KeyError("log"))
    assert failed["status"] == "failed" and "KeyError" in failed["error"]
    dead = fleet_celery.dead_result(TASK, 3)
    assert dead["status"] == "failed" and dead["source_id"] == TASK["source_id"]
    assert "killed its workers 4 times" in dead["error"] and "careen.dead" in dead["error"]


def test_node_names_are_unique_unless_named() -> None:
    assert fleet_celery.node_name("east-1@host9") == "east-1@host9"
    assert fleet_celery.node_name("east-1").startswith("east-1@")
    assert fleet_celery.node_name(None) != fleet_celery.node_name(None)


def _task(tmp_path: Path, **over: Any) -> dict[str, Any]:
    base = {
        **TASK,
        "recipe": "/on/the/coordinator.yaml",
        "recipe_digest": load_recipe("empty").digest,
        "refit_args": [],
        "log": str(tmp_path / "log"),
        "env": {},
    }
    return base | over


def test_a_worker_holds_the_built_ins_and_its_files(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("steps:\n  - delete: /var/tmp/x\n")
    held = task.held_recipes([str(mine)])
    assert held[load_recipe(str(mine)).digest] == str(mine)
    assert sorted(held.values()) == sorted([*BUILTIN, str(mine)])


def test_a_worker_refuses_a_digest_it_does_not_hold(tmp_path: Path) -> None:
    held = task.held_recipes([])
    result = task.refit_image(_task(tmp_path, recipe_digest="0" * 16), held, "w1@h")
    assert result["status"] == "refused" and result["worker"] == "w1@h"
    assert "holds no recipe with digest 0000000000000000" in result["error"]
    assert not (tmp_path / "log").exists()


def test_a_worker_refuses_a_held_file_that_changed_since_it_started(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("steps:\n  - delete: /var/tmp/x\n")
    held = task.held_recipes([str(mine)])
    digest = load_recipe(str(mine)).digest
    mine.write_text("steps:\n  - delete: /var/tmp/y\n")
    result = task.refit_image(_task(tmp_path, recipe_digest=digest), held)
    assert result["status"] == "refused" and f"asks for {digest}" in result["error"]


def test_a_worker_passes_on_only_the_fleet_limits(tmp_path: Path) -> None:
    held = task.held_recipes([])
    result = task.refit_image(_task(tmp_path, env={"LD_PRELOAD": "/tmp/x.so"}), held)
    assert result["status"] == "refused" and "LD_PRELOAD" in result["error"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("source_id", "x\n* * * * * root sh -c evil"),
        ("new_id", "../../etc/cron.d/x"),
        ("fleet_id", None),
        ("attempt", "1"),
        ("cloud", "a b"),
    ],
)
def test_a_worker_takes_ids_only_as_uuids(tmp_path: Path, key: str, value: Any) -> None:
    result = task.refit_image(_task(tmp_path, **{key: value}), task.held_recipes([]))
    assert result["status"] == "refused" and key.removesuffix("_id") in result["error"]


def test_a_worker_keeps_logs_and_traces_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAREEN_STATE_DIR", str(tmp_path / "state"))
    log = task.worker_log(_task(tmp_path))
    assert log == (
        tmp_path / "state" / "fleet-logs" / TASK["fleet_id"] / f"{TASK['source_id']}.2.log"
    )
    limits = {"CAREEN_LIMITS": "downloads=1", "CAREEN_LIMITS_DIR": "/etc"}
    env = task._refit_env(_task(tmp_path, env=limits), task.held_recipes([]))
    assert env["CAREEN_LIMITS"] == "downloads=1"
    assert env["CAREEN_LIMITS_DIR"] == str(tmp_path / "state" / "fleet-limits" / TASK["fleet_id"])
    assert task._refit_env(_task(tmp_path, env=limits), None)["CAREEN_LIMITS_DIR"] == "/etc"


def test_the_celery_engine_needs_a_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAREEN_BROKER", raising=False)
    args = argparse.Namespace(engine="celery", broker=None, jobs=2)
    with pytest.raises(UsageError, match="needs a broker"):
        command._engine(args)
    with pytest.raises(UsageError, match="--broker is for --engine celery"):
        command._engine(argparse.Namespace(engine="local", broker="amqp://x", jobs=2))
