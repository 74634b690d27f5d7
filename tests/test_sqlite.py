"""The SQLite backend: the store's API over one row of a WAL database, real processes and files."""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing as mp
import os
import pwd
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlite_workers
from conftest import Counter
from pydantic import BaseModel

from statestore import (
    AsyncStateStore,
    LockTimeout,
    NestedTransactionError,
    StateCorruptError,
    StateReadError,
    StateStore,
    StateValidationError,
    StateWriteError,
)
from statestore._document import strip_stamp
from statestore.backends import Storage
from statestore.backends.sqlite import SqliteStorage

pytestmark = pytest.mark.timeout(60)


def bump(state: Counter) -> None:
    state.count += 1


def row(db: Path, key: str = "jobs", table: str = "statestore_documents") -> bytes | None:
    """The stored bytes, read behind the store's back."""
    quoted = '"' + table.replace('"', '""') + '"'
    conn = sqlite3.connect(db)
    try:
        found = conn.execute(f"SELECT document FROM {quoted} WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError as e:
        assert "no such table" in str(e)
        return None
    finally:
        conn.close()
    return None if found is None else bytes(found[0])


def put(db: Path, document: bytes, key: str = "jobs") -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE statestore_documents SET document = ? WHERE key = ?", (document, key))
    conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def storage(db: Path) -> Any:
    with SqliteStorage(db, key="jobs") as s:
        yield s


def wait_until(check: Any, proc: Any = None, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        assert proc is None or proc.is_alive(), "the child died"
        time.sleep(0.01)


# ----------------------------------------------------------------- the store's API


def test_round_trip_through_the_store(db: Path, storage: SqliteStorage) -> None:
    store = StateStore(Counter, storage, default=Counter)
    assert isinstance(storage, Storage)
    assert store.load() == Counter()
    assert not store.exists()
    assert (
        not db.exists() and not db.parent.joinpath("state.db-wal").exists()
    )  # a read creates nothing
    assert store.update(bump) == Counter(count=1)
    assert store.exists() and store.load() == Counter(count=1)
    with store.transaction() as state:
        state.note = "x"
    assert store.load() == Counter(count=1, note="x")
    assert store.location == f"{db}#statestore_documents/jobs" == storage.location
    assert storage.lock is None and store.lock is None
    with pytest.raises(TypeError, match=r"not in a file; use store\.location"):
        _ = store.path


def test_a_row_holds_the_bytes_a_file_store_writes(db: Path, storage: SqliteStorage) -> None:
    store = StateStore(Counter, storage)
    store.save(Counter(count=3, note="same"))
    file_store = StateStore(Counter, db.parent / "state.json")
    file_store.save(Counter(count=3, note="same"))
    stored = row(db)
    assert stored is not None and stored == storage.read()
    assert strip_stamp(stored) == strip_stamp((db.parent / "state.json").read_bytes())
    snap = store.read()
    assert snap.revision.startswith("1-") and snap.written_by is not None
    assert snap.written_by.pid == os.getpid()
    assert store.update(bump).count == 4
    assert store.read().revision.startswith("2-")


def test_created_private_in_wal_mode_with_the_synchronous_level_asked(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for durable, level in ((True, 2), (False, 1)):
            path = tmp_path / f"{durable}.db"
            s = SqliteStorage(path, key="k", durable=durable)
            store = StateStore(Counter, s, default=Counter)
            assert store.durable is durable
            store.update(bump)
            for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                assert name.stat().st_mode & 0o777 == 0o600, name
            with s.session(1) as session:
                conn = session._c.conn
                assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            with pytest.raises(TypeError, match="set it on the storage"):
                StateStore(Counter, s, durable=durable)
    finally:
        os.umask(old)


def test_a_missing_folder_is_created_by_the_first_write(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    store = StateStore(Counter, SqliteStorage(path, key="k"), default=Counter)
    assert store.load() == Counter() and not path.parent.exists()
    store.update(bump)
    assert store.load().count == 1


def test_keys_and_tables_are_separate_rows_of_one_database(db: Path) -> None:
    odd = 'we"ird; DROP TABLE x; --'
    stores = [
        StateStore(Counter, SqliteStorage(db, key=k, table=t), default=Counter)
        for k, t in (("a", "statestore_documents"), ("b", "statestore_documents"), ("a", odd))
    ]
    for n, store in enumerate(stores, 1):
        store.save(Counter(count=n))
    assert [s.load().count for s in stores] == [1, 2, 3]
    assert row(db, "b") is not None and row(db, "a", odd) is not None
    assert len({s.storage.identity for s in stores}) == 3


def test_identity_is_the_row_whatever_the_spelling(tmp_path: Path, monkeypatch: Any) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    a = SqliteStorage(real / "state.db", key="k")
    assert a.identity == SqliteStorage(tmp_path / "link" / "state.db", key="k").identity
    assert a.identity == SqliteStorage("real/../real/state.db", key="k").identity
    # SQLite compares table names without regard to ASCII case: one table, one identity.
    assert (
        a.identity
        == SqliteStorage(real / "state.db", key="k", table="StateStore_Documents").identity
    )
    assert a.identity != SqliteStorage(real / "state.db", key="K").identity
    assert a.identity != SqliteStorage(real / "other.db", key="k").identity


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key": ""},
        {"key": "a\0b"},
        {"key": "k", "table": ""},
        {"key": "k", "table": "sqlite_master"},
        {"key": "k", "table": "t", "backup_table": "T"},
        {"key": "k", "max_size": 0},
        {"key": "k", "max_idle": -1},
    ],
)
def test_bad_arguments_are_refused(db: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SqliteStorage(db, **kwargs)


def test_an_exception_rolls_back_and_a_nested_call_is_refused(
    db: Path, storage: SqliteStorage
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=1))

    def fail(state: Counter) -> None:
        state.count = 100
        raise KeyError("no")

    with pytest.raises(KeyError):
        store.update(fail)
    assert store.load().count == 1
    same = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
    other_key = StateStore(Counter, SqliteStorage(db, key="other"), default=Counter, timeout=5)
    began = time.monotonic()
    with store.transaction() as state:
        state.count = 2
        with pytest.raises(NestedTransactionError):
            same.update(bump)
        # One write lock per database: another key's session would wait for this one.
        with pytest.raises(NestedTransactionError, match="one write lock per database"):
            other_key.update(bump)
    assert time.monotonic() - began < 2
    assert store.load().count == 2 and other_key.load().count == 0
    other_key.update(bump)  # nothing left held
    assert other_key.load().count == 1


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_a_session_that_raises_after_writing_leaves_nothing_written(
    db: Path, storage: SqliteStorage, interruption: type[BaseException]
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=1))
    before = row(db)
    with pytest.raises(interruption), storage.session(5) as session:
        session.write(b'{"schema_version": 1, "count": 50}\n')
        session.backup("v0", b"{}")
        assert session.read() == b'{"schema_version": 1, "count": 50}\n'
        raise interruption("interrupted")
    assert row(db) == before
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM statestore_documents_backups").fetchone() == (0,)
    conn.close()
    assert store.update(bump).count == 2  # nothing left held


def test_a_log_write_that_fails_saves_nothing(db: Path, storage: SqliteStorage) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=1, note="old"))
    before = row(db)
    largest = max(os.stat(p).st_size for p in (db, Path(f"{db}-wal")))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: its files may not grow much
        answer = "no error"
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 8192, largest + 8192))
            child = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
            child.save(Counter(count=2, note="x" * 200_000))
        except BaseException as e:
            answer = f"{type(e).__name__}: {e}"
        os.write(w, answer.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        answer = f.read()
    if sys.version_info >= (3, 11):
        assert answer.startswith("StateWriteError"), answer
        assert "Nothing was saved" in answer
    else:  # no extended result codes: a failed write is not told from a failed fsync
        assert answer.startswith("DurabilityError"), answer
    assert row(db) == before
    assert store.load() == Counter(count=1, note="old")
    assert store.update(bump).count == 2


def test_migration_keeps_a_backup_row_that_is_never_overwritten(
    db: Path, storage: SqliteStorage
) -> None:
    class V1(BaseModel):
        name: str
        colour: str

    class V2(BaseModel):
        name: str
        color: str

    StateStore(V1, storage).save(V1(name="lamp", colour="red"))
    original = row(db)

    def v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
        doc["color"] = doc.pop("colour")
        return doc

    store = StateStore(V2, storage, version=2, migrations={1: v1_to_v2})
    report = store.migrate()
    assert (
        report.backup
        == storage.backup_location("v1")
        == f"{db}#statestore_documents_backups/jobs@v1"
    )
    assert store.load() == V2(name="lamp", color="red")
    with storage.session(1) as session:
        session.backup("v1", b"another original")  # a label kept once is kept
    conn = sqlite3.connect(db)
    backups = conn.execute(
        "SELECT key, label, document FROM statestore_documents_backups"
    ).fetchall()
    conn.close()
    assert backups == [("jobs", "v1", original)]


@pytest.mark.parametrize(
    ("document", "error"),
    [
        (b"{not json", StateCorruptError),
        (b"[1, 2]", StateCorruptError),
        (b"", StateCorruptError),
        (b'{"count": "many"}', StateValidationError),
    ],
    ids=["not-json", "array", "empty", "invalid"],
)
def test_bad_stored_documents_are_reported_and_kept(
    db: Path, storage: SqliteStorage, document: bytes, error: type[Exception]
) -> None:
    StateStore(Counter, storage, default=Counter).save(Counter())
    put(db, document)
    store = StateStore(Counter, storage, default=Counter, read_attempts=1)
    for action in (store.load, lambda: store.update(bump), lambda: store.save(Counter())):
        with pytest.raises(error) as e:
            action()
        assert str(e.value).startswith(storage.location)
    assert row(db) == document


def test_max_size_bounds_reads_and_writes(db: Path) -> None:
    small = StateStore(Counter, SqliteStorage(db, key="jobs", max_size=200), default=Counter)
    with pytest.raises(StateWriteError, match="max_size"):
        small.save(Counter(note="x" * 300))
    assert row(db) is None
    StateStore(Counter, SqliteStorage(db, key="jobs")).save(Counter(note="x" * 300))
    with pytest.raises(StateReadError, match="max_size"):
        small.load()


def test_watch_and_history_are_refused(storage: SqliteStorage) -> None:
    store = StateStore(Counter, storage, default=Counter)
    with pytest.raises(TypeError, match="SqliteStorage has no watcher"):
        store.watch()
    with pytest.raises(TypeError, match="SqliteStorage has no history"):
        StateStore(Counter, storage, history=3)


# ------------------------------------------------------------ threads and processes


def test_processes_lose_no_update(db: Path, tmp_path: Path) -> None:
    start = tmp_path / "start"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=sqlite_workers.increment, args=(str(db), "jobs", 25, str(start), 2))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.touch()
    for p in procs:
        p.join(50)
    assert [p.exitcode for p in procs] == [0] * 4
    assert StateStore(Counter, SqliteStorage(db, key="jobs")).load().count == 200


