"""Functions run in child processes by tests/test_postgres_folder.py (importable under spawn)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from conftest import Counter

from statestore import StateStore
from statestore.backends.postgres import PostgresFolder, PostgresStorage

#: What the two accounts of a transfer test hold together.
TOTAL = 1000


def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.005)


def transfers(dsn: str, table: str, namespace: str, start: str, stop: str, times: int) -> None:
    """Move random amounts between the documents "a" and "b", one folder transaction each,
    until ``stop`` exists or ``times`` transfers were made (0: no limit)."""
    rng = random.Random(os.getpid())
    with PostgresFolder(dsn, namespace, table=table, timeout=60) as folder:
        a = folder.store(Counter, "a", default=Counter)
        b = folder.store(Counter, "b", default=Counter)
        _wait_for(start)
        done = 0
        while not os.path.exists(stop) and not (times and done >= times):
            amount = rng.randint(1, 50)
            with folder.transaction() as tx:
                tx[a].count -= amount
                tx[b].count += amount
                tx[a].note = tx[b].note = f"{os.getpid()}:{done}"
            done += 1
            time.sleep(rng.random() * 0.002)


def read_sums(dsn: str, table: str, namespace: str, start: str, out: str, reads: int) -> None:
    """Read "a" and "b" ``reads`` times with ``folder.read()``, and as many times with two
    separate loads a moment apart (the positive control); report the sums seen."""
    with PostgresFolder(dsn, namespace, table=table) as folder:
        a = folder.store(Counter, "a", default=Counter)
        b = folder.store(Counter, "b", default=Counter)
        _wait_for(start)
        snapshot_sums: list[int] = []
        snapshot_notes: list[bool] = []
        control_sums: list[int] = []
        deadline = time.monotonic() + 20
        while len(snapshot_sums) < reads or (
            all(s == TOTAL for s in control_sums) and time.monotonic() < deadline
        ):
            snap = folder.read(a, b)
            snapshot_sums.append(snap[a].count + snap[b].count)
            snapshot_notes.append(snap[a].note == snap[b].note)
            first = a.load()
            time.sleep(0.003)  # a transfer may commit in between: then the sum is off
            control_sums.append(first.count + b.load().count)
        Path(out).write_text(
            json.dumps(
                {"snapshots": snapshot_sums, "notes": snapshot_notes, "control": control_sums}
            )
        )


def hold_in_commit(dsn: str, table: str, namespace: str, ready: str) -> None:
    """Change "a" and "b" in one folder transaction and announce the commit; the test
    blocks the write of "b" with a row lock, then kills this process."""
    with PostgresFolder(dsn, namespace, table=table, timeout=60) as folder:
        a = folder.store(Counter, "a", default=Counter)
        b = folder.store(Counter, "b", default=Counter)
        with folder.transaction() as tx:
            tx[a].count -= 500
            tx[b].count += 500
            Path(ready).write_text("committing")
        Path(ready).write_text("committed")  # never reached: killed during the commit


def plain_increments(dsn: str, table: str, key: str, times: int, start: str) -> None:
    """Increment the document ``key`` through a PostgresStorage made on its own."""
    with PostgresStorage(dsn, key=key, table=table, schema="public") as storage:
        store = StateStore(Counter, storage, default=Counter, timeout=60)
        _wait_for(start)
        for _ in range(times):
            store.update(_bump)


def _bump(state: Counter) -> None:
    state.count += 1
