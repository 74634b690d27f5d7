"""statestore over its SQLite backend (``SqliteStorage``: one row, WAL, ``BEGIN IMMEDIATE``),
through the public store API only, so it is comparable with ``sqlite_wal`` (raw ``sqlite3``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from statestore import StateStore
from statestore.backends.sqlite import SqliteStorage

LOCK_TIMEOUT_S = 120.0


class StateStoreSqliteContender:
    def __init__(self, path: str, model: type[BaseModel], durable: bool) -> None:
        self.model = model
        self.storage = SqliteStorage(path + ".db", key="state", durable=durable)
        self.store: Any = StateStore(model, self.storage, default=model(), timeout=LOCK_TIMEOUT_S)

    def create(self, doc: BaseModel) -> None:
        self.store.update(lambda _current: doc.model_copy(deep=True))

    def update_increment(self, on_enter: Any = None) -> None:
        def bump(state: Any) -> None:
            if on_enter is not None:
                on_enter()
            state.counter += 1

        self.store.update(bump)

    def read(self) -> Any:
        return self.store.load()

    def close(self) -> None:
        self.storage.close()


def make(path: str, model: type[BaseModel], durable: bool = True) -> StateStoreSqliteContender:
    return StateStoreSqliteContender(path, model, durable)
