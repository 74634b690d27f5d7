"""PostgreSQL: one row, one lock, whatever the spelling of its table.

Every storage that reaches a row must take the same lock: ``schema=None`` and
``schema="public"``, a schema reached through the search path or named, quoted
mixed-case names. Tested in real processes (no update lost), and
deterministically (a session held through one spelling makes every other
spelling wait). Rows that differ take different locks, and tables whose rows a
lock keyed by (table, key bytes) would not guard are refused.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest
import test_postgres
from conftest import Counter
from psycopg import sql
from psycopg.conninfo import make_conninfo
from test_postgres import DSN, bump, row
from workers import increment_store

from statestore import LockError, LockTimeout, StateStore
from statestore.backends.postgres import PostgresStorage, _lock_key

pytestmark = pytest.mark.timeout(90)

# The fixtures of tests/test_postgres.py: a connection of the tests' own, a fresh table name.
admin = test_postgres.admin
table = test_postgres.table


class Spelling(NamedTuple):
    """One way to name a table: a conninfo (its search path), a schema, a table name."""

    conninfo: str
    schema: str | None
    table: str

    def storage(self, key: str = "jobs") -> PostgresStorage:
        return PostgresStorage(self.conninfo, key=key, table=self.table, schema=self.schema)


def _with_path(*schemas: str) -> str:
    """DSN whose sessions start with this search_path (names quoted, so case is kept)."""
    path = ",".join('"' + s.replace('"', '""') + '"' for s in schemas)
    return make_conninfo(DSN, options=f"-c search_path={path}")


def increment_as(spelling: Spelling, key: str, times: int, start: str, threads: int) -> None:
    """Run in a child process: increment through this spelling of the table."""
    with spelling.storage(key) as storage:
        store = StateStore(Counter, storage, default=Counter, timeout=60)
        increment_store(store, times, start, threads)


@pytest.fixture
def schema(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh schema with a mixed-case name (so only a quoted spelling reaches it)."""
    name = f"Idn_{uuid.uuid4().hex[:10]}"
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(params=["public", "other-schema"])
def spellings(
    request: pytest.FixtureRequest, table: str, schema: str, admin: psycopg.Connection[Any]
) -> list[Spelling]:
    """Spellings of one table: in public, or a mixed-case table in a mixed-case schema."""
    if request.param == "public":
        return [
            Spelling(DSN, None, table),
            Spelling(DSN, "public", table),
            Spelling(_with_path("public"), None, table),
            Spelling(_with_path("no_such_schema", "public"), None, table),
        ]
    mixed = "Docs_" + table
    request.addfinalizer(
        lambda: admin.execute(
            sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                sql.Identifier(mixed), sql.Identifier(mixed + "_backups")
            )
        )
    )
    return [
        Spelling(_with_path(schema), None, mixed),
        Spelling(DSN, schema, mixed),
        Spelling(_with_path(schema, "public"), None, mixed),
        Spelling(_with_path("public"), schema, mixed),
    ]


def _oid(admin: psycopg.Connection[Any], spelling: Spelling) -> int:
    name = sql.Identifier(spelling.schema, spelling.table) if spelling.schema else None
    if name is None:
        # Resolve as that spelling's own sessions do: through its search path.
        with psycopg.connect(spelling.conninfo, autocommit=True) as conn:
            found = conn.execute(
                "SELECT %s::regclass::oid", (sql.Identifier(spelling.table).as_string(conn),)
            ).fetchone()
    else:
        found = admin.execute("SELECT %s::regclass::oid", (name.as_string(admin),)).fetchone()
    assert found is not None
    return int(found[0])


def test_every_spelling_takes_one_lock(
    admin: psycopg.Connection[Any], spellings: list[Spelling]
) -> None:
    first = spellings[0].storage()
    StateStore(Counter, first, default=Counter).save(Counter(count=1))  # creates the table
    oids = {_oid(admin, s) for s in spellings}
    assert len(oids) == 1, "the spellings do not name one table"
    ids = {s.storage().lock_id for s in spellings}
    assert ids == {_lock_key(oids.pop(), "jobs")}


