"""PostgresFolder: a state folder kept in PostgreSQL, against a real server.

A folder transaction is one SQL transaction over several rows: tested for
atomicity with an invariant across documents (a transfer keeps the sum) under
readers in other processes (with a positive control that reads the rows one by
one) and under a writer killed with SIGKILL, deterministically in the middle
of its commit and at random moments; for exclusion between a folder
transaction and a plain store of one of its documents built on its own (both
ways, and without losing an update across processes); for nesting in one
thread; for migrations inside the group (backups in the same transaction)
and the newer-version guard.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg_folder_workers
import psycopg
import pytest
import test_postgres
from conftest import Counter
from psycopg import sql
from pydantic import BaseModel
from test_postgres import DSN, put, row, terminate

from statestore import (
    DurabilityError,
    LockCompromisedError,
    LockTimeout,
    MigrationError,
    NestedTransactionError,
    SchemaVersionError,
    StateFolder,
    StateNotFoundError,
    StateStore,
    StateStoreError,
    StateValidationError,
    StateWriteError,
)
from statestore.backends.postgres import (
    PostgresFolder,
    PostgresStorage,
    _namespace_lock_key,
)

pytestmark = pytest.mark.timeout(120)

admin = test_postgres.admin
table = test_postgres.table

TOTAL = pg_folder_workers.TOTAL


@pytest.fixture
def namespace() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def folder(table: str, namespace: str) -> Iterator[PostgresFolder]:
    with PostgresFolder(DSN, namespace, table=table, timeout=5) as f:
        yield f


def rows(admin: psycopg.Connection[Any], table: str, namespace: str) -> dict[str, tuple[Any, ...]]:
    """name -> (document, the transaction that wrote it: xmin) of the folder's rows."""
    try:
        found = admin.execute(
            sql.SQL("SELECT key, document, xmin::text FROM {} WHERE key LIKE %s").format(
                sql.Identifier(table)
            ),
            (namespace + "/%",),
        ).fetchall()
    except psycopg.errors.UndefinedTable:
        return {}
    return {k.rpartition("/")[2]: (d, x) for k, d, x in found}


def backups(admin: psycopg.Connection[Any], table: str) -> list[tuple[Any, ...]]:
    try:
        return admin.execute(
            sql.SQL("SELECT key, label, document, xmin::text FROM {} ORDER BY key").format(
                sql.Identifier(f"{table}_backups")
            )
        ).fetchall()
    except psycopg.errors.UndefinedTable:
        return []


def counts(admin: psycopg.Connection[Any], table: str, namespace: str) -> dict[str, int]:
    return {n: json.loads(d)["count"] for n, (d, _) in rows(admin, table, namespace).items()}


def seed(folder: PostgresFolder) -> tuple[StateStore[Counter], StateStore[Counter]]:
    a = folder.store(Counter, "a", default=Counter)
    b = folder.store(Counter, "b", default=Counter)
    with folder.transaction() as tx:
        tx[a].count = TOTAL
        tx[b].count = 0
    return a, b