def test_processes_racing_to_create_the_database_all_succeed(tmp_path: Path) -> None:
    for attempt in range(6):
        db = tmp_path / f"race{attempt}.db"
        r, w = os.pipe()
        pids = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - a child
                code = 1
                try:
                    os.close(w)
                    os.read(r, 1)  # released together
                    StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter).update(bump)
                    code = 0
                except BaseException as e:
                    with open(f"{db}.error.{os.getpid()}", "w") as f:
                        f.write(f"{type(e).__name__}: {e}")
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(r)
        os.close(w)  # end of file: every child reads it at once
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        errors = [p.read_text() for p in tmp_path.glob(f"{db.name}.error.*")]
        assert codes == [0] * 6, errors
        assert StateStore(Counter, SqliteStorage(db, key="jobs")).load().count == 6


def test_threads_lose_no_update_shared_or_own_storage(db: Path) -> None:
    shared = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def run(own: bool) -> None:
        try:
            store = (
                StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
                if own
                else shared
            )
            barrier.wait()
            for _ in range(20):
                store.update(bump)
                store.load()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n % 2 == 0,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert shared.load().count == 120


def test_killed_writer_leaves_the_old_document_and_the_next_proceeds_at_once(
    db: Path, storage: SqliteStorage, tmp_path: Path
) -> None:
    store = StateStore(Counter, storage, default=Counter, timeout=5)
    store.save(Counter(count=1, note="old"))
    ready = tmp_path / "ready"
    holder = mp.get_context("spawn").Process(
        target=sqlite_workers.hold, args=(str(db), "jobs", str(ready))
    )
    holder.start()
    try:
        wait_until(ready.exists, holder)
        assert store.load() == Counter(count=1, note="old")  # WAL: readers never wait
        began = time.monotonic()
        with pytest.raises(LockTimeout) as held:
            StateStore(Counter, SqliteStorage(db, key="jobs"), timeout=0.3).update(bump)
        assert 0.3 <= time.monotonic() - began < 3
        assert held.value.holder == {"pid": holder.pid}
        assert f"process {holder.pid} holds a write transaction" in str(held.value)
        assert held.value.path == storage.location and held.value.timeout == 0.3
        # Another key of the database waits for the same lock.
        with pytest.raises(LockTimeout):
            StateStore(Counter, SqliteStorage(db, key="other"), timeout=0).update(bump)
    finally:
        os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join(10)
    assert holder.exitcode == -signal.SIGKILL
    assert store.load() == Counter(count=1, note="old")
    began = time.monotonic()
    assert store.update(bump) == Counter(count=2, note="old")
    assert time.monotonic() - began < 1
    assert StateStore(Counter, SqliteStorage(db, key="jobs")).load() == Counter(count=2, note="old")


