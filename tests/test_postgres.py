"""The PostgreSQL backend, against a real server.

The server is named by ``STATESTORE_PG_DSN``; without it the session starts a
throwaway server of its own when PostgreSQL's programs are installed
(``tests/pg_server.py``). Only when neither works are the tests that need it
skipped, with the reason, and never when ``CI=true``: CI starts the server, so
there an unreachable one is an error. Each test works in tables of its own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pg_workers
import psycopg
import pytest
from conftest import Counter
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import BaseModel

from statestore import (
    DurabilityError,
    LockError,
    LockTimeout,
    StateCorruptError,
    StateReadError,
    StateStore,
    StateValidationError,
    StateWriteError,
)
from statestore._document import strip_stamp
from statestore.backends import Session, Storage
from statestore.backends.postgres import PostgresSession, PostgresStorage

pytestmark = pytest.mark.timeout(60)

DSN = os.environ.get(
    "STATESTORE_PG_DSN", "postgresql://statestore:statestore@127.0.0.1:5432/statestore_test"
)
#: A port nothing listens on.
DOWN = "postgresql://statestore:secret-pw@127.0.0.1:9/statestore_test?connect_timeout=2"


@pytest.fixture(scope="module")
def admin() -> Iterator[psycopg.Connection[Any]]:
    """A connection of the tests' own, to look at and change rows behind the store's back."""
    try:
        conn = psycopg.connect(DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        message = os.environ.get("STATESTORE_PG_UNAVAILABLE") or (
            f"PostgreSQL not reachable through STATESTORE_PG_DSN: {e}"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must start it (see .ci/run)", pytrace=False)
        pytest.skip(message)
    yield conn
    conn.close()


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    for t in (name, f"{name}_backups"):
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


@pytest.fixture
def storage(table: str) -> Iterator[PostgresStorage]:
    with PostgresStorage(DSN, key="jobs", table=table) as s:
        yield s


def row(admin: psycopg.Connection[Any], table: str, key: str = "jobs") -> tuple[str, Any] | None:
    try:
        found = admin.execute(
            sql.SQL("SELECT document, updated_at FROM {} WHERE key = %s").format(
                sql.Identifier(table)
            ),
            (key,),
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return None if found is None else (found[0], found[1])


def put(admin: psycopg.Connection[Any], table: str, document: str, key: str = "jobs") -> None:
    admin.execute(
        sql.SQL(
            "INSERT INTO {} (key, document) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET document = EXCLUDED.document"
        ).format(sql.Identifier(table)),
        (key, document),
    )


def terminate(admin: psycopg.Connection[Any], pid: int) -> None:
    """End a server session and wait until it is gone (termination is asynchronous)."""
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    for _ in range(500):
        gone = admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
        if gone.fetchone() is None:
            return
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} did not end")


def bump(state: Counter) -> None:
    state.count += 1


# ------------------------------------------------------------- no server needed


def test_import_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "statestore.backends.postgres")
    with pytest.raises(ImportError, match=r"pip install 'statestore\[postgres\]'"):
        import statestore.backends.postgres  # noqa: F401


def test_location_names_no_password() -> None:
    s = PostgresStorage("postgresql://app:hunter2@db.example:6543/prod", key="jobs/eu")
    assert s.location == "postgresql://db.example:6543/prod#statestore_documents/jobs/eu"
    assert s.backup_location("v1") == (
        "postgresql://db.example:6543/prod#statestore_documents_backups/jobs/eu@v1"
    )
    assert "hunter2" not in repr(s)
    other = PostgresStorage("host=db.example port=6543 dbname=prod", key="jobs", schema="app")
    assert other.location == "postgresql://db.example:6543/prod#app.statestore_documents/jobs"
    assert isinstance(s, Storage)


def test_store_names_the_document_by_its_location() -> None:
    storage = PostgresStorage("postgresql://app@db.example/prod", key="jobs")
    store = StateStore(Counter, storage)
    assert store.location == storage.location
    with pytest.raises(TypeError, match=r"not in a file; use store\.location"):
        _ = store.path


def test_durability_is_the_storages_and_durable_is_refused() -> None:
    fast = PostgresStorage("postgresql://app@db.example/prod", key="jobs", durable=False)
    assert StateStore(Counter, fast).durable is False
    assert StateStore(Counter, PostgresStorage("", key="jobs")).durable is True
    for durable in (True, False):
        with pytest.raises(TypeError, match=r"set it on the storage.*PostgresStorage"):
            StateStore(Counter, fast, durable=durable)


@pytest.mark.parametrize(
    "kwargs",
    [{"key": ""}, {"key": "a\0b"}, {"key": "k", "table": ""}, {"key": "k", "table": "x" * 64}],
    ids=["empty-key", "nul-key", "empty-table", "long-table"],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PostgresStorage(DSN, **kwargs)


def test_unparseable_conninfo_is_refused() -> None:
    with pytest.raises(ValueError, match="not a valid PostgreSQL conninfo"):
        PostgresStorage("host=x = =", key="k")


def test_server_down_gives_typed_errors() -> None:
    with PostgresStorage(DOWN, key="jobs") as s:
        store = StateStore(Counter, s, default=Counter)
        with pytest.raises(StateReadError) as read_error:
            store.load()
        with pytest.raises(LockError) as lock_error:
            store.update(bump)
    for e in (read_error.value, lock_error.value):
        assert isinstance(e, OSError)
        assert str(e).startswith("postgresql://127.0.0.1:9/statestore_test#")
        assert "check that the server is running" in str(e)
        assert "secret-pw" not in str(e)


# ---------------------------------------------------------------- with a server


def test_round_trip_through_the_store(
    admin: psycopg.Connection[Any], storage: PostgresStorage, table: str
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    assert store.load() == Counter()
    assert not store.exists()
    assert row(admin, table) is None

    assert store.update(bump) == Counter(count=1)
    assert store.exists()
    with store.transaction() as state:
        state.count += 10
        state.note = "héllo"
    store.save(store.load().model_copy(update={"count": 20}))
    assert store.load() == Counter(count=20, note="héllo")

    # The store's exact bytes, as text: its own layout, not a re-ordered jsonb.
    document, updated = row(admin, table) or ("", None)
    assert document.split("\n")[1].startswith('  "$commit": {"revision": 3, ')
    assert strip_stamp(document.encode()) == (
        b'{\n  "schema_version": 1,\n  "count": 20,\n  "note": "h\xc3\xa9llo"\n}\n'
    )
    assert storage.read() == document.encode()

    # A save that changes nothing does not write; a failing block writes nothing.
    store.save(Counter(count=20, note="héllo"))
    with pytest.raises(RuntimeError), store.transaction() as state:
        state.count = 99
        raise RuntimeError("changed my mind")
    assert row(admin, table) == (document, updated)

    # Another store object, another connection, same key: same document.
    with PostgresStorage(DSN, key="jobs", table=table, durable=False) as again:
        other = StateStore(Counter, again)
        assert other.load() == Counter(count=20, note="héllo")
        assert other.update(bump).count == 21


def test_keys_and_odd_table_names_are_separate(admin: psycopg.Connection[Any], table: str) -> None:
    odd = table + ' "x"; drop'
    try:
        with (
            PostgresStorage(DSN, key="a", table=odd) as a,
            PostgresStorage(DSN, key="b", table=odd) as b,
        ):
            StateStore(Counter, a, default=Counter).update(bump)
            StateStore(Counter, b, default=Counter).save(Counter(count=5))
            assert StateStore(Counter, a).load().count == 1
            assert StateStore(Counter, b).load().count == 5
            assert a.lock_id != b.lock_id
    finally:
        for t in (odd, odd + "_backups"):
            admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


def test_processes_lose_no_update(table: str, tmp_path: Path) -> None:
    start = tmp_path / "start"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=pg_workers.increment, args=(DSN, table, "jobs", 25, str(start), 2))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.touch()
    for p in procs:
        p.join(50)
    assert [p.exitcode for p in procs] == [0] * 4
    with PostgresStorage(DSN, key="jobs", table=table) as s:
        assert StateStore(Counter, s).load().count == 200


def test_threads_lose_no_update_and_race_to_create_the_table(table: str) -> None:
    # One storage object per thread, all new: their first sessions race to create the tables.
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def run() -> None:
        try:
            with PostgresStorage(DSN, key="jobs", table=table) as s:
                store = StateStore(Counter, s, default=Counter)
                barrier.wait()
                for _ in range(20):
                    store.update(bump)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with PostgresStorage(DSN, key="jobs", table=table) as s:
        assert StateStore(Counter, s).load().count == 120


def test_threads_share_one_storage(storage: PostgresStorage) -> None:
    store = StateStore(Counter, storage, default=Counter)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(25):
                store.update(bump)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.load().count == 100


def test_killed_holder_does_not_block_and_leaves_the_old_document(
    admin: psycopg.Connection[Any], storage: PostgresStorage, table: str, tmp_path: Path
) -> None:
    store = StateStore(Counter, storage, default=Counter, timeout=5)
    store.save(Counter(count=1, note="old"))
    ready = tmp_path / "ready"
    holder = mp.get_context("spawn").Process(
        target=pg_workers.hold, args=(DSN, table, "jobs", str(ready))
    )
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text()):
            assert time.monotonic() < deadline and holder.is_alive()
            time.sleep(0.01)
        with pytest.raises(LockTimeout) as held:
            StateStore(Counter, storage, timeout=0.2).update(bump)
        assert held.value.holder is not None
        assert held.value.holder["pid"] == int(ready.read_text())
        assert f"pg_terminate_backend({ready.read_text()})" in str(held.value)
    finally:
        os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join(10)
    assert holder.exitcode == -signal.SIGKILL
    assert store.load() == Counter(count=1, note="old")
    began = time.monotonic()
    assert store.update(bump) == Counter(count=2, note="old")
    assert time.monotonic() - began < 3


@pytest.mark.parametrize("timeout", [0.0, 0.3], ids=["no-wait", "wait"])
def test_lock_timeout(storage: PostgresStorage, table: str, timeout: float) -> None:
    with PostgresStorage(DSN, key="jobs", table=table) as other:
        store = StateStore(Counter, other, default=Counter, timeout=timeout)
        with storage.session(5) as held:
            began = time.monotonic()
            with pytest.raises(LockTimeout) as e:
                store.update(bump)
            waited = time.monotonic() - began
        assert timeout <= waited < timeout + 2
        assert isinstance(e.value, TimeoutError)
        assert e.value.path == storage.location
        assert e.value.timeout == timeout
        assert e.value.holder is not None and e.value.holder["pid"] == held.backend_pid
        # The lock is free again once the session ended.
        assert store.update(bump).count == 1


class _KillAfterWrite:
    """A storage whose sessions lose their connection right after the write, before commit."""

    def __init__(self, inner: PostgresStorage, admin: psycopg.Connection[Any]) -> None:
        self.inner = inner
        self.admin = admin

    @property
    def location(self) -> str:
        return self.inner.location

    def read(self) -> bytes | None:
        return self.inner.read()

    def exists(self) -> bool:
        return self.inner.exists()

    @contextmanager
    def session(self, timeout: float) -> Iterator[Session]:
        with self.inner.session(timeout) as session:
            yield _Killing(session, self.admin)


class _Killing:
    def __init__(self, inner: PostgresSession, admin: psycopg.Connection[Any]) -> None:
        self.inner = inner
        self.admin = admin

    def read(self) -> bytes | None:
        return self.inner.read()

    def write(self, data: bytes) -> None:
        self.inner.write(data)
        terminate(self.admin, self.inner.backend_pid)

    def backup(self, label: str, data: bytes) -> str:
        return self.inner.backup(label, data)

    def backup_location(self, label: str) -> str:
        return self.inner.backup_location(label)


def test_connection_lost_before_commit_saves_nothing(
    admin: psycopg.Connection[Any], storage: PostgresStorage, table: str
) -> None:
    StateStore(Counter, storage, default=Counter).save(Counter(count=1, note="old"))
    before = row(admin, table)
    store = StateStore(Counter, _KillAfterWrite(storage, admin))
    with pytest.raises(StateWriteError) as e:
        store.update(bump)
    assert "rolled back: nothing was saved" in str(e.value)
    assert str(e.value).startswith(storage.location)
    assert row(admin, table) == before
    # The lock went with the connection: the next update goes through at once.
    assert StateStore(Counter, storage, timeout=2).update(bump).count == 2


def test_connection_lost_inside_the_block_saves_nothing(
    admin: psycopg.Connection[Any], storage: PostgresStorage, table: str
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=1, note="old"))
    before = row(admin, table)
    with pytest.raises(StateWriteError, match="Nothing was saved"):
        with store.transaction() as state:
            state.count = 50
            pid = admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objid::int8 = %s",
                (storage.lock_id & 0xFFFF_FFFF,),
            ).fetchone()
            assert pid is not None
            terminate(admin, pid[0])
    assert row(admin, table) == before
    assert store.update(bump).count == 2


def test_stale_pooled_connections_are_replaced(admin: psycopg.Connection[Any], table: str) -> None:
    app = f"statestore-test-{uuid.uuid4().hex[:8]}"
    with PostgresStorage(make_conninfo(DSN, application_name=app), key="jobs", table=table) as s:
        store = StateStore(Counter, s, default=Counter)
        store.update(bump)  # leaves a connection in the pool
        pids = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()
        assert pids
        for (pid,) in pids:
            terminate(admin, pid)
        assert store.load().count == 1
        for (pid,) in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall():
            terminate(admin, pid)
        assert store.update(bump).count == 2


def test_forked_child_uses_its_own_connection(admin: psycopg.Connection[Any], table: str) -> None:
    app = f"statestore-test-{uuid.uuid4().hex[:8]}"
    with PostgresStorage(make_conninfo(DSN, application_name=app), key="jobs", table=table) as s:
        store = StateStore(Counter, s, default=Counter)
        store.update(bump)
        parent = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                code = 0 if store.update(bump).count == 2 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's pooled connection was neither used nor ended by the child.
        still = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid = ANY(%s)",
            (app, [p for (p,) in parent]),
        ).fetchall()
        assert still == parent
        assert store.update(bump).count == 3


class ColourV1(BaseModel):
    name: str
    colour: str


class ColourV2(BaseModel):
    name: str
    color: str


def test_migration_keeps_a_backup_row(
    admin: psycopg.Connection[Any], storage: PostgresStorage, table: str
) -> None:
    StateStore(ColourV1, storage).save(ColourV1(name="lamp", colour="red"))
    original = row(admin, table)
    assert original is not None

    def v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
        doc["color"] = doc.pop("colour")
        return doc

    store = StateStore(ColourV2, storage, version=2, migrations={1: v1_to_v2})
    report = store.migrate()
    assert report.backup == storage.backup_location("v1")
    assert store.load() == ColourV2(name="lamp", color="red")
    backups = admin.execute(
        sql.SQL("SELECT key, label, document FROM {}").format(sql.Identifier(f"{table}_backups"))
    ).fetchall()
    assert backups == [("jobs", "v1", original[0])]
    assert '"schema_version": 2' in (row(admin, table) or ("",))[0]


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ("{not json", StateCorruptError),
        ("[1, 2]", StateCorruptError),
        ("", StateCorruptError),
        ('{"count": "many"}', StateValidationError),
    ],
    ids=["not-json", "array", "empty", "invalid"],
)
def test_bad_stored_documents_are_reported_and_kept(
    admin: psycopg.Connection[Any],
    storage: PostgresStorage,
    table: str,
    document: str,
    error: type[Exception],
) -> None:
    StateStore(Counter, storage, default=Counter).save(Counter())
    put(admin, table, document)
    before = row(admin, table)
    store = StateStore(Counter, storage, default=Counter, read_attempts=1)
    for action in (store.load, lambda: store.update(bump), lambda: store.save(Counter())):
        with pytest.raises(error) as e:
            action()
        assert str(e.value).startswith(storage.location)
    assert row(admin, table) == before


def test_connection_problems_are_typed(table: str) -> None:
    wrong_password = make_conninfo(DSN, password="not-the-password")
    no_database = make_conninfo(DSN, dbname="statestore_no_such_database")
    for dsn, hint in ((wrong_password, "password"), (no_database, "does not exist")):
        with PostgresStorage(dsn, key="jobs", table=table) as s:
            store = StateStore(Counter, s, default=Counter)
            with pytest.raises(StateReadError, match=hint):
                store.load()
            with pytest.raises(LockError, match=hint):
                store.update(bump)


class _CommitThenDrop:
    """A connection whose COMMIT reaches the server, but whose answer is lost."""

    def __init__(self, conn: psycopg.Connection[Any], admin: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._admin = admin

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query != "COMMIT":
            return self._conn.execute(query, *args, **kwargs)
        self._conn.execute(query)
        terminate(self._admin, self._conn.info.backend_pid)
        return self._conn.execute("SELECT 1")  # fails: the connection is gone


@pytest.mark.parametrize("server_answers", [True, False], ids=["asked", "unreachable"])
def test_commit_answer_lost(
    admin: psycopg.Connection[Any],
    storage: PostgresStorage,
    table: str,
    monkeypatch: pytest.MonkeyPatch,
    server_answers: bool,
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=1))
    if not server_answers:

        def refuse() -> None:
            raise psycopg.OperationalError("connection refused")

        monkeypatch.setattr(storage, "_connect", refuse)

    def commit_seven() -> None:
        with storage.session(5) as session:
            session.write(b'{\n  "schema_version": 1,\n  "count": 7\n}\n')
            monkeypatch.setattr(session, "_conn", _CommitThenDrop(session._conn, admin))

    if server_answers:
        commit_seven()  # the server says the transaction committed: no error
    else:
        with pytest.raises(DurabilityError, match="either the old one or the new one"):
            commit_seven()
    assert store.load().count == 7
