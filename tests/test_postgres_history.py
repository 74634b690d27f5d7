# ruff: noqa: F811 - the fixtures of tests/test_postgres.py are parameters here
"""History and undo over PostgreSQL: the versions in a table, with the commit.

Against the real server (``STATESTORE_PG_DSN``; see tests/test_postgres.py).
The rules tested (``docs/history.md``, ``PostgresHistory``): ``history=N``
keeps the newest N versions of a key in ``<table>_history``, recorded and
pruned in the commit's own transaction (a commit that fails leaves no version
row); ``history()``, ``version_bytes()`` and ``restore()`` (validated,
migrated from an older schema) work as for files; other keys are untouched.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Counter
from psycopg import sql
from pydantic import BaseModel
from test_postgres import DSN, admin, put  # noqa: F401 - fixtures

from statestore import StateReadError, StateStore, StateValidationError, StateWriteError
from statestore.backends.postgres import PostgresFolder, PostgresStorage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    import uuid

    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    for t in (name, f"{name}_backups", f"{name}_history"):
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


def kept(admin: psycopg.Connection[Any], table: str, key: str = "jobs") -> list[tuple[Any, ...]]:
    """(seq, revision, document) of the key's rows in the history table, oldest first."""
    try:
        return admin.execute(
            sql.SQL(
                "SELECT seq, revision, convert_from(document, 'UTF8') FROM {} "
                "WHERE key = %s ORDER BY seq"
            ).format(sql.Identifier(f"{table}_history")),
            (key,),
        ).fetchall()
    except psycopg.errors.UndefinedTable:
        return []


def bump(state: Counter) -> None:
    state.count += 1


def store_of(table: str, key: str = "jobs", keep: int = 5) -> StateStore[Counter]:
    return StateStore(
        Counter, PostgresStorage(DSN, key=key, table=table), default=Counter, history=keep
    )


def test_history_lists_and_reads_the_newest_versions(
    admin: psycopg.Connection[Any], table: str
) -> None:
    store = store_of(table, keep=3)
    assert store.history() == []  # no table yet: nothing kept, nothing made
    revisions = []
    for n in range(1, 6):
        store.save(Counter(count=n))
        revisions.append(store.read().revision)
    entries = store.history()
    assert [e.revision for e in entries] == revisions[::-1][:3]
    assert all(e.written_by is not None and e.written_by.pid > 0 for e in entries)
    assert entries[0].size == len(store.version_bytes(revisions[-1]))
    assert store.version_bytes(revisions[-1]) == store.storage.read()  # type: ignore[attr-defined]
    with pytest.raises(StateReadError, match="not in the history") as info:
        store.version_bytes(revisions[0])
    assert info.value.errno == 2
    assert store.restore(revisions[-3]).count == 3
    assert store.load().count == 3
    assert [json.loads(d)["count"] for _, _, d in kept(admin, table)] == [4, 5, 3]


def test_the_async_store_records_in_its_sessions_too(
    admin: psycopg.Connection[Any], table: str
) -> None:
    import asyncio

    from statestore import AsyncStateStore

    sync = store_of(table, keep=2)
    store = AsyncStateStore.from_store(sync)

    async def main() -> None:
        for n in range(1, 4):
            await store.save(Counter(count=n))
        await store.update(bump)

    asyncio.run(main())
    assert [json.loads(d)["count"] for _, _, d in kept(admin, table)] == [3, 4]