def test_waiting_for_another_process_costs_no_cpu(db: Path, tmp_path: Path) -> None:
    StateStore(Counter, SqliteStorage(db, key="jobs")).save(Counter())
    ready = tmp_path / "ready"
    holder = mp.get_context("spawn").Process(
        target=sqlite_workers.hold, args=(str(db), "jobs", str(ready))
    )
    holder.start()
    try:
        wait_until(ready.exists, holder)
        store = StateStore(Counter, SqliteStorage(db, key="jobs"), timeout=1.0)
        cpu, wall = time.process_time(), time.monotonic()
        with pytest.raises(LockTimeout):
            store.update(bump)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    finally:
        os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join(10)
    assert wall >= 1.0
    assert cpu < 0.25 * wall  # SQLite's busy handler sleeps between tries


def test_writers_killed_at_random_moments_leave_a_whole_document(db: Path) -> None:
    store = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter, timeout=5)
    store.save(Counter())
    rng = random.Random(16)
    last = 0
    for _ in range(6):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a writer, killed while it works
            try:
                writer = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
                while True:
                    writer.update(
                        lambda s: Counter(count=s.count + 1, note="n" * rng.randrange(9000))
                    )
            finally:
                os._exit(1)
        deadline = time.monotonic() + 10
        while StateStore(Counter, SqliteStorage(db, key="jobs")).load().count == last:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        began = time.monotonic()
        state = store.update(lambda s: s)  # the lock is free at once
        assert time.monotonic() - began < 1
        assert state.count > last and set(state.note) <= {"n"}
        last = state.count


