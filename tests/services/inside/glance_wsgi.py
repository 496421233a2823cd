"""Runs inside Glance's venv: its WSGI application for gunicorn, with every SQLite
transaction taking the write lock when it begins (see `sqlite_immediate`). Without it,
two uploads at once (a fleet's refits) fail now and then with HTTP 500, "database is
locked". Glance finds its configuration through `OS_GLANCE_CONFIG_DIR`.
"""

import sqlite_immediate

sqlite_immediate.install()

from glance.wsgi.api import application  # noqa: E402

__all__ = ["application"]
