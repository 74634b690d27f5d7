"""The transaction core, the storage seam and the async store without a thread per operation.

What is held here: the sync and async stores drive the same steps; an async
locked operation starts no thread when the lock is free; a transaction may end
on another thread than the one that began it; the storage builds the lock and
says what the store needs; a storage written to the older, smaller protocol
still works; nesting across the async/sync border is refused, not waited out.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statestore import (
    AsyncStateStore,
    DirectoryLock,
    NestedTransactionError,
    StateCorruptError,
    StateStore,
)
from statestore.backends import FileStorage, Storage, complete


class Counter(BaseModel):
    count: int = 0


def bump(state: Counter) -> None:
    state.count += 1


@contextmanager
def threads_started() -> Iterator[list[str]]:
    """The names of the threads the threading module starts during the block."""
    names: list[str] = []

    def seen(frame: Any, event: str, arg: Any) -> None:
        names.append(threading.current_thread().name)
        threading.setprofile(None)  # type: ignore[arg-type]
        import sys

        sys.setprofile(None)

    threading.setprofile(seen)
    try:
        yield names
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]


def test_an_uncontended_async_update_starts_no_thread_of_its_own(tmp_path: Path) -> None:
    store = AsyncStateStore(Counter, tmp_path / "s.json", default=Counter, durable=False)

    async def main() -> None:
        await store.update(bump)  # the executor's first thread may start here
        with threads_started() as names:
            for _ in range(30):
                await store.update(bump)
                async with store.transaction() as state:
                    state.count += 1
                await store.save(Counter(count=(await store.load()).count))
        ours = [n for n in names if n.startswith("statestore")]
        assert ours == [], f"threads started per operation: {ours}"

    asyncio.run(main())
    assert store.sync.load().count == 61


def test_a_contended_async_update_waits_on_a_thread_and_loses_nothing(tmp_path: Path) -> None:
    """Positive control of the test above: a lock held elsewhere does start a waiter."""
    path = tmp_path / "s.json"
    store = AsyncStateStore(Counter, path, default=Counter, durable=False)
    held = DirectoryLock.for_file(path).acquire()

    async def main() -> list[str]:
        with threads_started() as names:
            task = asyncio.create_task(store.update(bump))
            await asyncio.sleep(0.2)
            assert not task.done()
            held.release()
            await task
        return names

    names = asyncio.run(main())
    assert any(n.startswith("statestore") for n in names)
    assert store.sync.load().count == 1


def test_a_sync_transaction_may_end_on_another_thread(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    tx = store.transaction()
    state = tx.__enter__()
    state.count = 5
    done: list[BaseException | None] = []

    def finish() -> None:
        try:
            tx.__exit__(None, None, None)
            done.append(None)
        except BaseException as e:  # pragma: no cover - reported below
            done.append(e)

    t = threading.Thread(target=finish)
    t.start()
    t.join()
    assert done == [None]
    assert store.load().count == 5
    # The lock is free for this thread and for others, and nesting marks are gone.
    assert not DirectoryLock.for_file(path).is_held
    store.update(bump)
    with DirectoryLock.for_file(path).acquire(timeout=0):
        pass
    assert store.load().count == 6


def test_an_aborted_transaction_writes_nothing_and_its_lock_is_free(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    before = path.read_bytes()
    with pytest.raises(ZeroDivisionError), store.transaction() as state:
        state.count = 99
        1 / 0  # noqa: B018
    assert path.read_bytes() == before
    with DirectoryLock.for_file(path).acquire(timeout=0):
        pass


def test_the_file_storage_builds_the_lock_the_store_uses(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    storage = FileStorage(path)
    assert storage.lock.path == os.path.realpath(path) + ".lock"
    assert storage.durable and storage.identity == os.path.realpath(path)
    store = StateStore(Counter, path)
    assert store.lock is not None and store.lock.path == storage.lock.path
    mine = DirectoryLock(tmp_path / "shared.lock")
    assert StateStore(Counter, path, lock=mine).lock is mine
    assert StateStore(Counter, path, lock=tmp_path / "x.lock").lock.path == str(  # type: ignore[union-attr]
        tmp_path / "x.lock"
    )
    assert StateStore(Counter, path, durable=False).durable is False
    # A store over a storage it was given uses that storage's lock.
    over = StateStore(Counter, FileStorage(path, mine))
    assert over.lock is mine and over.storage.lock is mine


def test_a_file_storage_is_a_complete_storage() -> None:
    assert isinstance(FileStorage("/tmp/x.json"), Storage)
    storage = FileStorage("/tmp/x.json")
    assert complete(storage) is storage


class OldStorage:
    """A storage written to the first protocol only (location, read, exists, session)."""

    location = "memory://old"

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.mutex = threading.Lock()

    def read(self) -> bytes | None:
        return self.data

    def exists(self) -> bool:
        return self.data is not None

    @contextmanager
    def session(self, timeout: float) -> Iterator[OldStorage]:
        assert self.mutex.acquire(timeout=timeout)
        try:
            yield self
        finally:
            self.mutex.release()

    def write(self, data: bytes) -> None:
        self.data = data

    def backup_location(self, label: str) -> str:
        return f"{self.location}.{label}"

    def backup(self, label: str, data: bytes) -> str:
        return self.backup_location(label)


def test_a_storage_of_the_older_protocol_gets_defaults() -> None:
    old = OldStorage()
    store = StateStore(Counter, old, default=Counter)  # type: ignore[arg-type]
    assert store.storage is old
    assert store.lock is None and store.durable is True
    store.update(bump)

    async def main() -> None:
        a = AsyncStateStore.from_store(store)
        await asyncio.gather(*(a.update(bump) for _ in range(10)))

    asyncio.run(main())
    assert store.load().count == 11
    assert not old.mutex.locked()


def test_a_blocking_call_inside_an_async_update_is_refused_not_waited_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.json"
    store = AsyncStateStore(Counter, path, default=Counter, timeout=30)
    shared = DirectoryLock(tmp_path / "shared.lock", timeout=30)
    a = AsyncStateStore(Counter, tmp_path / "a.json", default=Counter, lock=shared, timeout=30)
    b = StateStore(Counter, tmp_path / "b.json", default=Counter, lock=shared, timeout=30)

    def nested_same_file(state: Counter) -> None:
        store.sync.update(bump)

    def nested_same_lock(state: Counter) -> None:
        b.update(bump)

    async def main() -> None:
        with pytest.raises(NestedTransactionError):
            await asyncio.wait_for(store.update(nested_same_file), 10)
        with pytest.raises(NestedTransactionError):
            await asyncio.wait_for(a.update(nested_same_lock), 10)

    asyncio.run(main())
    assert not path.exists() and not (tmp_path / "b.json").exists()


def test_sync_stores_sharing_one_lock_may_still_nest(tmp_path: Path) -> None:
    """The file lock is reentrant per thread: the documented two-stores-one-lock pattern."""
    shared = DirectoryLock(tmp_path / "shared.lock")
    a = StateStore(Counter, tmp_path / "a.json", default=Counter, lock=shared)
    b = StateStore(Counter, tmp_path / "b.json", default=Counter, lock=shared)
    with a.transaction() as state:
        state.count = 1
        b.update(bump)
    assert (a.load().count, b.load().count) == (1, 1)
    with pytest.raises(NestedTransactionError), a.transaction():
        a.update(bump)


def test_doctor_and_the_store_read_through_one_decoder(tmp_path: Path) -> None:
    """A file the store refuses is one the doctor reports, with the same words."""
    from statestore._doctor import scan

    path = tmp_path / "s.json"
    path.write_bytes(b'{"count": NaN}\n')
    with pytest.raises(StateCorruptError) as caught:
        StateStore(Counter, path).load()
    found = [f for f in scan(str(tmp_path)) if f.name == "s.json"]
    assert found and found[0].kind == "unparseable"
    assert caught.value.message.removesuffix("; the file was left untouched") in found[0].detail
