"""Celery for `careen fleet run --engine celery` (the coordinator) and `careen worker`.

The coordinator sends each image's task to the queue its plan entry names; a worker on
another host takes it and runs `task.refit_image`, the function the local engine runs,
and the result comes back over the broker (the `rpc://` backend) to the coordinator,
whose SQLite database stays the one record. The settings all follow from a task being
a long refit that publishes into Glance at most once:

- JSON only: workers run as root, and pickle would run whatever a sender wrote.
- Late acknowledgement, rejection on worker loss, prefetch 1: a task leaves the queue
  only once its refit ended, a task whose worker process died (killed, out of memory)
  goes back to the queue, and no worker holds a second task while it refits. A
  task that runs twice is harmless: its new image ID is derived from the attempt, so
  the second run finds the ID spent and the coordinator decides (`record_result`).
- Quorum queues with a delivery limit, dead-lettered to `careen.dead`: an image that
  kills every worker that takes it ends there after `DELIVERY_LIMIT` returns instead of
  going round for ever; the coordinator watches the dead letters (a fanout exchange, so
  each coordinator sees them all and the durable `careen.dead` queue keeps a copy for
  the operator) and reports such an image failed.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from celery import Celery
from celery.worker.consumer import Consumer
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError

from careen import interrupts
from careen.errors import CareenError
from careen.fleet import task as fleet_task

log = logging.getLogger(__name__)

TASK = "careen.fleet.refit"
DEAD = "careen.dead"
DELIVERY_LIMIT = 3  # returns to the queue before a task is dead-lettered
POLL = 0.5  # seconds between looks at the results and the dead letters


def work_queue(name: str, delivery_limit: int = DELIVERY_LIMIT) -> Queue:
    """A queue tasks are sent to: quorum, with a delivery limit and the dead-letter
    exchange. The coordinator and the workers declare it alike (RabbitMQ refuses a
    declaration whose arguments differ from the queue's)."""
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": DEAD,
        },
    )


def dead_exchange() -> Exchange:
    return Exchange(DEAD, type="fanout", durable=True)


def dead_queue() -> Queue:
    """Where dead-lettered tasks stay until an operator reads or purges them."""
    return Queue(DEAD, dead_exchange(), durable=True, queue_arguments={"x-queue-type": "quorum"})


def declare_dead_letters(connection: Connection) -> None:
    """The dead-letter exchange and its queue: without them the broker would drop a task
    that reached its delivery limit."""
    with connection.channel() as channel:
        dead_queue()(channel).declare()


def dead_result(task: Mapping[str, Any], delivery_limit: int = DELIVERY_LIMIT) -> dict[str, Any]:
    """The result the coordinator records for a task the broker dead-lettered."""
    deliveries = delivery_limit + 1
    return {
        "source_id": task["source_id"],
        "attempt": task["attempt"],
        "new_id": task["new_id"],
        "status": "failed",
        "error": f"the image killed its workers {deliveries} times (each delivery of its task "
        f"ended with the worker's process gone) and was dead-lettered to {DEAD}",
    }


def task_outcome(task: Mapping[str, Any], state: str, value: Any) -> dict[str, Any]:
    """A Celery result as a `refit_image` result: a revoked task was interrupted (its
    refit rolls back), a task that raised failed."""
    if state == "SUCCESS" and isinstance(value, dict):
        return value
    base = {"source_id": task["source_id"], "attempt": task["attempt"], "new_id": task["new_id"]}
    if state == "REVOKED":
        return {**base, "status": "interrupted", "error": "revoked"}
    return {**base, "status": "failed", "error": f"the worker's task ended with {value!r}"}


