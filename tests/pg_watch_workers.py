"""Processes for tests/test_postgres_watch.py: a watcher of a PostgreSQL row.

``python pg_watch_workers.py DSN TABLE KEY POLL STOP`` watches the row and prints
``ready`` once watching, then one line ``<count> <revision>`` per snapshot (or
``error <type>`` per error event), and exits after the snapshot whose count is
STOP.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import Counter

from statestore import StateStore, StateStoreError
from statestore.backends.postgres import PostgresStorage


def main(dsn: str, table: str, key: str, poll: str, stop: str) -> None:
    storage = PostgresStorage(dsn, key=key, table=table, watch_poll=float(poll))
    store = StateStore(Counter, storage, default=Counter)
    with store.watch(timeout=60) as watch:
        print("ready", flush=True)
        while True:
            try:
                for snap in watch:
                    print(snap.state.count, snap.revision, flush=True)
                    if snap.state.count == int(stop):
                        return
                return  # the timeout: the parent sees the missing lines
            except StateStoreError as e:
                print("error", type(e).__name__, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
