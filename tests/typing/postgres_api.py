"""Usage examples of the PostgreSQL backend that must type-check under mypy --strict."""

from __future__ import annotations

from contextlib import AbstractContextManager

from pydantic import BaseModel
from typing_extensions import assert_type

from statestore import StateStore
from statestore.backends import Session, Storage
from statestore.backends.postgres import PostgresSession, PostgresStorage


class Counter(BaseModel):
    count: int = 0


def inference(conninfo: str) -> None:
    storage = PostgresStorage(conninfo, key="jobs")
    store = StateStore(Counter, storage, default=Counter)
    assert_type(store, StateStore[Counter])
    assert_type(store.load(), Counter)
    assert_type(StateStore(Counter, PostgresStorage(conninfo, key="jobs")), StateStore[Counter])
    with store.transaction() as state:
        assert_type(state, Counter)


def options(conninfo: str) -> None:
    with PostgresStorage(
        conninfo,
        key="jobs",
        table="app_state",
        schema="app",
        backup_table="app_state_backups",
        durable=False,
        max_idle=4,
    ) as storage:
        assert_type(storage, PostgresStorage)
        assert_type(storage.location, str)
        assert_type(storage.lock_id, int)
        assert_type(storage.read(), bytes | None)
        held: AbstractContextManager[PostgresSession] = storage.session(5.0)
        del held
        with storage.session(5.0) as session:
            assert_type(session.backend_pid, int)
            assert_type(session.read(), bytes | None)
            session.write(b"{}")


def protocols(conninfo: str) -> None:
    storage: Storage = PostgresStorage(conninfo, key="jobs")
    with storage.session(1.0) as session:
        assert_type(session, Session)


def rejected(conninfo: str) -> None:
    PostgresStorage(conninfo)  # type: ignore[call-arg]
    PostgresStorage(conninfo, "jobs")  # type: ignore[call-arg]
    PostgresStorage(conninfo, key=1)  # type: ignore[arg-type]