@pytest.mark.parametrize("timeout", [0.0, 0.3], ids=["no-wait", "wait"])
def test_lock_timeout_between_threads(db: Path, storage: SqliteStorage, timeout: float) -> None:
    store = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter, timeout=timeout)
    failed: list[BaseException] = []
    with storage.session(5):
        began = time.monotonic()
        t = threading.Thread(target=lambda: _catch(failed, lambda: store.update(bump)))
        t.start()
        t.join()
        waited = time.monotonic() - began
    assert len(failed) == 1 and isinstance(failed[0], LockTimeout)
    # Threads of one process queue in the process, not in SQLite's busy handler.
    assert "other threads of this process" in str(failed[0])
    assert timeout <= waited < timeout + 2
    assert failed[0].path == storage.location
    assert store.update(bump).count == 1  # free again once the session ended


def _catch(into: list[BaseException], fn: Any) -> None:
    try:
        fn()
    except BaseException as e:
        into.append(e)


def test_save_expect_from_two_processes_exactly_one_wins(db: Path, tmp_path: Path) -> None:
    store = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
    store.save(Counter())
    revision = store.read().revision
    start = tmp_path / "start"
    ctx = mp.get_context("spawn")
    results = [tmp_path / f"result{n}" for n in range(2)]
    procs = [
        ctx.Process(
            target=sqlite_workers.save_expecting,
            args=(str(db), "jobs", revision, f"by {n}", str(start), str(results[n])),
        )
        for n in range(2)
    ]
    for p in procs:
        p.start()
    start.touch()
    for p in procs:
        p.join(50)
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = sorted(r.read_text() for r in results)
    assert outcomes == ["conflict", "saved"]
    winner = next(n for n in range(2) if results[n].read_text() == "saved")
    assert store.load() == Counter(count=1, note=f"by {winner}")


