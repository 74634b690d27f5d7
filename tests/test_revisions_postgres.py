"""Revisions and ``save(expect=)`` over PostgreSQL: the same API, the same bytes.

Against the real server (``STATESTORE_PG_DSN``; see tests/test_postgres.py),
including two processes racing with the same ``expect=``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Counter
from psycopg import sql
from test_postgres import DSN, admin, storage, table  # noqa: F401 - fixtures

from statestore import ConflictError, StateStore
from statestore.backends.postgres import PostgresStorage


def _counter(revision: str) -> int:
    return int(revision.split("-", 1)[0])


def test_read_save_expect_and_conflict(storage: PostgresStorage) -> None:  # noqa: F811
    store = StateStore(Counter, storage, default=Counter)
    assert store.read().revision == "0"
    store.save(Counter(count=1), expect="0")
    snap = store.read()
    assert _counter(snap.revision) == 1 and snap.written_by is not None
    store.update(lambda s: Counter(count=s.count + 1))
    with pytest.raises(ConflictError) as info:
        store.save(Counter(count=50), expect=snap.revision)
    assert info.value.expected == snap.revision
    assert info.value.found == store.read().revision != snap.revision
    assert store.load().count == 2
    store.save(Counter(count=50), expect=store.read().revision)
    assert store.load().count == 50


def test_a_change_made_in_the_table_is_a_new_revision(
    admin: psycopg.Connection[Any],  # noqa: F811
    table: str,  # noqa: F811
    storage: PostgresStorage,  # noqa: F811
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=1))
    snap = store.read()
    # A person's UPDATE in psql: the same layout, the stamp line untouched.
    admin.execute(
        sql.SQL("UPDATE {} SET document = replace(document, %s, %s) WHERE key = 'jobs'").format(
            sql.Identifier(table)
        ),
        ('"count": 1', '"count": 8'),
    )
    after = store.read()
    assert after.state.count == 8 and after.revision != snap.revision
    assert after.written_by is None
    with pytest.raises(ConflictError):
        store.save(Counter(count=9), expect=snap.revision)


_RACER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[5])
    from conftest import Counter
    from statestore import ConflictError, StateStore
    from statestore.backends.postgres import PostgresStorage
    dsn, table, expect, gate = sys.argv[1:5]
    with PostgresStorage(dsn, key="jobs", table=table) as storage:
        store = StateStore(Counter, storage, default=Counter)
        store.load()
        while not os.path.exists(gate):
            time.sleep(0.0005)
        try:
            store.save(Counter(count=os.getpid()), expect=expect)
            print("won", os.getpid())
        except ConflictError as e:
            print("lost", e.found)
    """
)


def test_two_processes_with_the_same_expect_exactly_one_wins(
    table: str,  # noqa: F811
    storage: PostgresStorage,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = StateStore(Counter, storage, default=Counter)
    store.save(Counter(count=0))
    tests = str(Path(__file__).parent)
    for round_ in range(4):
        expect = store.read().revision
        gate = tmp_path / f"gate{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, DSN, table, expect, str(gate), tests],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        gate.touch()
        outs = [p.communicate(timeout=60)[0].split() for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        winners = [int(o[1]) for o in outs if o[0] == "won"]
        assert len(winners) == 1, outs
        after = store.read()
        assert after.state.count == winners[0]
        assert after.written_by is not None and after.written_by.pid == winners[0]
