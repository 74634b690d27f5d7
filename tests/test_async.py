"""AsyncStateStore: the same guarantees as StateStore, without blocking the event loop."""

from __future__ import annotations

import asyncio
import inspect
import json
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import workers
from conftest import Counter
from pydantic import BaseModel, field_validator

from statestore import (
    AsyncStateStore,
    DirectoryLock,
    LockTimeout,
    NestedTransactionError,
    StateCorruptError,
    StateNotFoundError,
    StateStore,
    StateValidationError,
)

pytestmark = pytest.mark.timeout(60)

SPAWN = mp.get_context("spawn")


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def bump(state: Counter) -> None:
    state.count += 1


async def abump(state: Counter) -> None:
    await asyncio.sleep(0)  # give other tasks a turn while the lock is held
    state.count += 1


def lock_dir(path: Path) -> Path:
    return path.parent / (path.name + ".lock")


def assert_lock_free(path: Path) -> None:
    """A second store takes the lock at once."""
    assert not lock_dir(path).exists()
    StateStore(Counter, path, default=Counter, timeout=0.5).update(lambda s: None)


def statestore_threads() -> list[str]:
    """The library's own threads still running a moment after the work ended (a thread
    that waited for a lock ends right after handing it over: allow it that moment)."""
    deadline = time.monotonic() + 2.0
    while True:
        left = [
            t.name
            for t in threading.enumerate()
            if t.name.startswith("statestore") and t.name != "statestore-heartbeat"
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


@contextmanager
def lock_held_by_a_thread(path: Path) -> Iterator[threading.Event]:
    """Hold the store's lock in another thread until the yielded event is set."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with DirectoryLock(lock_dir(path)):
            taken.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(10)
    try:
        yield release
    finally:
        release.set()
        thread.join(10)


def async_increment(path: str, tasks: int, times: int, start: str) -> None:
    """Child process: ``tasks`` asyncio tasks, each incrementing ``times`` times."""

    async def main() -> None:
        store = AsyncStateStore(Counter, path, default=Counter, timeout=60)
        while not os.path.exists(start):
            await asyncio.sleep(0.001)

        async def worker(n: int) -> None:
            for _ in range(times):
                await store.update(bump if n % 2 else abump)

        await asyncio.gather(*(worker(n) for n in range(tasks)))

    asyncio.run(main())


class MemoryStorage:
    """A storage that locks itself (as a database backend does), kept in memory."""

    location = "memory://counter"

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.lock = threading.Lock()
        self.writes = 0

    def read(self) -> bytes | None:
        return self.data

    def exists(self) -> bool:
        return self.data is not None

    @contextmanager
    def session(self, timeout: float) -> Iterator[MemoryStorage]:
        if not self.lock.acquire(timeout=timeout):
            raise LockTimeout(self.location, timeout=timeout)
        try:
            yield self
        finally:
            self.lock.release()

    def write(self, data: bytes) -> None:
        self.data = data
        self.writes += 1

    def backup_location(self, label: str) -> str:
        return f"{self.location}.{label}"

    def backup(self, label: str, data: bytes) -> str:
        return self.backup_location(label)


# ---------------------------------------------------------------- construction


def test_takes_the_same_arguments_as_statestore() -> None:
    ours = inspect.signature(AsyncStateStore.__init__).parameters
    theirs = inspect.signature(StateStore.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


def test_wraps_a_store_and_gives_it_back(state_path: Path) -> None:
    store = AsyncStateStore(Counter, state_path, default=Counter, version=3, timeout=2.5)
    assert isinstance(store.sync, StateStore)
    assert store.sync.timeout == 2.5
    assert (store.model, store.path, store.version) == (Counter, state_path, 3)
    assert store.json_schema() == store.sync.json_schema()
    assert repr(store) == f"AsyncStateStore(Counter, {str(state_path)!r})"

    sync = StateStore(Counter, state_path, default=Counter)
    wrapped = AsyncStateStore.from_store(sync)
    assert wrapped.sync is sync
    with pytest.raises(TypeError, match="needs a StateStore"):
        AsyncStateStore.from_store(wrapped)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseModel subclass"):
        AsyncStateStore(dict, state_path)  # type: ignore[type-var]


def test_a_storage_that_locks_itself() -> None:
    storage = MemoryStorage()

    async def main() -> None:
        store = AsyncStateStore(Counter, storage, default=Counter)
        assert (repr(store), store.location) == (
            "AsyncStateStore(Counter, 'memory://counter')",
            "memory://counter",
        )
        await asyncio.gather(*(store.update(bump if n % 2 else abump) for n in range(20)))
        assert (await store.load()).count == 20
        inside = asyncio.Event()

        async def change(state: Counter) -> None:
            state.count = 99
            inside.set()
            await asyncio.sleep(30)

        task = asyncio.create_task(store.update(change))
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not storage.lock.locked()
        async with store.transaction() as state:
            with pytest.raises(NestedTransactionError):
                await store.save(Counter())
            state.count += 1

    run(main())
    assert StateStore(Counter, storage).load().count == 21
    # Gathered plain functions may be committed in groups (``_async_group.py``); an
    # ``async def`` one commits by itself: at most one write per update.
    assert 2 <= storage.writes <= 21


# ---------------------------------------------------------- reading and writing


def test_load_save_exists_and_update(state_path: Path) -> None:
    async def main() -> None:
        store = AsyncStateStore(Counter, state_path, default=Counter)
        assert await store.exists() is False
        assert await store.load() == Counter()
        await store.save(Counter(count=5, note="saved"))
        assert await store.exists() is True
        assert await store.update(bump) == Counter(count=6, note="saved")
        assert await store.update(abump) == Counter(count=7, note="saved")
        assert await store.update(lambda s: Counter(count=s.count * 10)) == Counter(count=70)

        async def replace(s: Counter) -> Counter:
            return Counter(count=s.count + 1, note="async")

        assert await store.update(replace) == Counter(count=71, note="async")
        assert await store.update(lambda s: replace(s)) == Counter(count=72, note="async")
        async with store.transaction() as state:
            state.count += 100
        assert await store.load() == Counter(count=172, note="async")

    run(main())
    saved = json.loads(state_path.read_text())
    assert saved.pop("$commit")["revision"] == 7  # one per commit
    assert saved == {"schema_version": 1, "count": 172, "note": "async"}
    assert statestore_threads() == []


def test_errors_are_the_typed_errors_of_the_sync_api(state_path: Path) -> None:
    async def main() -> None:
        store = AsyncStateStore(Counter, state_path, read_attempts=1)
        with pytest.raises(StateNotFoundError):
            await store.load()
        with pytest.raises(StateNotFoundError):
            await store.update(bump)
        state_path.write_text("{not json")
        with pytest.raises(StateCorruptError) as info:
            await store.update(bump)
        assert info.value.line == 1
        with pytest.raises(StateCorruptError):
            async with store.transaction():
                pytest.fail("the block must not run")
        with pytest.raises(StateCorruptError):
            await store.save(Counter())

    run(main())
    assert state_path.read_text() == "{not json"
    assert not lock_dir(state_path).exists()


def test_a_wrong_return_type_or_an_invalid_state_writes_nothing(state_path: Path) -> None:
    class Positive(BaseModel):
        count: int = 0

        @field_validator("count")
        @classmethod
        def positive(cls, v: int) -> int:
            if v < 0:
                raise ValueError("negative")
            return v

    async def wrong(state: Positive) -> Any:
        return {"count": 1}

    StateStore(Positive, state_path).save(Positive(count=1))
    before = state_path.read_bytes()

    async def main() -> None:
        store = AsyncStateStore(Positive, state_path, default=Positive)
        with pytest.raises(TypeError, match="wrong returned dict"):
            await store.update(wrong)
        with pytest.raises(StateValidationError):
            async with store.transaction() as state:
                state.count = -5  # assignment is not validated; the commit is
        with pytest.raises(StateValidationError):
            await store.update(lambda s: s.model_copy(update={"count": -1}))

    run(main())
    assert state_path.read_bytes() == before
    assert not lock_dir(state_path).exists()


def test_migrate(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"schema_version": 1, "n": 4}')

    def rename(doc: dict[str, Any]) -> dict[str, Any]:
        return {"count": doc.pop("n")}

    async def main() -> None:
        store = AsyncStateStore(Counter, path, version=2, migrations={1: rename})
        report = await store.migrate(dry_run=True)
        assert (report.from_version, report.to_version, report.written) == (1, 2, False)
        assert json.loads(path.read_text())["schema_version"] == 1
        report = await store.migrate()
        assert report.written
        migrated = json.loads(path.read_text())
        assert migrated.pop("$commit")["revision"] == 1
        assert migrated == {"schema_version": 2, "count": 4, "note": ""}

    run(main())


# ------------------------------------------------------------------ concurrency


def test_many_tasks_lose_nothing(state_path: Path) -> None:
    async def main() -> None:
        store = AsyncStateStore(Counter, state_path, default=Counter)
        other = AsyncStateStore(Counter, state_path, default=Counter)  # a second object

        async def worker(n: int) -> None:
            for i in range(8):
                if i % 3 == 0:
                    async with (store if n % 2 else other).transaction() as state:
                        await asyncio.sleep(0)
                        state.count += 1
                else:
                    await store.update(bump if i % 3 == 1 else abump)

        await asyncio.gather(*(worker(n) for n in range(25)))
        assert (await store.load()).count == 200

    run(main())
    assert statestore_threads() == []


def test_tasks_in_several_processes_lose_nothing(state_path: Path) -> None:
    start = state_path.parent / "start"
    procs = [
        SPAWN.Process(target=async_increment, args=(str(state_path), 4, 10, str(start)))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    start.touch()
    run(async_increment_here(state_path, start))
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert StateStore(Counter, state_path).load().count == 3 * 4 * 10 + 40


async def async_increment_here(path: Path, start: Path) -> None:
    store = AsyncStateStore(Counter, path, default=Counter, timeout=60)

    async def worker() -> None:
        for _ in range(10):
            async with store.transaction() as state:
                state.count += 1

    await asyncio.gather(*(worker() for _ in range(4)))


def test_the_event_loop_runs_while_another_process_holds_the_lock(state_path: Path) -> None:
    ready = state_path.parent / "ready"
    holder = SPAWN.Process(
        target=workers.hold_lock, args=(str(lock_dir(state_path)), str(ready), 0.6)
    )
    holder.start()
    try:
        workers.wait_for(str(ready))

        async def main() -> int:
            store = AsyncStateStore(Counter, state_path, default=Counter)
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticking = asyncio.create_task(ticker())
            started = time.monotonic()
            await store.update(bump)
            waited = time.monotonic() - started
            stop.set()
            await ticking
            assert waited > 0.2, "update() should have waited for the holder"
            return ticks

        ticks = run(main())
    finally:
        holder.join(10)
    assert ticks >= 15
    assert StateStore(Counter, state_path).load().count == 1


def test_lock_timeouts(state_path: Path) -> None:
    async def main() -> None:
        store = AsyncStateStore(Counter, state_path, default=Counter, timeout=0.2)
        # Held by another thread (as by another process): the thread's wait times out.
        with lock_held_by_a_thread(state_path):
            started = time.monotonic()
            with pytest.raises(LockTimeout) as info:
                await store.update(bump)
            assert 0.15 < time.monotonic() - started < 2
            assert info.value.holder is not None and info.value.holder["pid"] == os.getpid()
            with pytest.raises(LockTimeout):
                async with store.transaction():
                    pytest.fail("the block must not run")
        # Held by another task of this loop: the wait for its turn times out.
        entered = asyncio.Event()

        async def hold() -> None:
            async with store.transaction() as state:
                entered.set()
                await asyncio.sleep(0.3)
                state.count += 1

        holding = asyncio.create_task(hold())
        await entered.wait()
        with pytest.raises(LockTimeout, match="other tasks of this event loop"):
            await store.save(Counter(count=99))
        await holding
        assert (await store.load()).count == 1

    run(main())
    assert_lock_free(state_path)


# --------------------------------------------------------- exceptions, cancelling


def test_an_exception_in_the_block_writes_nothing_and_frees_the_lock(state_path: Path) -> None:
    StateStore(Counter, state_path).save(Counter(count=1))
    before = state_path.read_bytes()

    async def failing(state: Counter) -> None:
        state.count = 50
        await asyncio.sleep(0)
        raise KeyError("from fn")

    async def main() -> None:
        store = AsyncStateStore(Counter, state_path)
        with pytest.raises(ValueError, match="from the block"):
            async with store.transaction() as state:
                state.count = 99
                await asyncio.sleep(0)
                raise ValueError("from the block")
        assert_lock_free(state_path)  # while the loop still runs
        with pytest.raises(KeyError, match="from fn"):
            await store.update(failing)
        assert not lock_dir(state_path).exists()

    run(main())
    assert state_path.read_bytes() == before


@pytest.mark.parametrize("where", ["transaction", "async-fn"])
def test_cancelled_inside_the_block_writes_nothing_and_frees_the_lock(
    state_path: Path, where: str
) -> None:
    StateStore(Counter, state_path).save(Counter(count=1))
    before = state_path.read_bytes()

    async def main() -> None:
        store = AsyncStateStore(Counter, state_path)
        inside = asyncio.Event()

        async def change(state: Counter) -> None:
            state.count = 99
            inside.set()
            await asyncio.sleep(30)

        async def body() -> None:
            if where == "transaction":
                async with store.transaction() as state:
                    await change(state)
            else:
                await store.update(change)

        task = asyncio.create_task(body())
        await inside.wait()
        assert lock_dir(state_path).exists()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not lock_dir(state_path).exists()  # let go before the task ended
        assert state_path.read_bytes() == before
        assert_lock_free(state_path)

    run(main())
    assert StateStore(Counter, state_path).load().count == 1


def test_a_timeout_around_a_transaction_writes_nothing(state_path: Path) -> None:
    StateStore(Counter, state_path).save(Counter(count=1))
    before = state_path.read_bytes()

    async def main() -> None:
        store = AsyncStateStore(Counter, state_path)

        async def slow() -> None:
            async with store.transaction() as state:
                state.count = 2
                await asyncio.sleep(30)

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slow(), 0.1)

    run(main())
    assert state_path.read_bytes() == before
    assert_lock_free(state_path)


def test_cancelled_while_waiting_for_the_lock(state_path: Path) -> None:
    StateStore(Counter, state_path).save(Counter(count=1))

    async def main() -> None:
        store = AsyncStateStore(Counter, state_path, timeout=10)
        with lock_held_by_a_thread(state_path) as release:
            waiting = asyncio.create_task(store.update(lambda s: Counter(count=1000)))
            queued = asyncio.create_task(store.update(lambda s: Counter(count=2000)))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            waiting.cancel()
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert time.monotonic() - started < 0.5, "cancelling must not wait for the lock"
            # The given-up thread stops waiting, though the lock is still held.
            deadline = time.monotonic() + 2
            while statestore_threads() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert statestore_threads() == [], "the worker thread still waits for the lock"
            release.set()
        assert await store.update(bump) == Counter(count=2)

    run(main())
    assert StateStore(Counter, state_path).load().count == 2
    deadline = time.monotonic() + 5
    while statestore_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert statestore_threads() == []
    assert_lock_free(state_path)


def test_cancelled_while_another_process_holds_the_lock(state_path: Path) -> None:
    """The worker thread waits on the lock directory, not on another thread: it must
    stop there too, long before the holder lets go or the timeout runs out."""
    StateStore(Counter, state_path).save(Counter(count=1))
    ready = state_path.parent / "ready"
    holder = SPAWN.Process(
        target=workers.hold_lock, args=(str(lock_dir(state_path)), str(ready), 5)
    )
    holder.start()
    try:
        workers.wait_for(str(ready))

        async def main() -> float:
            store = AsyncStateStore(Counter, state_path, timeout=30)
            task = asyncio.create_task(store.update(lambda s: Counter(count=1000)))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = time.monotonic()
            while statestore_threads() and time.monotonic() - started < 3:
                await asyncio.sleep(0.01)
            return time.monotonic() - started

        assert run(main()) < 1.0, "the worker thread kept waiting for the lock"
        assert holder.is_alive(), "the holder let go before the check"
    finally:
        holder.join(10)
    assert StateStore(Counter, state_path).load().count == 1
    assert_lock_free(state_path)


def test_cancelled_while_a_plain_fn_runs_in_the_thread(state_path: Path) -> None:
    StateStore(Counter, state_path).save(Counter(count=1))
    before = state_path.read_bytes()
    running, finished = threading.Event(), threading.Event()

    def slow(state: Counter) -> None:
        state.count = 99
        running.set()
        time.sleep(0.3)
        finished.set()

    async def main() -> None:
        store = AsyncStateStore(Counter, state_path)
        task = asyncio.create_task(store.update(slow))
        await asyncio.to_thread(running.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The thread could not be stopped, but the task waited for it to let go,
        # and fn's result was not committed.
        assert finished.is_set()
        assert not lock_dir(state_path).exists()

    run(main())
    assert state_path.read_bytes() == before


# ----------------------------------------------------------------------- nesting


def test_nested_calls_in_the_same_task_fail_at_once(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    shared = DirectoryLock(tmp_path / "folder.lock")

    async def main() -> None:
        store = AsyncStateStore(Counter, path, default=Counter)
        again = AsyncStateStore(Counter, path, default=Counter)  # same file, other object
        a = AsyncStateStore(Counter, tmp_path / "a.json", default=Counter, lock=shared)
        b = AsyncStateStore(Counter, tmp_path / "b.json", default=Counter, lock=shared)
        inner: list[Callable[[], Awaitable[object]]] = [
            lambda: store.update(bump),
            lambda: store.save(Counter()),
            lambda: store.migrate(),
            lambda: again.update(abump),
            lambda: again.transaction().__aenter__(),
        ]
        started = time.monotonic()
        async with store.transaction() as state:
            state.count += 1
            for call in inner:
                with pytest.raises(NestedTransactionError, match="same file or lock"):
                    await call()
            assert (await store.load()).count == 0  # lock-free reads are fine
        assert time.monotonic() - started < 2

        async def nested(state: Counter) -> None:
            state.count += 1
            with pytest.raises(NestedTransactionError):
                await store.update(bump)

        await store.update(nested)
        assert (await store.load()).count == 2

        # Two files behind one lock: in asyncio each call has its own thread, so
        # the inner one would wait for the outer lock; it fails instead.
        async with a.transaction():
            with pytest.raises(NestedTransactionError):
                await b.update(bump)
        # A task started inside the block inherits its context, so it counts as inside.
        async with store.transaction() as state:
            with pytest.raises(NestedTransactionError):
                await asyncio.create_task(store.update(bump))
            state.count += 1
        assert (await store.load()).count == 3

    run(main())
    assert statestore_threads() == []


def test_other_tasks_wait_for_their_turn(state_path: Path) -> None:
    async def main() -> list[str]:
        store = AsyncStateStore(Counter, state_path, default=Counter)
        order: list[str] = []
        entered = asyncio.Event()

        async def outer() -> None:
            async with store.transaction() as state:
                order.append("outer in")
                entered.set()
                await asyncio.sleep(0.1)
                state.count += 1
                order.append("outer out")

        async def inner() -> None:
            await entered.wait()
            saved = await store.update(bump)
            order.append(f"inner saw {saved.count}")

        await asyncio.gather(outer(), inner())
        return order

    assert run(main()) == ["outer in", "outer out", "inner saw 2"]


def test_a_transaction_is_entered_once(state_path: Path) -> None:
    async def main() -> None:
        store = AsyncStateStore(Counter, state_path, default=Counter)
        tx = store.transaction()
        async with tx:
            pass
        with pytest.raises(RuntimeError, match="only once"):
            async with tx:
                pass

    run(main())