def spawn(target: Any, *args: Any) -> mp.process.BaseProcess:
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def wait_until(check: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------- no server needed


def test_location_names_and_arguments() -> None:
    f = PostgresFolder("postgresql://app:hunter2@db.example:6543/prod", "planning")
    assert f.location == "postgresql://db.example:6543/prod#statestore_documents/planning/"
    assert "hunter2" not in repr(f)
    store = f.store(Counter, "roadmap.json")
    assert store.location == (
        "postgresql://db.example:6543/prod#statestore_documents/planning/roadmap.json"
    )
    storage = store.storage
    assert isinstance(storage, PostgresStorage)
    assert storage.key == "planning/roadmap.json" and storage.namespace == "planning"
    assert f.stores == (store,)
    for bad in ("", "a/b", "a\0b"):
        with pytest.raises(ValueError, match="name"):
            f.store(Counter, bad)
    for namespace in ("", "a\0b"):
        with pytest.raises(ValueError, match="namespace"):
            PostgresFolder(DSN, namespace)
    # Every key with a '/' belongs to the namespace before its last one; others to none.
    assert PostgresStorage(DSN, key="a/b/c").namespace == "a/b"
    assert PostgresStorage(DSN, key="jobs").namespace is None


def test_stores_of_other_places_are_not_the_folders(tmp_path: Path) -> None:
    f = PostgresFolder(DSN, "planning", table="t1")
    strangers = [
        StateStore(Counter, PostgresStorage(DSN, key="other/a", table="t1")),
        StateStore(Counter, PostgresStorage(DSN, key="planning/a", table="t2")),
        StateStore(Counter, PostgresStorage(DSN, key="planning/sub/a", table="t1")),
        StateStore(Counter, PostgresStorage(DSN, key="planning", table="t1")),
        StateStore(Counter, tmp_path / "a.json"),
        StateFolder(tmp_path / "files").store(Counter, "a"),
    ]
    for store in strangers:
        with pytest.raises(StateStoreError, match="is not a document of the state folder"):
            f.read(store)
    # The same row reached by a storage made on its own is the folder's document.
    assert f._name_of(StateStore(Counter, PostgresStorage(DSN, key="planning/a", table="t1")))


# ---------------------------------------------------------------- with a server


def test_a_transfer_commits_every_row_in_one_transaction(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, namespace: str
) -> None:
    a, b = seed(folder)
    assert counts(admin, table, namespace) == {"a": TOTAL, "b": 0}
    with folder.transaction() as tx:
        tx[a].count -= 30
        tx[b].count += 30
        assert tx.is_loaded(a) and tx[a] is tx[a]
        # Inside the block nothing is visible to others yet.
        assert counts(admin, table, namespace) == {"a": TOTAL, "b": 0}
        assert a.load().count == TOTAL
    found = rows(admin, table, namespace)
    assert {n: json.loads(d)["count"] for n, (d, _) in found.items()} == {"a": 970, "b": 30}
    assert found["a"][1] == found["b"][1], "written by one SQL transaction (one xmin)"
    snap = folder.read(a, b)
    assert (snap[a].count, snap[b].count) == (970, 30)
    # The bytes are the store's own format, as a plain store of the key reads them.
    plain = StateStore(Counter, PostgresStorage(DSN, key=f"{namespace}/a", table=table))
    assert plain.load() == snap[a]


def test_a_group_commit_carries_the_commit_stamp_as_a_single_save_does(
    folder: PostgresFolder,
) -> None:
    """A row a group wrote has a revision that orders it after the one it replaced,
    and names its writer: it is not taken for a hand edit."""
    a, b = seed(folder)
    before = a.read()
    with folder.transaction() as tx:
        tx[a].count -= 1
        tx[b].count += 1
    after = a.read()
    assert int(after.revision.split("-")[0]) == int(before.revision.split("-")[0]) + 1
    assert after.written_by is not None and after.written_by.pid == os.getpid()


def test_unchanged_documents_are_not_rewritten(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, namespace: str
) -> None:
    a, b = seed(folder)
    before = rows(admin, table, namespace)
    with folder.transaction() as tx:
        tx[a].count += 1
        _ = tx[b].count  # loaded, not changed
    after = rows(admin, table, namespace)
    assert after["b"] == before["b"] and after["a"] != before["a"]
    with folder.transaction() as tx:
        _ = tx[a], tx[b]
    assert rows(admin, table, namespace) == after


@pytest.mark.parametrize("where", ["in the block", "in the commit"])
def test_a_raising_block_writes_nothing(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, namespace: str, where: str
) -> None:
    a, b = seed(folder)
    before = rows(admin, table, namespace)
    error: type[Exception] = RuntimeError if where == "in the block" else StateValidationError
    with pytest.raises(error):
        with folder.transaction() as tx:
            tx[a].count -= 10
            tx[b].count += 10
            if where == "in the block":
                raise RuntimeError("boom")
            tx[b].count = "not a number"  # type: ignore[assignment]
    assert rows(admin, table, namespace) == before
    # The lock went with the rollback: the next transaction starts at once.
    quick = PostgresFolder(DSN, namespace, table=table, timeout=0)
    with quick.transaction() as tx:
        tx[quick.store(Counter, "a")].count += 1
    assert counts(admin, table, namespace) == {"a": TOTAL + 1, "b": 0}


def test_connection_lost_inside_the_block_saves_nothing(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, namespace: str
) -> None:
    a, b = seed(folder)
    before = rows(admin, table, namespace)
    with pytest.raises(StateWriteError, match="Nothing was saved") as e:
        with folder.transaction() as tx:
            tx[a].count -= 10
            tx[b].count += 10
            key = folder.lock_id & 0xFFFF_FFFF_FFFF_FFFF
            pid = admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid::int8 = %s AND objid::int8 = %s",
                (key >> 32, key & 0xFFFF_FFFF),
            ).fetchone()
            assert pid is not None
            terminate(admin, pid[0])
    assert str(e.value).startswith(f"{folder.location[:-1]}")
    assert rows(admin, table, namespace) == before
    with folder.transaction() as tx:
        tx[a].count += 1
    assert counts(admin, table, namespace)["a"] == TOTAL + 1


