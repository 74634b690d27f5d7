"""Functions run in child processes by tests/test_postgres.py (importable under spawn)."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Counter
from workers import increment_store

from statestore import StateStore
from statestore.backends.postgres import PostgresStorage


def increment(dsn: str, table: str, key: str, times: int, start: str, threads: int) -> None:
    """Increment the counter ``times`` times per thread, released by the start file."""
    with PostgresStorage(dsn, key=key, table=table) as storage:
        store = StateStore(Counter, storage, default=Counter, timeout=60)
        increment_store(store, times, start, threads)


def hold(dsn: str, table: str, key: str, ready: str) -> None:
    """Write a new document inside a session, announce it, and never commit."""
    storage = PostgresStorage(dsn, key=key, table=table)
    with storage.session(10) as session:
        session.write(b'{\n  "schema_version": 1,\n  "count": 999,\n  "note": "uncommitted"\n}\n')
        Path(ready).write_text(str(session.backend_pid))
        time.sleep(60)
