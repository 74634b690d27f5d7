"""Functions run in child processes by tests/test_sqlite*.py (importable under spawn)."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Counter
from workers import increment_store, wait_for

from statestore import ConflictError, StateStore
from statestore.backends.sqlite import SqliteStorage


def increment(db: str, key: str, times: int, start: str, threads: int) -> None:
    """Increment the counter ``times`` times per thread, released by the start file."""
    with SqliteStorage(db, key=key) as storage:
        store = StateStore(Counter, storage, default=Counter, timeout=60)
        increment_store(store, times, start, threads)


def hold(db: str, key: str, ready: str) -> None:
    """Write a new document inside a session, announce it, and never commit."""
    storage = SqliteStorage(db, key=key)
    with storage.session(10) as session:
        session.write(b'{\n  "schema_version": 1,\n  "count": 999,\n  "note": "uncommitted"\n}\n')
        Path(ready).write_text("held")
        time.sleep(60)


def save_expecting(db: str, key: str, revision: str, note: str, start: str, result: str) -> None:
    """``save(expect=revision)`` once released by the start file; write what happened."""
    store = StateStore(Counter, SqliteStorage(db, key=key), timeout=30)
    wait_for(start)
    try:
        store.save(Counter(count=1, note=note), expect=revision)
        Path(result).write_text("saved")
    except ConflictError:
        Path(result).write_text("conflict")