@pytest.mark.parametrize("server_answers", [True, False], ids=["asked", "unreachable"])
def test_commit_answer_lost(
    admin: psycopg.Connection[Any],
    folder: PostgresFolder,
    table: str,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    server_answers: bool,
) -> None:
    a, b = seed(folder)
    if not server_answers:

        def refuse() -> None:
            raise psycopg.OperationalError("connection refused")

        monkeypatch.setattr(folder._tables, "_connect", refuse)

    def transfer() -> None:
        with folder.transaction() as tx:
            tx[a].count -= 7
            tx[b].count += 7
            monkeypatch.setattr(tx, "_conn", test_postgres._CommitThenDrop(tx._conn, admin))

    if server_answers:
        transfer()  # the server says the transaction committed: no error
    else:
        with pytest.raises(DurabilityError, match="every one is the new one") as e:
            transfer()
        assert str(e.value).startswith(folder.location)
    assert counts(admin, table, namespace) == {"a": TOTAL - 7, "b": 7}


def test_lock_id_is_the_namespaces_as_the_server_resolves_the_table(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, namespace: str
) -> None:
    seed(folder)
    oid = admin.execute("SELECT %s::regclass::oid::int8", (table,)).fetchone()
    assert oid is not None
    assert folder.lock_id == _namespace_lock_key(oid[0], namespace)
    other = PostgresFolder(DSN, namespace, table=table, schema="public")
    assert other.lock_id == folder.lock_id
    assert PostgresFolder(DSN, namespace + "x", table=table).lock_id != folder.lock_id
    # Not the lock of a row keyed like the namespace.
    assert PostgresStorage(DSN, key=namespace, table=table).lock_id != folder.lock_id


# ------------------------------------------------------------------- exclusion


def test_a_folder_transaction_and_a_plain_store_exclude_each_other(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, namespace: str
) -> None:
    a, b = seed(folder)
    # A store of the row made on its own, the table spelled another way.
    plain = StateStore(
        Counter,
        PostgresStorage(DSN, key=f"{namespace}/a", table=table, schema="public"),
        timeout=0.3,
    )
    inside = threading.Event()
    leave = threading.Event()
    backend: list[int] = []

    def hold_folder() -> None:
        with folder.transaction() as tx:
            tx[a].count -= 1
            tx[b].count += 1
            backend.append(tx._conn.info.backend_pid)
            inside.set()
            leave.wait(10)

    holder = threading.Thread(target=hold_folder)
    holder.start()
    try:
        assert inside.wait(10)
        with pytest.raises(LockTimeout) as e:
            plain.update(test_postgres.bump)
        assert e.value.holder is not None and e.value.holder["pid"] == backend[0]
        # Lock-free reads go on, and see the state before the transaction.
        assert plain.load().count == TOTAL
    finally:
        leave.set()
        holder.join()
    assert plain.update(test_postgres.bump).count == TOTAL
    assert counts(admin, table, namespace) == {"a": TOTAL, "b": 1}

    # The other way round: a plain session of one document (in another thread: in this
    # one it would be refused as nested) keeps the folder waiting.
    waiting = PostgresFolder(DSN, namespace, table=table, schema="public", timeout=0.3)
    inside.clear()
    leave.clear()
    backend.clear()

    def hold_plain() -> None:
        with plain.storage.session(5) as held:  # type: ignore[attr-defined]
            backend.append(held.backend_pid)
            inside.set()
            leave.wait(10)

    holder = threading.Thread(target=hold_plain)
    holder.start()
    try:
        assert inside.wait(10)
        with pytest.raises(LockTimeout) as e:
            with waiting.transaction():
                pass
        assert e.value.holder is not None and e.value.holder["pid"] == backend[0]
        # Sessions of two documents of the namespace do not exclude each other.
        other = PostgresStorage(DSN, key=f"{namespace}/b", table=table)
        with other.session(0) as session:
            assert session.read() is not None
    finally:
        leave.set()
        holder.join()
    with waiting.transaction() as tx:
        tx[waiting.store(Counter, "a")].count += 1
    assert counts(admin, table, namespace) == {"a": TOTAL + 1, "b": 1}