def test_forked_child_never_uses_the_parents_connection(db: Path, storage: SqliteStorage) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.update(bump)
    parents = list(storage._pool._idle)
    assert parents  # a pooled connection, inherited by the child below
    kept = [c.conn for c in parents]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            assert storage._pool._idle == []
            for _ in range(5):
                store.update(bump)
            assert all(c.pid == os.getpid() for c in storage._pool._idle)
            storage.close()
            del parents[:]
            gc.collect()
            # The parent's connection was neither used nor closed here.
            assert all(conn.total_changes >= 0 for conn in kept)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [c.conn for c in storage._pool._idle] == kept
    assert store.update(bump).count == 7
    # A child forked inside a session cannot write under the parent's lock.
    with storage.session(5) as session:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                session.write(b"{}")
            except Exception as e:
                os._exit(3 if type(e).__name__ == "LockCompromisedError" else 4)
            os._exit(5)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert store.load().count == 7


def test_a_deleted_database_is_not_written_through_an_old_connection(
    db: Path, storage: SqliteStorage
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=5))
    assert storage._pool._idle
    # Deleting the database with its files is how a user starts over.
    conn = storage._pool._idle[0].conn
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        name.unlink(missing_ok=True)
    assert store.load() == Counter()
    assert store.update(bump).count == 1
    assert (
        row(db) is not None and StateStore(Counter, SqliteStorage(db, key="jobs")).load().count == 1
    )
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")  # the old connection was closed, not reused


def test_closing_a_connection_to_a_deleted_database_leaves_the_new_ones_log(
    db: Path, storage: SqliteStorage
) -> None:
    old = StateStore(Counter, storage, default=Counter)
    old.save(Counter(count=5))  # a pooled connection to this database stays open
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        name.unlink()
    with SqliteStorage(db, key="jobs") as other:
        new = StateStore(Counter, other, default=Counter)
        new.save(Counter(count=1, note="new"))  # in the new database's log, not yet folded
        wal = Path(f"{db}-wal")
        assert wal.stat().st_size > 0
        storage.close()  # the last connection to the deleted database ends
        assert wal.exists()  # SQLite does not fold or remove a log by the name of another file
        assert StateStore(Counter, SqliteStorage(db, key="jobs")).load() == Counter(
            count=1, note="new"
        )


# ------------------------------------------------------------------------ asyncio


def test_async_store_updates_and_a_cancelled_wait_leaves_nothing_held(
    db: Path, storage: SqliteStorage
) -> None:
    async def main() -> None:
        store = AsyncStateStore(Counter, storage, default=Counter, timeout=10)
        await asyncio.gather(*(store.update(bump) for _ in range(20)))
        assert (await store.load()).count == 20
        ticks = 0
        release = threading.Event()
        held = threading.Event()

        def hold() -> None:
            with SqliteStorage(db, key="jobs").session(5):
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)
        waiting = asyncio.ensure_future(store.update(bump))

        async def tick() -> None:
            nonlocal ticks
            while not waiting.done():
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await ticker
        assert ticks >= 10  # the loop kept running while the update waited
        release.set()
        holder.join(5)
        await asyncio.sleep(0.1)
        began = time.monotonic()
        assert (await store.update(bump)).count == 21
        assert time.monotonic() - began < 2

    asyncio.run(main())


