"""Updates of several tasks through one async store are committed together (``_async_group.py``).

Each test forms a group deterministically: a first update holds the lock in an
``async def`` function until the others have queued, then lets go; the queued
ones are then one group, which the revision counter shows (it goes up once per
commit).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statestore import (
    AsyncStateStore,
    LockTimeout,
    NestedTransactionError,
    StateStore,
    StateValidationError,
    StateWriteError,
)


class Doc(BaseModel):
    n: int = 0
    poisoned: bool = False


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def counter_of(path: Path) -> int:
    return int(StateStore(Doc, path).read().revision.split("-")[0])


def queued(store: AsyncStateStore[Doc]) -> int:
    return len(store._group()._queue)


async def until(check: Callable[[], bool]) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the updates did not queue")


async def group(store: AsyncStateStore[Doc], fns: list[Any]) -> list[Any]:
    """A first update that holds the lock until ``fns`` have queued (in order), then
    those updates, each in a task of its own; their outcomes in order."""
    go, inside = asyncio.Event(), asyncio.Event()

    async def first(s: Doc) -> None:
        inside.set()
        await go.wait()
        s.n += 1

    lead = asyncio.create_task(store.update(first))
    await inside.wait()
    tasks = []
    for i, fn in enumerate(fns):
        tasks.append(asyncio.create_task(store.update(fn)))
        await until(lambda i=i: queued(store) >= i + 2)
    go.set()
    await lead
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def bump(s: Doc) -> None:
    s.n += 1


async def abump(s: Doc) -> None:
    await asyncio.sleep(0)
    s.n += 1


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "state.json"
    StateStore(Doc, p).save(Doc())
    return p


def test_queued_updates_are_one_commit_and_each_caller_gets_its_own_state(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)
    before = counter_of(path)
    results = run(group(store, [bump] * 5))
    assert [r.n for r in results] == [2, 3, 4, 5, 6]
    assert StateStore(Doc, path).load().n == 6
    assert counter_of(path) == before + 2  # the first update, then one group


def test_an_async_function_commits_by_itself_and_ends_the_run_of_plain_ones(
    path: Path,
) -> None:
    # An async def function awaits (the network, a model): grouped, it would hold
    # back the callers before it.
    store = AsyncStateStore(Doc, path, default=Doc)
    before = counter_of(path)
    results = run(group(store, [bump, bump, abump, bump, bump]))
    assert [r.n for r in results] == [2, 3, 4, 5, 6]  # first come, first served
    assert counter_of(path) == before + 4  # first; bump+bump; abump; bump+bump


def test_gathered_updates_lose_nothing(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)

    async def main() -> None:
        await asyncio.gather(*(store.update(bump) for i in range(60)))
        await asyncio.gather(*(store.update(bump if i % 3 else abump) for i in range(60)))

    run(main())
    assert StateStore(Doc, path).load().n == 120
    assert counter_of(path) < 100


def test_a_function_that_raises_fails_only_its_caller(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)

    def poison(s: Doc) -> None:
        s.poisoned = True
        s.n += 100
        raise ValueError("no")

    async def apoison(s: Doc) -> None:
        s.poisoned = True
        raise KeyError("no")

    def invalid(s: Doc) -> None:
        s.n = "x"  # type: ignore[assignment]

    results = run(group(store, [bump, poison, abump, apoison, invalid, bump]))
    assert isinstance(results[1], ValueError)
    assert isinstance(results[3], KeyError)
    assert isinstance(results[4], StateValidationError)
    assert [results[i].n for i in (0, 2, 5)] == [2, 3, 4]
    state = StateStore(Doc, path).load()
    assert state.n == 4 and not state.poisoned


def test_each_function_runs_in_its_callers_context(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")
    seen: list[tuple[str, str]] = []

    def plain(s: Doc) -> None:
        seen.append(("plain", var.get()))
        assert threading.current_thread() is not threading.main_thread()  # a worker
        s.n += 1

    async def coro(s: Doc) -> None:
        seen.append(("async", var.get()))
        s.n += 1

    def returns_awaitable(s: Doc) -> Any:
        return coro(s)  # a plain function whose result is awaited, in its task

    def as_(name: str, fn: Any) -> Any:
        async def task() -> Any:
            var.set(name)
            return await store.update(fn)

        return task

    async def main() -> list[Any]:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()

        lead = asyncio.create_task(store.update(first))
        await inside.wait()
        tasks = []
        for i, (name, fn) in enumerate(
            [("one", plain), ("two", coro), ("three", returns_awaitable)]
        ):
            tasks.append(asyncio.create_task(as_(name, fn)()))
            await until(lambda i=i: queued(store) >= i + 2)
        go.set()
        await lead
        return list(await asyncio.gather(*tasks))

    results = run(main())
    assert seen == [("plain", "one"), ("async", "two"), ("async", "three")]
    assert [r.n for r in results] == [1, 2, 3]


def test_a_nested_call_in_a_queued_function_fails_only_its_caller(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)

    async def nested(s: Doc) -> None:
        await store.save(Doc())

    def nested_sync(s: Doc) -> None:
        StateStore(Doc, path).update(bump)

    results = run(group(store, [bump, nested, nested_sync, bump]))
    assert isinstance(results[1], NestedTransactionError)
    assert isinstance(results[2], NestedTransactionError)
    assert StateStore(Doc, path).load().n == 3


def test_a_queued_task_cancelled_leaves_the_queue(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)

    async def main() -> None:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()
            s.n += 1

        lead = asyncio.create_task(store.update(first))
        await inside.wait()
        doomed = asyncio.create_task(store.update(bump))
        await until(lambda: queued(store) >= 2)
        kept = asyncio.create_task(store.update(bump))
        await until(lambda: queued(store) >= 3)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert queued(store) == 2
        go.set()
        await lead
        assert (await kept).n == 2

    run(main())
    assert StateStore(Doc, path).load().n == 2


def test_a_task_cancelled_in_its_turn_writes_nothing_of_its_own(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)

    async def main() -> None:
        go, inside, started = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()
            s.n += 1

        async def slow(s: Doc) -> None:
            s.poisoned = True
            started.set()
            await asyncio.sleep(30)

        lead = asyncio.create_task(store.update(first))
        await inside.wait()
        tasks = []
        for i, fn in enumerate([bump, slow, bump]):  # the first of them leads the group
            tasks.append(asyncio.create_task(store.update(fn)))
            await until(lambda i=i: queued(store) >= i + 2)
        go.set()
        await lead
        await started.wait()  # slow's turn, in its own task
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert [results[0].n, results[2].n] == [2, 3]

    run(main())
    state = StateStore(Doc, path).load()
    assert state.n == 3 and not state.poisoned


def test_a_cancelled_leader_commits_nothing_of_its_group(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)

    async def main() -> None:
        hold, holding = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:  # a group of its own
            holding.set()
            await hold.wait()
            s.n += 1

        blocker = asyncio.create_task(store.update(first))
        await holding.wait()
        leader = asyncio.create_task(store.update(bump))  # leads the next group
        await until(lambda: queued(store) >= 2)
        running = asyncio.Event()
        loop = asyncio.get_running_loop()

        def follower_fn(s: Doc) -> None:  # plain: grouped, on a worker thread
            loop.call_soon_threadsafe(running.set)
            time.sleep(0.3)
            s.n += 10

        follower = asyncio.create_task(store.update(follower_fn))
        await until(lambda: queued(store) >= 3)
        later = asyncio.create_task(store.update(bump))  # its turn never comes
        await until(lambda: queued(store) >= 4)
        hold.set()
        await blocker
        await running.wait()  # the leader waits for the follower's function
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        for task in (follower, later):
            with pytest.raises(StateWriteError, match="cancelled before its commit"):
                await task
        assert (await store.update(bump)).n == 2  # the store works on

    run(main())
    assert StateStore(Doc, path).load().n == 2


def test_a_queued_task_times_out_with_the_stores_timeout(path: Path) -> None:
    store = AsyncStateStore(Doc, path, default=Doc, timeout=0.2)

    async def main() -> None:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()
            s.n += 1

        lead = asyncio.create_task(store.update(first))
        await inside.wait()
        with pytest.raises(LockTimeout, match="another task of this loop"):
            await store.update(bump)
        assert queued(store) == 1
        go.set()
        await lead

    run(main())
    assert StateStore(Doc, path).load().n == 1