@pytest.mark.parametrize("timeout", [0.0, 0.4], ids=["no-wait", "wait"])
@pytest.mark.parametrize("held", ["key", "namespace"])
def test_one_timeout_bounds_the_wait_for_both_locks(
    folder: PostgresFolder, table: str, namespace: str, timeout: float, held: str
) -> None:
    seed(folder)
    plain = StateStore(
        Counter, PostgresStorage(DSN, key=f"{namespace}/a", table=table), timeout=timeout
    )
    inside, leave = threading.Event(), threading.Event()
    backend: list[int] = []

    def hold() -> None:
        if held == "key":  # another session of the same document
            with PostgresStorage(DSN, key=f"{namespace}/a", table=table).session(5) as s:
                backend.append(s.backend_pid)
                inside.set()
                leave.wait(10)
        else:
            with folder.transaction() as tx:
                backend.append(tx._conn.info.backend_pid)
                inside.set()
                leave.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        began = time.monotonic()
        with pytest.raises(LockTimeout) as e:
            plain.update(test_postgres.bump)
        waited = time.monotonic() - began
        assert timeout <= waited < timeout + 2
        assert e.value.holder is not None and e.value.holder["pid"] == backend[0]
        assert str(e.value).startswith(plain.location)
        if held == "namespace":
            quick = PostgresFolder(DSN, namespace, table=table, timeout=timeout)
            with pytest.raises(LockTimeout) as e:
                with quick.transaction():
                    pass
            assert str(e.value).startswith(folder.location)
    finally:
        leave.set()
        holder.join()
    assert plain.update(test_postgres.bump).count == TOTAL + 1


def test_the_wait_for_the_namespace_counts_against_the_keys_timeout(
    folder: PostgresFolder, table: str, namespace: str
) -> None:
    a, _ = seed(folder)
    storage = a.storage
    assert isinstance(storage, PostgresStorage)
    a.update(test_postgres.bump)  # a pooled connection: no connect time below
    waiting, release = threading.Event(), threading.Event()
    left: list[int] = []

    def hold() -> None:
        with folder.transaction():
            waiting.set()
            release.wait(10)
            time.sleep(0.5)  # the session below waits on the namespace's lock this long

    holder = threading.Thread(target=hold)
    holder.start()
    assert waiting.wait(10)
    release.set()
    with storage.session(5.0) as session:
        found = session._conn.execute(
            "SELECT setting::int FROM pg_settings WHERE name = 'lock_timeout'"
        ).fetchone()
        assert found is not None
        left.append(found[0])
    holder.join()
    # The key's lock got what was left of the 5 s, not 5 s more.
    assert 0 < left[0] <= 4800


def test_an_async_store_of_a_folder_document_takes_the_folders_lock(
    folder: PostgresFolder,
) -> None:
    import asyncio

    from statestore import AsyncStateStore

    a, b = seed(folder)
    async_a = AsyncStateStore.from_store(a)
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with folder.transaction() as tx:
            tx[a].count -= 1
            tx[b].count += 1
            inside.set()
            leave.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    quick = AsyncStateStore.from_store(
        PostgresFolder(DSN, folder.namespace, table=folder.table, timeout=0.2).store(Counter, "a")
    )
    with pytest.raises(LockTimeout):
        asyncio.run(quick.update(test_postgres.bump))
    leave.set()
    holder.join()
    assert asyncio.run(async_a.update(test_postgres.bump)).count == TOTAL
    snap = folder.read(a, b)
    assert (snap[a].count, snap[b].count) == (TOTAL, 1)