# ------------------------------------------------------------------ a hostile world


def _json_file(path: Path) -> bytes:
    data = b'{"schema_version": 1, "count": 4}\n'
    path.write_bytes(data)
    return data


def _bytes_file(path: Path, data: bytes) -> bytes:
    path.write_bytes(data)
    return data


def _corrupt_database(path: Path) -> bytes:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE statestore_documents (key TEXT PRIMARY KEY, document BLOB, updated_at REAL)"
    )
    for n in range(200):
        conn.execute(
            "INSERT INTO statestore_documents VALUES (?, ?, 0)", (f"k{n}", os.urandom(300))
        )
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : 3 * page] = b"\xa5" * (2 * page)  # the table's root pages
    path.write_bytes(bytes(data))
    return bytes(data)


def _other_users_database(path: Path) -> bytes:
    StateStore(Counter, SqliteStorage(path, key="jobs")).save(Counter(count=9))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if name.exists():
            os.chown(name, pwd.getpwnam("nobody").pw_uid, -1)
    return path.read_bytes()


def _hard_linked_database(path: Path) -> bytes:
    StateStore(Counter, SqliteStorage(path, key="jobs")).save(Counter(count=9))
    os.link(path, path.parent / "second-name.db")
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda p: p.mkdir(), StateReadError, "is a folder"),
        (lambda p: os.mkfifo(p), StateReadError, "named pipe"),
        (lambda p: p.symlink_to(p.parent / "target.db"), StateReadError, "symbolic link"),
        (_json_file, StateReadError, "not a SQLite database"),
        (lambda p: _bytes_file(p, b"hi\n"), StateReadError, "not a SQLite database"),
        (lambda p: _bytes_file(p, bytes(8192)), StateReadError, "not a SQLite database"),
        (_corrupt_database, StateCorruptError, "damaged"),
        (_other_users_database, StateReadError, "another user's file"),
        (_hard_linked_database, StateReadError, "hard links"),
    ],
    ids=[
        "folder",
        "fifo",
        "symlink",
        "json-file",
        "tiny-file",
        "zeros",
        "corrupt",
        "other-user",
        "hard-link",
    ],
)
def test_what_is_not_a_database_of_ours_is_refused_and_left_alone(
    tmp_path: Path, make: Any, error: type[Exception], words: str
) -> None:
    if words == "another user's file" and os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    path = tmp_path / "state.db"
    target = tmp_path / "target.db"
    StateStore(Counter, SqliteStorage(target, key="jobs")).save(Counter(count=1))
    target_bytes = target.read_bytes()
    made = make(path)

    def snapshot() -> dict[str, Any]:
        found: dict[str, Any] = {}
        for p in sorted(tmp_path.iterdir()):
            st = os.lstat(p)
            content = (
                p.read_bytes()
                if p.is_file() and not p.is_symlink() and not p.name.endswith("-shm")
                else None
            )
            found[p.name] = (st.st_mode, st.st_uid, content)
        return found

    before = snapshot()
    store = StateStore(Counter, SqliteStorage(path, key="jobs"), default=Counter, timeout=1)
    for action in (
        store.load,
        store.exists,
        lambda: store.update(bump),
        lambda: store.save(Counter()),
    ):
        began = time.monotonic()
        with pytest.raises(error, match=words) as e:
            action()
        assert str(e.value).startswith(str(path))
        assert time.monotonic() - began < 5  # never a hang (a FIFO is never opened)
    assert snapshot() == before
    if isinstance(made, bytes):
        assert path.read_bytes() == made
    assert target.read_bytes() == target_bytes


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_planted_companion_file_is_never_written_through(
    tmp_path: Path, suffix: str, kind: str
) -> None:
    path = tmp_path / "state.db"
    StateStore(Counter, SqliteStorage(path, key="jobs")).save(Counter(count=1))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for s in ("-wal", "-shm", "-journal"):
        Path(f"{path}{s}").unlink(missing_ok=True)
    if kind == "symlink":
        Path(f"{path}{suffix}").symlink_to(victim)
    else:
        os.mkfifo(f"{path}{suffix}")
    store = StateStore(Counter, SqliteStorage(path, key="jobs"), default=Counter)
    for action in (store.load, lambda: store.update(bump)):
        began = time.monotonic()
        with pytest.raises(StateReadError, match="symbolic link" if kind == "symlink" else "pipe"):
            action()
        assert time.monotonic() - began < 5
    assert victim.read_bytes() == b"precious"
    Path(f"{path}{suffix}").unlink()
    assert store.update(bump).count == 2