class _Consumer(Consumer):  # type: ignore[misc]  # celery has no type information
    """Celery's consumer without native delayed delivery: careen sends no task with an
    ETA, and it would declare 28 queues and exchanges in the broker for them."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            s for s in Consumer.Blueprint.default_steps if "delayed_delivery" not in s
        ]


def make_app(
    broker: str, held: Mapping[str, str] | None = None, queues: Sequence[str] = ()
) -> Celery:
    """The Celery app: the coordinator's (no `held`) or a worker's, which runs only the
    recipes in `held` (digest to reference) and consumes `queues`."""
    app = Celery("careen", broker=broker, backend="rpc://", set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A worker that loses the broker mid-refit stops it (it rolls back): the broker
        # hands the unacknowledged task to another worker meanwhile.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_queues=[work_queue(q) for q in queues],
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": True},
        worker_hijack_root_logger=False,
        worker_consumer=_Consumer,
    )

    @app.task(name=TASK, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def refit(self: Any, task: dict[str, Any]) -> dict[str, Any]:
        return fleet_task.refit_image(task, held=held or {}, worker=self.request.hostname)

    return app


def broker_errors(connection: Connection) -> tuple[type[BaseException], ...]:
    """What kombu raises when the broker is unreachable or refuses an operation."""
    return (OperationalError, *connection.connection_errors, *connection.channel_errors)


def _broker_error(app: Celery, e: BaseException) -> CareenError:
    where = app.connection_for_write().as_uri()  # the password masked
    return CareenError(
        f"cannot use the broker {where}: {e}",
        hint="check --broker (or CAREEN_BROKER) and that RabbitMQ runs there",
    )


def check_broker(app: Celery) -> None:
    """Connect once, and declare the dead letters (a worker does before it consumes)."""
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=3)
            declare_dead_letters(connection)
        except broker_errors(connection) as e:
            raise _broker_error(app, e) from e


class CeleryEngine:
    """`fleet run --engine celery`: tasks go to workers over RabbitMQ, `jobs` at once.

    A handle is the Celery task ID. `wait` looks at the results (from the `rpc://`
    reply queue) and at the dead letters, which reach this coordinator through a queue
    of its own bound to the dead-letter exchange."""

    # A task still queued when its coordinator was killed may run after the next run
    # handed its image out again: `run.published` spends the old attempt's ID first, so
    # such a task finds its ID taken and publishes nothing.

    def __init__(self, broker: str, delivery_limit: int = DELIVERY_LIMIT) -> None:
        self.app = make_app(broker)
        self.delivery_limit = delivery_limit
        self.tasks: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self.dead: set[str] = set()
        self.connection = self.app.connection_for_write()
        self.errors = broker_errors(self.connection)
        try:
            self.connection.ensure_connection(max_retries=3)
            declare_dead_letters(self.connection)
            self.channel = self.connection.channel()
            watch = Queue(f"{DEAD}.{uuid.uuid4()}", dead_exchange(), exclusive=True)
            self.watch = watch(self.channel)
            self.watch.declare()
        except self.errors as e:
            self.connection.release()
            raise _broker_error(self.app, e) from e

    def submit(self, task: dict[str, Any], queue: str) -> str:
        task_id = str(uuid.uuid4())
        self.tasks[task_id] = task  # before it leaves: a dead letter may come back fast
        try:
            with interrupts.critical():  # never half a frame on the wire
                self.results[task_id] = self.app.send_task(
                    TASK,
                    args=[task],
                    task_id=task_id,
                    queue=work_queue(queue, self.delivery_limit),
                )
        except self.errors as e:
            raise _broker_error(self.app, e) from e
        return task_id

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with interrupts.critical():
                    self._read_dead_letters()
                    done = [(h, r) for h in handles if (r := self._finished(h)) is not None]
            except self.errors as e:
                raise _broker_error(self.app, e) from e
            if done or time.monotonic() >= deadline:
                for handle, _ in done:
                    del self.tasks[handle], self.results[handle]
                    self.dead.discard(handle)
                return done
            time.sleep(min(POLL, max(deadline - time.monotonic(), 0)))

    def _read_dead_letters(self) -> None:
        while (message := self.watch.get(no_ack=True, accept=["json"])) is not None:
            task_id = message.headers.get("id")
            if task_id in self.tasks:
                log.warning("task %s was dead-lettered", task_id)
                self.dead.add(task_id)

    def _finished(self, handle: str) -> dict[str, Any] | None:
        task = self.tasks[handle]
        if handle in self.dead:
            return dead_result(task, self.delivery_limit)
        result = self.results[handle]
        if not result.ready():
            return None
        return task_outcome(task, result.state, result.result)

    def cancel(self, handles: Sequence[Any]) -> None:
        """Revoke the tasks: a worker drops one it has not started, and sends SIGTERM to
        the process running one, which stops its refit (it rolls back) and waits for it."""
        if handles:
            with interrupts.critical():
                self.app.control.revoke(list(handles), terminate=True, signal="SIGTERM")

    def close(self) -> None:
        try:
            self.channel.close()
        finally:
            self.connection.release()
            self.app.close()


def node_name(name: str | None) -> str:
    """A worker's Celery node name: NAME@HOST; unique when no name is given."""
    base = name or f"careen-{uuid.uuid4().hex[:8]}"
    return base if "@" in base else f"{base}@{socket.gethostname()}"
