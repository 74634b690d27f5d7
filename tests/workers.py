"""Functions run in child processes by the tests (importable under spawn)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from conftest import Counter

from statestore import DirectoryLock, StateStore


def wait_for(path: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.001)


def increment(path: str, times: int, start: str, threads: int = 1) -> None:
    """Increment the counter ``times`` times per thread, released by the start file."""
    increment_store(StateStore(Counter, path, default=Counter), times, start, threads)


def increment_store(store: StateStore[Counter], times: int, start: str, threads: int) -> None:
    """:func:`increment` on a store of any backend."""
    wait_for(start)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(times):

                def bump(s: Counter) -> None:
                    s.count += 1

                store.update(bump)
        except BaseException as e:  # re-raised below
            errors.append(e)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]


def hold_lock(lock_path: str, ready: str, seconds: float, lease: float = 30.0) -> None:
    """Take the lock, announce it, and keep it for ``seconds``."""
    with DirectoryLock(lock_path, lease=lease):
        Path(ready).touch()
        time.sleep(seconds)


def transact_slowly(path: str, lease: float, ready: str, result: str) -> None:
    """Open a transaction, announce it, wait for 'go', then try to commit."""
    store = StateStore(
        Counter, path, default=Counter, lock=DirectoryLock(path + ".lock", lease=lease)
    )
    try:
        with store.transaction() as state:
            state.note = "from the stopped holder"
            Path(ready).touch()
            wait_for(ready + ".go")
        Path(result).write_text("committed")
    except Exception as e:  # reported to the parent
        Path(result).write_text(f"{type(e).__name__}: {e}")


def critical_section(lock_path: str, start: str, marker: str, log: str, rounds: int) -> None:
    """Enter the critical section ``rounds`` times; any overlap is recorded in ``log``."""
    wait_for(start)
    lock = DirectoryLock(lock_path, timeout=60)
    for _ in range(rounds):
        with lock:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                with open(log, "a") as f:
                    f.write(f"overlap in pid {os.getpid()}\n")
                continue
            os.close(fd)
            time.sleep(0.0005)
            os.unlink(marker)
