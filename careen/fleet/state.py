"""The fleet's record: a SQLite database beside the plan, one row per image.

A row is `pending`, `running` (with the attempt handed out and the new image ID derived
from it, written before the work leaves the coordinator), `done` (with the new image),
`failed` (with the one-line error and its log) or `skipped` (and why). Every change is
its own committed transaction, so a coordinator killed at any point leaves a database
that says which attempts may have published; `reconcile` asks Glance which did.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careen.errors import UsageError
from careen.fleet.plan import Plan

SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    source_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempt INTEGER NOT NULL DEFAULT 0,
    new_id TEXT,
    task TEXT,
    worker TEXT,
    error TEXT,
    log TEXT,
    started REAL,
    ended REAL,
    bytes INTEGER,
    retired TEXT,
    old_name TEXT
);
"""
STATES = ("pending", "running", "done", "failed", "skipped", "rolled-back")


def derive_id(fleet_id: str, source_id: str, digest: str, attempt: int) -> str:
    """The new image's ID for one attempt: the same inputs give the same ID, anywhere."""
    return str(uuid.uuid5(uuid.UUID(fleet_id), f"{source_id}/{digest}/{attempt}"))


@dataclass
class Row:
    source_id: str
    position: int
    name: str
    state: str
    attempt: int
    new_id: str | None
    task: str | None
    worker: str | None
    error: str | None
    log: str | None
    started: float | None
    ended: float | None
    bytes: int | None
    retired: str | None
    old_name: str | None


class State:
    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    def open(cls, path: Path, plan: Plan) -> State:
        db = sqlite3.connect(path, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        state = cls(db, path)
        fleet = state.get("fleet_id")
        if fleet is None:
            with state.transaction():
                state.put("fleet_id", plan.fleet_id)
                for i, e in enumerate(plan.images):
                    db.execute(
                        "INSERT INTO images (source_id, position, name) VALUES (?, ?, ?)",
                        (e.id, i, e.name),
                    )
        elif fleet != plan.fleet_id:
            db.close()
            raise UsageError(
                f"{path} records fleet {fleet}, not this plan's {plan.fleet_id}",
                hint="move the old database away, or run the plan it belongs to",
            )
        return state

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> Any:
        return _Transaction(self.db)

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM fleet WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO fleet (key, value) VALUES (?, ?)", (key, value))

    def rows(self, *states: str) -> list[Row]:
        query = "SELECT * FROM images"
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
        cur = self.db.execute(query + " ORDER BY position", states)
        return [Row(*r) for r in cur.fetchall()]

    def row(self, source_id: str) -> Row:
        r = self.db.execute("SELECT * FROM images WHERE source_id = ?", (source_id,)).fetchone()
        return Row(*r)

    def update(self, source_id: str, **fields: Any) -> None:
        assert fields and all(k in Row.__dataclass_fields__ for k in fields)
        assert fields.get("state", "pending") in STATES
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(
            f"UPDATE images SET {sets} WHERE source_id = ?", (*fields.values(), source_id)
        )

    def start(self, source_id: str, attempt: int, new_id: str, worker: str) -> None:
        """Record the attempt before the work is handed out."""
        self.update(
            source_id,
            state="running",
            attempt=attempt,
            new_id=new_id,
            worker=worker,
            error=None,
            log=None,
            started=time.time(),
            ended=None,
        )

    def counts(self) -> dict[str, int]:
        cur = self.db.execute("SELECT state, count(*) FROM images GROUP BY state")
        return {str(s): int(n) for s, n in cur.fetchall()}


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