def test_durable_false_commits_without_waiting_for_the_flush(table: str, namespace: str) -> None:
    for durable, expected in ((True, "on"), (False, "off")):
        f = PostgresFolder(DSN, namespace, table=table, durable=durable)
        store = f.store(Counter, "a", default=Counter)
        assert store.storage.durable is durable  # type: ignore[attr-defined]
        with f.transaction() as tx:
            tx[store].count += 1
            found = tx._conn.execute("SHOW synchronous_commit").fetchone()
            assert found == (expected,)
        f.close()


def test_no_update_is_lost_between_plain_stores_and_folder_transactions(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, tmp_path: Path
) -> None:
    namespace = folder.namespace
    seed(folder)
    start, stop = str(tmp_path / "start"), str(tmp_path / "stop")
    procs = [
        spawn(pg_folder_workers.plain_increments, DSN, table, f"{namespace}/a", 40, start),
        spawn(pg_folder_workers.plain_increments, DSN, table, f"{namespace}/b", 40, start),
        spawn(pg_folder_workers.transfers, DSN, table, namespace, start, stop, 40),
        spawn(pg_folder_workers.transfers, DSN, table, namespace, start, stop, 40),
    ]
    Path(start).touch()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    found = counts(admin, table, namespace)
    # Transfers keep the sum; each plain increment adds one: none lost either way.
    assert found["a"] + found["b"] == TOTAL + 80


def test_nested_locked_calls_in_one_thread_are_refused(folder: PostgresFolder) -> None:
    a, b = seed(folder)
    slow = PostgresFolder(DSN, folder.namespace, table=folder.table, timeout=30)
    began = time.monotonic()
    with folder.transaction() as tx:
        tx[a].count -= 5
        with pytest.raises(NestedTransactionError):
            b.update(test_postgres.bump)
        with pytest.raises(NestedTransactionError):
            with slow.transaction():
                pass
        tx[b].count += 5
    with pytest.raises(NestedTransactionError):
        with a.transaction():
            with slow.transaction():
                pass
    assert time.monotonic() - began < 10, "refused at once, not after the timeout"
    snap = folder.read(a, b)
    assert (snap[a].count, snap[b].count) == (TOTAL - 5, 5)
    # Another thread is not nested: it waits for the lock, then goes on.
    with folder.transaction() as tx:
        tx[a].count += 1
        worker = threading.Thread(target=b.update, args=(test_postgres.bump,))
        worker.start()
        time.sleep(0.2)
        assert worker.is_alive()
    worker.join(10)
    snap = folder.read(a, b)
    assert (snap[a].count, snap[b].count) == (TOTAL - 4, 6)


# -------------------------------------------------------------------- readers


def test_readers_in_other_processes_see_the_sum(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, tmp_path: Path
) -> None:
    seed(folder)
    namespace = folder.namespace
    start, stop = str(tmp_path / "start"), str(tmp_path / "stop")
    writer = spawn(pg_folder_workers.transfers, DSN, table, namespace, start, stop, 0)
    outs = [str(tmp_path / f"reader{i}.json") for i in range(2)]
    readers = [
        spawn(pg_folder_workers.read_sums, DSN, table, namespace, start, out, 200) for out in outs
    ]
    Path(start).touch()
    try:
        for r in readers:
            r.join(90)
            assert r.exitcode == 0
    finally:
        Path(stop).touch()
        writer.join(30)
    assert writer.exitcode == 0
    control_torn = 0
    for out in outs:
        seen = json.loads(Path(out).read_text())
        assert len(seen["snapshots"]) >= 200
        assert set(seen["snapshots"]) == {TOTAL}, "a snapshot mixed two transfers"
        assert all(seen["notes"]), "a snapshot mixed two transfers"
        control_torn += sum(s != TOTAL for s in seen["control"])
    # The positive control: the same readers, reading the rows one by one, do see
    # a transfer halfway, so the check above can fail.
    assert control_torn > 0


# ------------------------------------------------------------- killed writers