def test_a_session_through_one_spelling_makes_every_other_wait(spellings: list[Spelling]) -> None:
    StateStore(Counter, spellings[0].storage(), default=Counter).save(Counter(count=1))
    for i, holder in enumerate(spellings):
        with holder.storage() as held_storage, held_storage.session(5) as held:
            for j, other in enumerate(spellings):
                if i == j:
                    continue
                with other.storage() as storage:
                    store = StateStore(Counter, storage, default=Counter, timeout=0)
                    with pytest.raises(LockTimeout) as e:
                        store.update(bump)
                    # The holder is found through the same server-resolved key.
                    assert e.value.holder is not None, (holder, other)
                    assert e.value.holder["pid"] == held.backend_pid, (holder, other)
    # Each spelling reads and writes the same row.
    for s in spellings:
        with s.storage() as storage:
            StateStore(Counter, storage).update(bump)
    with spellings[0].storage() as storage:
        assert StateStore(Counter, storage).load().count == 1 + len(spellings)


def test_processes_through_different_spellings_lose_no_update(
    spellings: list[Spelling], tmp_path: Path
) -> None:
    StateStore(Counter, spellings[0].storage(), default=Counter).save(Counter())
    start = tmp_path / "start"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=increment_as, args=(s, "jobs", 25, str(start), 2)) for s in spellings
    ]
    for p in procs:
        p.start()
    start.touch()
    for p in procs:
        p.join(80)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    with spellings[1].storage() as storage:
        assert StateStore(Counter, storage).load().count == 50 * len(spellings)


def test_threads_race_to_create_the_table_through_different_spellings(
    spellings: list[Spelling],
) -> None:
    # New storages, no table yet: their first sessions race to create it.
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(spellings) * 2)

    def run(s: Spelling) -> None:
        try:
            with s.storage() as storage:
                store = StateStore(Counter, storage, default=Counter)
                barrier.wait()
                for _ in range(10):
                    store.update(bump)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in spellings * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with spellings[0].storage() as storage:
        assert StateStore(Counter, storage).load().count == 20 * len(spellings)


def test_different_rows_take_different_locks(
    admin: psycopg.Connection[Any], table: str, schema: str
) -> None:
    # Same key, same table name: in public and in another schema (reached once by
    # its name and once through the search path). Two tables, two rows, two locks.
    rows = [
        Spelling(DSN, None, table).storage("jobs"),
        Spelling(DSN, None, table).storage("other"),
        Spelling(DSN, schema, table).storage("jobs"),
        Spelling(_with_path(schema), None, table).storage("other"),
    ]
    try:
        for s in rows:
            StateStore(Counter, s, default=Counter).save(Counter(count=1))
        assert len({s.lock_id for s in rows[:3]}) == 3
        assert rows[3].lock_id == Spelling(DSN, schema, table).storage("other").lock_id
        # All held at once: none waits for another.
        sessions = [s.session(0) for s in rows[:3]]
        for session in sessions:
            session.__enter__()
        for session in reversed(sessions):
            session.__exit__(None, None, None)
    finally:
        for s in rows:
            s.close()
    assert row(admin, table, "jobs") is not None


def test_a_table_created_again_is_looked_up_again(
    admin: psycopg.Connection[Any], table: str
) -> None:
    # A storage that used the table before it was dropped and created again (a new
    # OID) takes the lock of the new table, not of the old one.
    with PostgresStorage(DSN, key="jobs", table=table) as old:
        StateStore(Counter, old, default=Counter).save(Counter(count=1))
        before = old.lock_id
        admin.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
        with PostgresStorage(DSN, key="jobs", table=table, schema="public") as new:
            StateStore(Counter, new, default=Counter).save(Counter(count=5))
            assert new.lock_id != before
            with new.session(5), pytest.raises(LockTimeout):
                StateStore(Counter, old, timeout=0).update(bump)
        assert StateStore(Counter, old).update(bump).count == 6