def test_a_log_without_its_database_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    wal = Path(f"{path}-wal")
    wal.write_bytes(b"the log of a deleted database")
    store = StateStore(Counter, SqliteStorage(path, key="jobs"), default=Counter)
    assert store.load() == Counter()
    with pytest.raises(StateWriteError, match="a database was deleted"):
        store.update(bump)
    assert not path.exists() and wal.read_bytes() == b"the log of a deleted database"


def test_a_database_created_meanwhile_is_no_orphan_log(db: Path) -> None:
    # Another process created the database, and its log, after this one found it
    # missing: its log has a database, so this one opens it instead of refusing.
    late = SqliteStorage(db, key="jobs")
    assert late.read() is None and not db.exists()
    first = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
    first.update(bump)
    assert Path(f"{db}-wal").exists()
    st = late._create_file()
    assert (st.st_dev, st.st_ino) == (os.stat(db).st_dev, os.stat(db).st_ino)
    assert StateStore(Counter, late).update(bump).count == 2


def test_a_database_of_other_tables_is_used_and_kept(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE mine (x)")
    conn.execute("INSERT INTO mine VALUES (42)")
    conn.close()
    store = StateStore(Counter, SqliteStorage(db, key="jobs"), default=Counter)
    assert not store.exists() and store.load() == Counter()  # no table yet: no document
    assert store.update(bump).count == 1
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT x FROM mine").fetchall() == [(42,)]
    conn.close()


def test_the_command_line_reads_and_checks_a_sqlite_store(db: Path, tmp_path: Path) -> None:
    (tmp_path / "sqlite_app.py").write_text(
        "from conftest import Counter\n"
        "from statestore import StateStore\n"
        "from statestore.backends.sqlite import SqliteStorage\n"
        f"store = StateStore(Counter, SqliteStorage({str(db)!r}, key='jobs'), default=Counter)\n"
    )
    StateStore(Counter, SqliteStorage(db, key="jobs")).save(Counter(count=3, note="cli"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).parent)]))
    shown = subprocess.run(
        [sys.executable, "-m", "statestore", "show", "sqlite_app:store"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"count": 3, "note": "cli"}
    put(db, b"{not json")
    checked = subprocess.run(
        [sys.executable, "-m", "statestore", "validate", "sqlite_app:store"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert checked.returncode == 1
    assert f"{db}#statestore_documents/jobs" in checked.stdout + checked.stderr
    assert row(db) == b"{not json"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_read_only_database_gives_typed_errors_as_another_user(
    request: pytest.FixtureRequest,
) -> None:
    nobody = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="statestore-sqlite-"))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, as nobody
        out: dict[str, Any] = {}
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            path = folder / "state.db"
            store = StateStore(Counter, SqliteStorage(path, key="jobs"), default=Counter)
            store.update(bump)
            store.storage.close()
            os.chmod(path, 0o400)
            os.chmod(folder, 0o500)
            for name, action in (("load", store.load), ("update", lambda: store.update(bump))):
                try:
                    out[name] = repr(action())
                except Exception as e:
                    out[name] = type(e).__name__ + ": " + str(e)
        except Exception as e:
            out["setup"] = repr(e)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        out = json.loads(f.read())
    assert "setup" not in out, out
    # WAL needs its -shm file: in a read-only folder even a read cannot open it.
    assert out["load"].startswith("StateReadError"), out
    assert "read-only" in out["load"] and "Nothing was saved" not in out["load"]
    assert out["update"].startswith("StateWriteError"), out
    assert "Nothing was saved" in out["update"] or "nothing was written" in out["update"].lower()