def test_a_writer_killed_in_the_middle_of_its_commit_leaves_the_old_group(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, tmp_path: Path
) -> None:
    a, b = seed(folder)
    namespace = folder.namespace
    before = rows(admin, table, namespace)
    ready = tmp_path / "ready"
    # A row lock on "b", taken behind the store's back: the writer's commit writes "a"
    # (the keys are written in order), then waits on "b".
    blocker = psycopg.connect(DSN, autocommit=False)
    try:
        blocker.execute(
            sql.SQL("SELECT 1 FROM {} WHERE key = %s FOR UPDATE").format(sql.Identifier(table)),
            (f"{namespace}/b",),
        )
        writer = spawn(pg_folder_workers.hold_in_commit, DSN, table, namespace, str(ready))
        wait_until(lambda: ready.exists(), "the writer to commit")

        def writer_waits_on_b() -> bool:
            found = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'INSERT INTO%%' AND datname = current_database()"
            ).fetchone()
            return bool(found and found[0])

        wait_until(writer_waits_on_b, "the writer to have written a and wait on b")
        os.kill(writer.pid or 0, signal.SIGKILL)
        writer.join(10)
        assert writer.exitcode == -signal.SIGKILL
    finally:
        blocker.rollback()  # the writer's server session resumes, finds its client gone
        blocker.close()
    assert ready.read_text() == "committing"
    assert rows(admin, table, namespace) == before
    snap = folder.read(a, b)
    assert (snap[a].count, snap[b].count) == (TOTAL, 0)
    # The lock went with the connection.
    with folder.transaction() as tx:
        tx[a].count -= 1
        tx[b].count += 1
    assert counts(admin, table, namespace) == {"a": TOTAL - 1, "b": 1}


def test_writers_killed_at_random_moments_leave_whole_groups(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, tmp_path: Path
) -> None:
    a, b = seed(folder)
    namespace = folder.namespace
    start, stop = str(tmp_path / "start"), str(tmp_path / "never")
    Path(start).touch()
    for i in range(6):
        writer = spawn(pg_folder_workers.transfers, DSN, table, namespace, start, stop, 0)
        before = rows(admin, table, namespace)
        wait_until(lambda b=before: rows(admin, table, namespace) != b, "a first transfer")
        time.sleep(0.05 + 0.07 * i)
        os.kill(writer.pid or 0, signal.SIGKILL)
        writer.join(10)
        found = rows(admin, table, namespace)
        assert found["a"][1] == found["b"][1], "both rows of the last group from one transaction"
        docs = {n: json.loads(d) for n, (d, _) in found.items()}
        assert docs["a"]["count"] + docs["b"]["count"] == TOTAL
        assert docs["a"]["note"] == docs["b"]["note"]
        with folder.transaction(), PostgresFolder(DSN, namespace, table=table) as other:
            other.read(a, b)  # readers are never blocked by the lock
    snap = folder.read(a, b)
    assert snap[a].count + snap[b].count == TOTAL


def test_a_forked_child_cannot_use_the_parents_transaction(
    folder: PostgresFolder, admin: psycopg.Connection[Any], table: str
) -> None:
    a, b = seed(folder)
    with folder.transaction() as tx:
        tx[a].count -= 1
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                tx[b]
            except LockCompromisedError:
                code = 0
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        tx[b].count += 1
    snap = folder.read(a, b)
    assert (snap[a].count, snap[b].count) == (TOTAL - 1, 1)


# ------------------------------------------------------------------ migrations


class ColourV1(BaseModel):
    name: str
    colour: str


class ColourV2(BaseModel):
    name: str
    color: str


def v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    doc["color"] = doc.pop("colour")
    return doc


