"""Runs inside the OpenStack services' own venvs, not in the test run: every SQLite
transaction takes the write lock when it begins.

oslo.db begins each SQLite transaction with a plain, deferred `BEGIN`. A transaction that
reads and then writes has to upgrade its lock, and when another connection already holds
the write lock SQLite refuses the upgrade at once with "database is locked": its busy
timeout cannot help there, since waiting could deadlock. Nova's `createImage` runs into
that about one time in six with several services on one database. `BEGIN IMMEDIATE`
takes the write lock up front, and waits for it with the busy timeout like any other lock.

`install()` adds a listener to SQLAlchemy's `Engine` class; class listeners run before the
one oslo.db adds to each engine, and `in_transaction` in the connection's info is the
mark oslo.db's own listener checks before it emits its `BEGIN` (oslo.db 18, pinned in
scripts/services/). The WSGI shims and `run_service` install it.
"""

from __future__ import annotations

from typing import Any

# oslo.db's mark for "BEGIN already emitted on this connection".
_OSLO_DB_MARK = "in_transaction"


def _begin_immediate(conn: Any) -> None:
    if conn.dialect.name == "sqlite" and _OSLO_DB_MARK not in conn.info:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.info[_OSLO_DB_MARK] = True


def install() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "begin", _begin_immediate):
        event.listen(Engine, "begin", _begin_immediate)