def _make(admin: psycopg.Connection[Any], name: str, kind: str) -> None:
    t = sql.Identifier(name)
    if kind == "view":
        base = sql.Identifier(name + "_base")
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (key text PRIMARY KEY, document text NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now()); CREATE VIEW {} AS SELECT * FROM {}"
            ).format(base, t, base)
        )
    elif kind == "char-key":
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (key char(40) PRIMARY KEY, document text NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(t)
        )
    elif kind == "case-insensitive-key":
        coll = sql.Identifier(name + "_ci")
        try:
            admin.execute(
                sql.SQL(
                    "CREATE COLLATION {} (provider = icu, locale = 'und-u-ks-level2', "
                    "deterministic = false)"
                ).format(coll)
            )
        except psycopg.Error as e:
            pytest.skip(f"no ICU collations on this server: {e}")
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (key text COLLATE {} PRIMARY KEY, document text NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(t, coll)
        )
    elif kind == "partition":
        parent = sql.Identifier(name + "_parent")
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (key text PRIMARY KEY, document text NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now()) PARTITION BY LIST (key); "
                "CREATE TABLE {} PARTITION OF {} DEFAULT"
            ).format(parent, t, parent)
        )
    elif kind == "no-key":
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (name text PRIMARY KEY, document text NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(t)
        )
    elif kind in ("inheritance-parent", "inheritance-child"):
        other = sql.Identifier(name + "_other")
        columns = sql.SQL(
            "(key text PRIMARY KEY, document text NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
        parent, child = (t, other) if kind == "inheritance-parent" else (other, t)
        admin.execute(
            sql.SQL("CREATE TABLE {} {}; CREATE TABLE {} () INHERITS ({})").format(
                parent, columns, child, parent
            )
        )
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("view", "is a view"),
        ("char-key", "key column of type character"),
        ("case-insensitive-key", "nondeterministic collation"),
        ("partition", "is a partition"),
        ("inheritance-parent", "table inheritance"),
        ("inheritance-child", "table inheritance"),
        ("no-key", "no column named key"),
    ],
)
def test_tables_a_row_lock_would_not_guard_are_refused(
    admin: psycopg.Connection[Any], schema: str, kind: str, says: str
) -> None:
    admin.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
    try:
        _make(admin, "docs", kind)
    finally:
        admin.execute("RESET search_path")
    with PostgresStorage(DSN, key="jobs", table="docs", schema=schema) as storage:
        store = StateStore(Counter, storage, default=Counter)
        with pytest.raises(LockError, match=says) as e:
            store.save(Counter(count=1))
        assert "docs/postgres.md" in str(e.value)
        assert str(e.value).startswith(storage.location)


def test_a_plain_table_made_in_advance_is_accepted(
    admin: psycopg.Connection[Any], schema: str
) -> None:
    # The positive control of the refusals: docs/postgres.md's own statements,
    # with a varchar key.
    admin.execute(
        sql.SQL(
            "CREATE TABLE {}.docs (key varchar(200) PRIMARY KEY, document text NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now()); "
            "CREATE TABLE {}.docs_backups (key text NOT NULL, label text NOT NULL, "
            "document text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (key, label))"
        ).format(sql.Identifier(schema), sql.Identifier(schema))
    )
    with PostgresStorage(DSN, key="jobs", table="docs", schema=schema) as storage:
        assert StateStore(Counter, storage, default=Counter).update(bump).count == 1


def test_lock_id_of_a_missing_table_is_a_typed_error(table: str) -> None:
    with (
        PostgresStorage(DSN, key="jobs", table=table) as storage,
        pytest.raises(LockError, match="does not exist yet"),
    ):
        _ = storage.lock_id