def broken_step(doc: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("cannot upgrade this one")


def test_migrations_run_inside_the_group_with_backups_in_the_same_transaction(
    admin: psycopg.Connection[Any], table: str, namespace: str
) -> None:
    old = PostgresFolder(DSN, namespace, table=table)
    with old.transaction() as tx:
        tx[old.store(ColourV1, "lamp", default=lambda: ColourV1(name="lamp", colour="red"))]
        tx[old.store(ColourV1, "sofa", default=lambda: ColourV1(name="sofa", colour="blue"))]
    originals = rows(admin, table, namespace)
    new = PostgresFolder(DSN, namespace, table=table)
    lamp = new.store(ColourV2, "lamp", version=2, migrations={1: v1_to_v2})
    sofa = new.store(ColourV2, "sofa", version=2, migrations={1: v1_to_v2})
    # Read (and migrated in memory) without the lock; the rows stay at version 1.
    assert new.read(lamp, sofa)[sofa] == ColourV2(name="sofa", color="blue")

    with pytest.raises(RuntimeError):
        with new.transaction() as tx:
            tx[lamp].color = "green"
            tx[sofa]
            raise RuntimeError("boom")
    assert rows(admin, table, namespace) == originals
    assert backups(admin, table) == []

    with new.transaction() as tx:
        tx[lamp].color = "green"
        assert tx[sofa].color == "blue"  # migrated, otherwise unchanged: written at v2
    found = rows(admin, table, namespace)
    assert all('"schema_version": 2' in d for d, _ in found.values())
    saved = backups(admin, table)
    assert [(k, label, d) for k, label, d, _ in saved] == [
        (f"{namespace}/lamp", "v1", originals["lamp"][0]),
        (f"{namespace}/sofa", "v1", originals["sofa"][0]),
    ]
    assert {x for *_, x in saved} == {found["lamp"][1]} == {found["sofa"][1]}
    assert lamp.load() == ColourV2(name="lamp", color="green")


def test_a_failing_migration_in_the_group_writes_nothing(
    admin: psycopg.Connection[Any], table: str, namespace: str
) -> None:
    old = PostgresFolder(DSN, namespace, table=table)
    with old.transaction() as tx:
        tx[old.store(ColourV1, "lamp", default=lambda: ColourV1(name="lamp", colour="red"))]
        tx[old.store(ColourV1, "sofa", default=lambda: ColourV1(name="sofa", colour="blue"))]
    originals = rows(admin, table, namespace)
    new = PostgresFolder(DSN, namespace, table=table)
    lamp = new.store(ColourV2, "lamp", version=2, migrations={1: v1_to_v2})
    sofa = new.store(ColourV2, "sofa", version=2, migrations={1: broken_step})
    with pytest.raises(MigrationError):
        with new.transaction() as tx:
            tx[lamp].color = "green"
            tx[sofa]
    assert rows(admin, table, namespace) == originals
    assert backups(admin, table) == []


def test_a_newer_document_is_refused_in_the_group_and_in_read(
    admin: psycopg.Connection[Any], folder: PostgresFolder, table: str, namespace: str
) -> None:
    a, b = seed(folder)
    newer = '{\n  "schema_version": 7,\n  "count": 5,\n  "future": true\n}\n'
    put(admin, table, newer, key=f"{namespace}/b")
    before = rows(admin, table, namespace)
    with pytest.raises(SchemaVersionError) as e:
        with folder.transaction() as tx:
            tx[a].count -= 5
            tx[b].count += 5
    assert str(e.value).startswith(b.location)
    with pytest.raises(SchemaVersionError):
        folder.read(a, b)
    assert rows(admin, table, namespace) == before
    assert row(admin, table, f"{namespace}/b") is not None


def test_read_gives_defaults_for_missing_documents_and_names_what_it_read(
    folder: PostgresFolder,
) -> None:
    a = folder.store(Counter, "a", default=lambda: Counter(count=3))
    b = folder.store(Counter, "b")  # no default
    c = folder.store(Counter, "c", default=Counter)
    snap = folder.read(a, c)  # before the table exists
    assert snap[a] == Counter(count=3) and snap[c] == Counter()
    with pytest.raises(KeyError, match="was not read into this snapshot"):
        _ = snap[b]
    with pytest.raises(StateNotFoundError):
        folder.read(b)
    with pytest.raises(StateNotFoundError):
        with folder.transaction() as tx:
            tx[a].count += 1
            tx[b]
    assert not a.exists()
    assert folder.recover() is False


def test_show_and_validate_take_a_postgres_folder(
    table: str, namespace: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from statestore._cli import main as cli

    app = tmp_path / "pgapp.py"
    app.write_text(
        "from statestore.backends.postgres import PostgresFolder\n"
        "from conftest import Counter\n"
        f"folder = PostgresFolder({DSN!r}, {namespace!r}, table={table!r}, timeout=5)\n"
        "a = folder.store(Counter, 'a.json', default=Counter)\n"
        "b = folder.store(Counter, 'b.json', default=Counter)\n"
    )
    assert cli(["validate", f"{app}:folder"]) == 0
    assert capsys.readouterr().out.count("no such document yet") == 2
    assert cli(["show", f"{app}:folder"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert set(shown) == {"a.json", "b.json"}