def test_history_is_bounded_at_n_under_a_long_run(
    admin: psycopg.Connection[Any], table: str
) -> None:
    store = store_of(table, keep=4)
    other = store_of(table, key="jobs/other", keep=2)
    other.save(Counter(count=1))
    other.save(Counter(count=2))
    for n in range(60):
        store.update(bump)
        assert len(kept(admin, table)) == min(n + 1, 4)
    rows = kept(admin, table)
    assert [json.loads(d)["count"] for _, _, d in rows] == [57, 58, 59, 60]
    assert [s for s, _, _ in rows] == [57, 58, 59, 60]  # ordered, nothing reused
    # Pruning one key never touches another's versions.
    assert [json.loads(d)["count"] for _, _, d in kept(admin, table, "jobs/other")] == [1, 2]


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from conftest import Counter
    from statestore import StateStore
    from statestore.backends.postgres import PostgresStorage
    dsn, table = sys.argv[1:3]
    with PostgresStorage(dsn, key="jobs", table=table) as storage:
        store = StateStore(Counter, storage, default=Counter, history=3)
        for _ in range(40):
            store.update(lambda s: Counter(count=s.count + 1))
    """
)


def test_writers_in_several_processes_keep_a_bounded_ordered_history(
    admin: psycopg.Connection[Any], table: str
) -> None:
    store = store_of(table, keep=3)
    store.save(Counter(count=0))
    tests = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, DSN, table, tests]) for _ in range(3)]
    assert all(p.wait(90) == 0 for p in procs)
    assert store.load().count == 120
    rows = kept(admin, table)
    assert [json.loads(d)["count"] for _, _, d in rows] == [118, 119, 120]


def test_a_commit_that_fails_leaves_no_version(admin: psycopg.Connection[Any], table: str) -> None:
    store = store_of(table, keep=5)
    store.save(Counter(count=1))
    store.save(Counter(count=2))
    before = kept(admin, table)
    # A check the server makes at COMMIT, after the document and its version were
    # written: the whole transaction rolls back.
    admin.execute(
        sql.SQL(
            "CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.document LIKE '%\"count\": 13%' THEN RAISE EXCEPTION 'unlucky'; END IF; "
            "RETURN NEW; END $$; "
            "CREATE CONSTRAINT TRIGGER unlucky AFTER INSERT OR UPDATE ON {t} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {fn}()"
        ).format(fn=sql.Identifier(f"{table}_unlucky"), t=sql.Identifier(table))
    )
    try:
        with pytest.raises(StateWriteError, match="unlucky"):
            store.save(Counter(count=13))
        assert kept(admin, table) == before
        assert store.load().count == 2
        # A hand edit, then a failed commit: the replaced bytes are not kept either.
        put(admin, table, '{"count": 7}')
        with pytest.raises(StateWriteError):
            store.save(Counter(count=13))
        assert kept(admin, table) == before
        # A transaction whose block raises writes nothing at all.
        with pytest.raises(RuntimeError), store.transaction() as state:
            state.count = 50
            raise RuntimeError("changed my mind")
        assert kept(admin, table) == before
        store.save(Counter(count=8))  # the hand edit's bytes, then the new ones
        counts = [json.loads(d)["count"] for _, _, d in kept(admin, table)]
        assert counts == [1, 2, 7, 8]
    finally:
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))
        admin.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(f"{table}_unlucky"))
        )


def _hold_in_commit(dsn: str, table: str, ready: str) -> None:  # pragma: no cover - a child
    import os
    import time

    from statestore import StateStore as Store

    store = Store(
        Counter, PostgresStorage(dsn, key="jobs", table=table), default=Counter, history=5
    )
    with store.transaction() as state:
        state.count = 99
        # Killed before the commit's COMMIT: nothing of it may stay.
        open(ready, "w").close()
        time.sleep(60)
    os._exit(0)


def test_a_writer_killed_before_its_commit_leaves_no_version(
    admin: psycopg.Connection[Any], table: str, tmp_path: Path
) -> None:
    store = store_of(table, keep=5)
    store.save(Counter(count=1))
    before = kept(admin, table)
    ready = tmp_path / "ready"
    child = mp.get_context("spawn").Process(target=_hold_in_commit, args=(DSN, table, str(ready)))
    child.start()
    try:
        import time

        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.kill()
        child.join()
    assert kept(admin, table) == before
    assert store.load().count == 1


class V1(BaseModel):
    name: str = ""


class V2(BaseModel):
    full_name: str = ""
    tags: list[str] = []


def test_restore_of_a_version_from_an_older_schema_is_migrated(table: str) -> None:
    old = StateStore(V1, PostgresStorage(DSN, key="jobs", table=table), default=V1, history=5)
    old.save(V1(name="ada"))
    v1_revision = old.read().revision
    new = StateStore(
        V2,
        PostgresStorage(DSN, key="jobs", table=table),
        default=V2,
        history=5,
        version=2,
        migrations={1: lambda d: {"full_name": d["name"], "tags": ["migrated"]}},
    )
    new.save(V2(full_name="grace"))
    assert new.load().full_name == "grace"
    restored = new.restore(v1_revision)
    assert restored == V2(full_name="ada", tags=["migrated"])
    snap = new.read()
    assert snap.state == restored and snap.revision not in (v1_revision,)
    stored = json.loads(new.version_bytes(snap.revision))
    assert stored["schema_version"] == 2  # committed at the store's version
    with pytest.raises(StateReadError, match="not in the history"):
        new.restore("99-0000000000000000")
    assert new.load() == restored  # a failed restore writes nothing


def test_a_restore_that_does_not_validate_writes_nothing(
    admin: psycopg.Connection[Any], table: str
) -> None:
    store = store_of(table, keep=5)
    store.save(Counter(count=1))
    store.save(Counter(count=2))
    older = store.history()[1].revision
    # A kept version that no longer validates (changed in the table by hand).
    admin.execute(
        sql.SQL(
            "UPDATE {} SET document = convert_to(%s, 'UTF8') WHERE key = 'jobs' AND seq = 1"
        ).format(sql.Identifier(f"{table}_history")),
        ('{"count": "lots"}',),
    )
    with pytest.raises(StateValidationError):
        store.restore(older)
    assert store.load().count == 2
    assert len(store.history()) == 2


def test_history_names_its_table_and_refuses_a_long_name() -> None:
    s = PostgresStorage("postgresql://db.example/app", key="jobs", table="docs")
    assert s.history_table == "docs_history"
    assert s.history_location == "postgresql://db.example:5432/app#docs_history/jobs"
    other = PostgresStorage(
        "postgresql://db.example/app", key="j", history_table="kept", schema="s"
    )
    assert other.history_location.endswith("#s.kept/j")
    with pytest.raises(ValueError, match="history_table"):
        PostgresStorage("", key="jobs", history_table="x" * 64)


def test_a_folders_store_keeps_history_and_a_group_commit_is_recorded_next_time(
    admin: psycopg.Connection[Any], table: str
) -> None:
    with PostgresFolder(DSN, "plan", table=table) as folder:
        a = folder.store(Counter, "a", default=Counter, history=3)
        a.save(Counter(count=1))
        with folder.transaction() as tx:
            tx[a].count = 2  # a group commit: no version recorded now
        assert [json.loads(d)["count"] for _, _, d in kept(admin, table, "plan/a")] == [1]
        a.save(Counter(count=3))  # records the group's version first, then its own
        assert [json.loads(d)["count"] for _, _, d in kept(admin, table, "plan/a")] == [1, 2, 3]
        assert a.restore(a.history()[1].revision).count == 2


def test_cli_log_and_restore_over_postgres(table: str, tmp_path: Path) -> None:
    store = store_of(table, keep=5)
    store.save(Counter(count=1))
    first = store.read().revision
    store.save(Counter(count=2))
    module = tmp_path / "pgapp.py"
    module.write_text(
        textwrap.dedent(
            f"""
            from conftest import Counter
            from statestore import StateStore
            from statestore.backends.postgres import PostgresStorage
            store = StateStore(
                Counter, PostgresStorage({DSN!r}, key="jobs", table={table!r}),
                default=Counter, history=5,
            )
            """
        )
    )
    env = {"PYTHONPATH": f"{tmp_path}:{Path(__file__).parent}", "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "statestore", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    log = cli("log", "pgapp:store")
    assert log.returncode == 0, log.stderr
    assert first in log.stdout
    diff = cli("diff", "pgapp:store", first)
    assert diff.returncode == 0, diff.stderr
    assert '"count": 1' in diff.stdout and '"count": 2' in diff.stdout
    done = cli("restore", "pgapp:store", first)
    assert done.returncode == 0, done.stderr
    assert store.load().count == 1
