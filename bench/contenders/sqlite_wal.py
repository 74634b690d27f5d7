"""``sqlite3`` with one row per document (a JSON text column), WAL journal, and
``BEGIN IMMEDIATE`` around the read-modify-write; pydantic validates the JSON text the same
way as the file-based contenders. ``synchronous`` is FULL or NORMAL (two contenders)."""

from __future__ import annotations

import sqlite3
from typing import Any

from pydantic import BaseModel

BUSY_TIMEOUT_S = 120.0
DOC_ID = "state"


class SqliteContender:
    def __init__(self, path: str, model: type[BaseModel], synchronous: str) -> None:
        self.model = model
        self.synchronous = synchronous
        self.conn = sqlite3.connect(
            path + ".db", timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self.conn.execute(f"PRAGMA synchronous={synchronous}")

    def create(self, doc: BaseModel) -> None:
        c = self.conn
        c.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
        c.execute("CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        c.execute(
            "INSERT OR REPLACE INTO docs (id, body) VALUES (?, ?)", (DOC_ID, doc.model_dump_json())
        )

    def update_increment(self, on_enter: Any = None) -> None:
        c = self.conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise TimeoutError(f"sqlite busy: {exc}") from exc
            raise
        try:
            (body,) = c.execute("SELECT body FROM docs WHERE id = ?", (DOC_ID,)).fetchone()
            state: Any = self.model.model_validate_json(body)
            if on_enter is not None:
                on_enter()
            state.counter += 1
            c.execute("UPDATE docs SET body = ? WHERE id = ?", (state.model_dump_json(), DOC_ID))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def read(self) -> Any:
        row = self.conn.execute("SELECT body FROM docs WHERE id = ?", (DOC_ID,)).fetchone()
        if row is None:
            raise LookupError("document row missing")
        return self.model.model_validate_json(row[0])

    def close(self) -> None:
        self.conn.close()


def make(path: str, model: type[BaseModel], synchronous: str = "FULL") -> SqliteContender:
    return SqliteContender(path, model, synchronous)
