"""Attacks on the group commit of an async store's updates (``_async_group.py``).

Each test pins a rule of that module from the side an outside caller would
break it: a cancellation or an interruption at a point of the leader's or a
follower's path, many tasks with random failures, other storages.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statestore import AsyncStateStore, StateStore, StateWriteError


class Doc(BaseModel):
    n: int = 0
    ids: list[int] = []


pytestmark = pytest.mark.timeout(120)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)  # no task around ``coro``: all_tasks() is its own


def queued(store: AsyncStateStore[Doc]) -> int:
    return len(store._group()._queue)


async def until(check: Callable[[], bool]) -> None:
    for _ in range(4000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition did not come")


def add(i: int) -> Callable[[Doc], None]:
    def fn(s: Doc) -> None:
        s.n += 1
        s.ids.append(i)

    return fn


def aadd(i: int) -> Callable[[Doc], Coroutine[Any, Any, None]]:
    async def fn(s: Doc) -> None:
        await asyncio.sleep(0)
        s.n += 1
        s.ids.append(i)

    return fn


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "state.json"
    StateStore(Doc, p).save(Doc())
    return p


def no_tasks_left() -> None:
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []


class HeldRename:
    """``os.replace`` of the state file waits (on its worker thread) until let go:
    the leader is cancelled while its group's commit is under way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        real = os.replace
        name = str(target)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            if os.fspath(dst) == name and not self.go.is_set():
                self.started.set()
                self.go.wait(20)
            real(src, dst, **kw)

        monkeypatch.setattr(os, "replace", replace)


def test_a_leader_cancelled_while_its_group_is_written_tells_no_caller_nothing_was_written(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit that has started is completed; then what each caller is told must be
    # true: a follower whose increment is on disk gets its state, not "nothing written".
    store = AsyncStateStore(Doc, path, default=Doc)

    async def main() -> tuple[list[Any], Any]:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()
            s.n += 1
            s.ids.append(0)

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        lead = asyncio.create_task(store.update(add(1)))
        await until(lambda: queued(store) >= 2)
        followers = [asyncio.create_task(store.update(add(i))) for i in (2, 3)]
        await until(lambda: queued(store) >= 4)
        go.set()
        await holder
        held = HeldRename(monkeypatch, path)  # add(1) leads the group of 1, 2, 3
        await asyncio.to_thread(held.started.wait, 20)
        lead.cancel()
        await asyncio.sleep(0.05)
        held.go.set()
        out = await asyncio.gather(*followers, return_exceptions=True)
        lead_out = await asyncio.gather(lead, return_exceptions=True)
        no_tasks_left()
        return out, lead_out[0]

    out, lead_out = run(main())
    on_disk = StateStore(Doc, path).load()
    assert isinstance(lead_out, asyncio.CancelledError)  # the commit finished, then the cancel
    assert on_disk.ids == [0, 1, 2, 3]
    for i, r in zip((2, 3), out, strict=True):
        assert isinstance(r, Doc), r  # written: the caller is told so
        assert r.ids[-1] == i


def test_the_cycle_free_store_holds_for_the_async_store_with_groups(path: Path) -> None:
    # The group of a loop keeps no reference to its store: a store let go goes at
    # once, with its storage, as a StateStore does.
    async def main() -> None:
        store = AsyncStateStore(Doc, path, default=Doc)
        await asyncio.gather(*(store.update(add(i)) for i in range(5)))
        ref = weakref.ref(store)
        del store
        assert ref() is None  # while the loop runs on

    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()


def test_a_plain_fn_returning_a_coroutine_in_a_cancelled_queued_task_leaves_no_unawaited_coroutine(
    path: Path,
) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)
    entered, release = threading.Event(), threading.Event()

    async def later(s: Doc) -> None:
        s.n += 100

    def plain(s: Doc) -> Any:
        entered.set()
        release.wait(20)
        return later(s)

    async def main() -> Any:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()
            s.n += 1

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        lead = asyncio.create_task(store.update(add(1)))
        await until(lambda: queued(store) >= 2)
        task = asyncio.create_task(store.update(plain))  # a follower of add(1)'s group
        await until(lambda: queued(store) >= 3)
        go.set()
        await asyncio.to_thread(entered.wait, 20)
        task.cancel()
        await asyncio.sleep(0.01)
        release.set()
        out = await asyncio.gather(task, return_exceptions=True)
        await holder
        assert (await lead).n == 2
        return out[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = type(run(main()))  # the error (and the frames it holds) goes now
        gc.collect()
    assert out is asyncio.CancelledError
    assert not [w for w in caught if "never awaited" in str(w.message)], caught
    assert StateStore(Doc, path).load().n == 2


def check_outcomes(path: Path, outcomes: dict[int, Any], *, before: int = 0) -> None:
    """Each caller is told the truth: a returned state holds its own increment and
    it is on disk; "nothing written" (or its function's error) means not on disk;
    no increment is lost or doubled."""
    on_disk = StateStore(Doc, path).load()
    assert len(on_disk.ids) == len(set(on_disk.ids)) == on_disk.n - before
    written = set(on_disk.ids)
    for i, r in outcomes.items():
        if isinstance(r, Doc):
            assert r.ids[-1] == i and i in written, (i, r)
        elif isinstance(r, (StateWriteError, ValueError)):
            assert i not in written, (i, r)
        else:
            assert isinstance(r, asyncio.CancelledError), (i, r)  # either: it says neither
    ok = {i for i, r in outcomes.items() if isinstance(r, Doc)}
    assert ok <= written


@pytest.mark.parametrize("seed", range(4))
def test_many_tasks_with_random_failures_and_cancellations_lose_and_double_nothing(
    path: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("ERROR", logger="asyncio")
    rng = random.Random(seed)
    store = AsyncStateStore(Doc, path, default=Doc)

    def make(i: int) -> Any:
        kind = rng.choice(["plain", "async", "fail", "afail", "slow"])
        if kind == "plain":
            return add(i)
        if kind == "async":
            return aadd(i)
        if kind == "fail":

            def fail(s: Doc) -> None:
                s.ids.append(i)
                raise ValueError(i)

            return fail

        async def afail(s: Doc) -> None:
            s.ids.append(i)
            await asyncio.sleep(0)
            if kind == "afail":
                raise ValueError(i)
            await asyncio.sleep(0.001)
            s.n += 1

        return afail

    async def main() -> dict[int, Any]:
        tasks = {i: asyncio.create_task(store.update(make(i))) for i in range(200)}
        victims = rng.sample(sorted(tasks), 30)
        for v in victims:
            for _ in range(rng.randrange(6)):
                await asyncio.sleep(0)
            tasks[v].cancel()
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        no_tasks_left()
        assert queued(store) == 0 and not store._group().busy
        return dict(zip(tasks, results, strict=True))

    outcomes = run(main())
    gc.collect()
    assert caplog.records == []  # no task or future exception left unretrieved
    check_outcomes(path, outcomes)
    assert sum(isinstance(r, Doc) for r in outcomes.values()) > 50
    StateStore(Doc, path, timeout=1).update(lambda s: None)  # the lock is free


@pytest.mark.parametrize("who", ["leader", "follower"])
def test_a_cancellation_at_every_await_of_a_group_tells_each_caller_the_truth(
    path: Path, who: str
) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)
    before = 0

    async def once(k: int, start: int) -> dict[int, Any]:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        ids = list(range(start, start + 4))
        tasks = {}
        for n, i in enumerate(ids):
            tasks[i] = asyncio.create_task(store.update(add(i) if n % 2 else aadd(i)))
            await until(lambda n=n: queued(store) >= n + 2)
        go.set()
        await holder
        for _ in range(k):
            await asyncio.sleep(0)
        tasks[ids[0] if who == "leader" else ids[2]].cancel()
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        no_tasks_left()
        return dict(zip(tasks, results, strict=True))

    for k in range(0, 40, 2):
        outcomes = run(once(k, 10 * k))
        check_outcomes(path, {i: r for i, r in outcomes.items()}, before=before)
        before = 0
    assert StateStore(Doc, path).load().n == len(StateStore(Doc, path).load().ids)


async def grouped(store: AsyncStateStore[Doc], fns: list[Any]) -> list[Any]:
    """A first update holds the lock until ``fns`` have queued, and writes nothing;
    the first of them then leads the group of all of them. Their outcomes, in order."""
    go, inside = asyncio.Event(), asyncio.Event()

    async def first(s: Doc) -> None:
        inside.set()
        await go.wait()
        raise LookupError("the holder writes nothing")

    holder = asyncio.create_task(store.update(first))
    await inside.wait()
    tasks = []
    for n, fn in enumerate(fns):
        tasks.append(asyncio.create_task(store.update(fn)))
        await until(lambda n=n: queued(store) >= n + 2)
    go.set()
    with pytest.raises(LookupError):
        await holder
    return list(await asyncio.gather(*tasks, return_exceptions=True))


@pytest.mark.parametrize("error", [asyncio.CancelledError, KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("where", [0, 1])
def test_a_function_raising_a_base_exception_itself_fails_only_its_caller(
    path: Path, error: type[BaseException], where: int
) -> None:
    # Raised by the function, not a cancellation of its task: the other callers of
    # the group are committed, leader (where=0) or follower (where=1).
    if error is asyncio.CancelledError and where == 0 and sys.version_info < (3, 11):
        pytest.skip("Python 3.10 cannot tell it from a cancellation of the task")
    store = AsyncStateStore(Doc, path, default=Doc)

    async def raiser(s: Doc) -> None:
        s.ids.append(99)
        raise error()

    fns: list[Any] = [add(1), add(2), add(3)]
    fns.insert(where, raiser)

    async def main() -> list[Any]:
        out = await grouped(store, fns)
        no_tasks_left()
        return out

    if error is asyncio.CancelledError:
        out = run(main())
    else:
        # asyncio re-raises these out of the loop once their task ends; the loop
        # is then torn down, so run the group in a loop of its own and look.
        loop = asyncio.new_event_loop()
        task = loop.create_task(main())
        with pytest.raises(error):
            loop.run_until_complete(task)
        while not task.done():
            with contextlib.suppress(error):  # stopped the loop again: go on
                loop.run_until_complete(task)
        out = task.result()
        loop.close()
    assert isinstance(out[where], error)
    assert [type(r) for i, r in enumerate(out) if i != where] == [Doc, Doc, Doc]
    assert StateStore(Doc, path).load().ids == [1, 2, 3]


def test_timeouts_around_queued_and_in_turn_updates(path: Path) -> None:
    # asyncio.timeout() around an update: a queued task leaves the queue, a task
    # whose function never returns is cut off in its turn; the others commit, and
    # each timed-out caller gets TimeoutError, not a hang nor a lost update.
    store = AsyncStateStore(Doc, path, default=Doc)
    never = asyncio.Event()

    async def stuck(s: Doc) -> None:
        s.ids.append(98)
        await never.wait()

    async def bounded(fn: Any, t: float) -> Any:
        if sys.version_info < (3, 11):
            return await asyncio.wait_for(store.update(fn), t)
        async with asyncio.timeout(t):
            return await store.update(fn)

    async def main() -> list[Any]:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        tasks = [
            asyncio.create_task(store.update(add(1))),
            asyncio.create_task(bounded(stuck, 0.3)),  # times out in its turn
            asyncio.create_task(bounded(add(97), 0.05)),  # times out while queued
            asyncio.create_task(asyncio.wait_for(store.update(aadd(2)), 10)),
        ]
        await until(lambda: queued(store) >= 5)
        await asyncio.sleep(0.1)  # add(97) has left the queue
        assert queued(store) == 4
        go.set()
        await holder
        out = await asyncio.gather(*tasks, return_exceptions=True)
        no_tasks_left()
        return out

    out = run(main())
    assert [type(r) for r in out] == [Doc, asyncio.TimeoutError, asyncio.TimeoutError, Doc]
    assert StateStore(Doc, path).load().ids == [1, 2]


def test_a_plain_fn_of_a_queued_task_that_calls_the_sync_store_is_refused(path: Path) -> None:
    # The worker thread of a follower's plain function is marked: store.sync.update
    # there is NestedTransactionError at once, not a wait for the leader's lock.
    store = AsyncStateStore(Doc, path, default=Doc, timeout=30)

    def nested(s: Doc) -> None:
        store.sync.update(add(50))

    async def main() -> list[Any]:
        out = await grouped(store, [add(1), nested, aadd(2)])
        no_tasks_left()
        return out

    out = run(main())
    from statestore import NestedTransactionError

    assert [type(r) for r in out] == [Doc, NestedTransactionError, Doc]
    assert StateStore(Doc, path).load().ids == [1, 2]


def test_a_corrupt_file_fails_every_queued_caller_with_the_typed_error(path: Path) -> None:
    from statestore import StateCorruptError

    store = AsyncStateStore(Doc, path, default=Doc)

    async def main() -> list[Any]:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()
            path.write_bytes(b"{ not json")  # under the lock, before the group loads
            raise LookupError("the holder writes nothing")

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        tasks = []
        for n, fn in enumerate([add(1), aadd(2), add(3)]):
            tasks.append(asyncio.create_task(store.update(fn)))
            await until(lambda n=n: queued(store) >= n + 2)
        go.set()
        with pytest.raises(LookupError):
            await holder
        out = await asyncio.gather(*tasks, return_exceptions=True)
        no_tasks_left()
        return out

    out = run(main())
    assert all(isinstance(r, StateCorruptError) for r in out), out
    assert str(path) in str(out[0])
    assert path.read_bytes() == b"{ not json"  # nothing overwritten


STORAGES = ["file", "history", "folder", "sqlite", "postgres"]


@contextlib.contextmanager
def store_on(kind: str, tmp_path: Path) -> Any:
    if kind == "file":
        yield AsyncStateStore(Doc, tmp_path / "s.json", default=Doc)
    elif kind == "history":
        yield AsyncStateStore(Doc, tmp_path / "s.json", default=Doc, history=3)
    elif kind == "folder":
        from statestore import StateFolder

        yield AsyncStateStore.from_store(
            StateFolder(tmp_path / "f").store(Doc, "s.json", default=Doc)
        )
    elif kind == "sqlite":
        from statestore.backends.sqlite import SqliteStorage

        with SqliteStorage(tmp_path / "s.db", key="k") as storage:
            yield AsyncStateStore(Doc, storage, default=Doc)
    else:
        import uuid

        psycopg = pytest.importorskip("psycopg")
        dsn = os.environ.get("STATESTORE_PG_DSN")
        if not dsn:
            pytest.skip("no PostgreSQL server named (STATESTORE_PG_DSN)")
        from statestore.backends.postgres import PostgresStorage

        table = f"test_{uuid.uuid4().hex[:12]}"
        try:
            with PostgresStorage(dsn, key="k", table=table) as storage:
                yield AsyncStateStore(Doc, storage, default=Doc)
        finally:
            with psycopg.connect(dsn, autocommit=True) as admin:
                for t in (table, f"{table}_backups"):
                    admin.execute(f'DROP TABLE IF EXISTS "{t}"')


@pytest.mark.parametrize("kind", STORAGES)
def test_groups_on_every_storage_tell_each_caller_the_truth(kind: str, tmp_path: Path) -> None:
    rng = random.Random(kind)
    with store_on(kind, tmp_path) as store:
        seen: dict[int, Any] = {}

        async def once(k: int, start: int) -> None:
            go, inside = asyncio.Event(), asyncio.Event()

            async def first(s: Doc) -> None:
                inside.set()
                await go.wait()

            holder = asyncio.create_task(store.update(first))
            await inside.wait()
            tasks = {}
            for n in range(5):
                i = start + n
                fn = add(i) if n % 2 else aadd(i)
                if n == 3:

                    def fn(s: Doc) -> None:
                        raise ValueError("no")

                tasks[i] = asyncio.create_task(store.update(fn))
                await until(lambda n=n: queued(store) >= n + 2)
            go.set()
            await holder
            for _ in range(k):
                await asyncio.sleep(0)
            tasks[start + rng.choice([0, 0, 2, 4])].cancel()
            results = await asyncio.gather(*tasks.values(), return_exceptions=True)
            no_tasks_left()
            assert queued(store) == 0
            seen.update(zip(tasks, results, strict=True))

        for k in range(0, 30, 3):
            run(once(k, 10 * k))
        on_disk = run(store.load())
        assert len(on_disk.ids) == len(set(on_disk.ids)) == on_disk.n
        for i, r in seen.items():
            if isinstance(r, Doc):
                assert r.ids[-1] == i and i in on_disk.ids, (i, r)
            elif not isinstance(r, asyncio.CancelledError):
                assert i not in on_disk.ids, (i, r)
        assert sum(isinstance(r, Doc) for r in seen.values()) >= 10
        if kind == "history":
            assert len(store.sync.history()) == 3


class OldDoc(BaseModel):
    count: int = 0


def test_a_group_over_an_older_schema_version_migrates_once_and_keeps_one_backup(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    StateStore(OldDoc, path).save(OldDoc(count=5))
    original = path.read_bytes()

    def upgrade(d: dict[str, Any]) -> dict[str, Any]:
        return {"n": d.pop("count"), "ids": []}

    store = AsyncStateStore(Doc, path, default=Doc, version=2, migrations={1: upgrade})

    def fail(s: Doc) -> None:  # takes the model as loaded: the next one starts afresh
        s.n = -1000
        raise ValueError("no")

    async def main() -> list[Any]:
        out = await grouped(store, [fail, add(1), aadd(2), fail, add(3)])
        no_tasks_left()
        return out

    out = run(main())
    assert [type(r) for r in out] == [ValueError, Doc, Doc, ValueError, Doc]
    assert [r.n for r in out if isinstance(r, Doc)] == [6, 7, 8]
    assert StateStore(Doc, path, version=2, migrations={1: upgrade}).load() == Doc(
        n=8, ids=[1, 2, 3]
    )
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.v1.bak"]
    assert (tmp_path / "state.json.v1.bak").read_bytes() == original
    assert b'"schema_version": 2' in path.read_bytes() or b'"schema_version":2' in path.read_bytes()


def test_loops_in_threads_and_sync_threads_share_one_store_and_lose_nothing(path: Path) -> None:
    # Each loop has its own queue; across loops, and against sync updates from
    # threads, the file lock decides. One store object, run twice per thread
    # (asyncio.run again: a new loop, a new queue).
    store = AsyncStateStore(Doc, path, default=Doc, timeout=60)
    errors: list[BaseException] = []

    def in_loop(base: int) -> None:
        async def main(start: int) -> None:
            got = await asyncio.gather(
                *(store.update(add(i) if i % 2 else aadd(i)) for i in range(start, start + 25))
            )
            assert [r.ids[-1] for r in got] == list(range(start, start + 25))
            no_tasks_left()

        try:
            asyncio.run(main(base))
            asyncio.run(main(base + 100))
        except BaseException as e:
            errors.append(e)

    def in_thread(base: int) -> None:
        try:
            for i in range(base, base + 10):
                store.sync.update(add(i))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=in_loop, args=(1000 * k,)) for k in range(1, 4)]
    threads += [threading.Thread(target=in_thread, args=(1000 * k + 500,)) for k in range(1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    on_disk = StateStore(Doc, path).load()
    assert on_disk.n == len(on_disk.ids) == len(set(on_disk.ids)) == 3 * 50 + 2 * 10


def test_a_lock_held_elsewhere_times_out_every_queued_caller_and_nobody_waits_longer(
    path: Path,
) -> None:
    from statestore import LockTimeout

    store = AsyncStateStore(Doc, path, default=Doc, timeout=0.3)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with StateStore(Doc, path).transaction():
            held.set()
            release.wait(20)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(20)

    async def main() -> list[Any]:
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(store.update(add(i) if i % 2 else aadd(i))))
            await asyncio.sleep(0.02)
        out = await asyncio.gather(*tasks, return_exceptions=True)
        no_tasks_left()
        assert queued(store) == 0 and not store._group().busy
        return out

    try:
        out = run(main())
    finally:
        release.set()
        thread.join()
    assert all(isinstance(r, LockTimeout) for r in out), out
    assert StateStore(Doc, path).load() == Doc()
    assert run(store.update(add(7))).ids == [7]  # and the store works on


def test_a_leader_cancelled_while_a_database_group_is_written_commits_it_and_says_so(
    tmp_path: Path,
) -> None:
    # PostgreSQL writes in the session's transaction, committed when the session
    # closes: a cancellation during the write waits for it, the session commits,
    # and then the leader gets its CancelledError; the followers their states.
    import uuid

    psycopg = pytest.importorskip("psycopg")
    dsn = os.environ.get("STATESTORE_PG_DSN")
    if not dsn:
        pytest.skip("no PostgreSQL server named (STATESTORE_PG_DSN)")
    from statestore.backends.postgres import PostgresStorage

    table = f"test_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(dsn)
    try:
        with PostgresStorage(dsn, key="k", table=table) as storage:
            store = AsyncStateStore(Doc, storage, default=Doc)
            run(store.save(Doc()))

            async def main() -> tuple[Any, list[Any]]:
                go, inside = asyncio.Event(), asyncio.Event()

                async def first(s: Doc) -> None:
                    inside.set()
                    await go.wait()
                    raise LookupError("nothing")

                holder = asyncio.create_task(store.update(first))
                await inside.wait()
                tasks = []
                for n in range(3):
                    tasks.append(asyncio.create_task(store.update(add(n))))
                    await until(lambda n=n: queued(store) >= n + 2)
                # The row is locked: the group's write waits for it.
                admin.execute(f'SELECT * FROM "{table}" FOR UPDATE')
                go.set()
                await asyncio.gather(holder, return_exceptions=True)
                with psycopg.connect(dsn, autocommit=True) as look:
                    for _ in range(500):  # until the group's write waits for the row
                        await asyncio.sleep(0.01)
                        found = look.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        ).fetchone()
                        if found and found[0]:
                            break
                    else:
                        raise AssertionError("the group's write did not wait for the row")
                tasks[0].cancel()
                await asyncio.sleep(0.05)
                admin.rollback()
                out = await asyncio.gather(*tasks, return_exceptions=True)
                no_tasks_left()
                return out[0], out[1:]

            lead, followers = run(main())
            assert isinstance(lead, asyncio.CancelledError)
            assert [r.ids for r in followers] == [[0, 1], [0, 1, 2]]
            assert run(store.load()).ids == [0, 1, 2]
    finally:
        admin.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            for t in (table, f"{table}_backups"):
                conn.execute(f'DROP TABLE IF EXISTS "{t}"')


def test_a_follower_cancelled_after_its_function_returned_is_written_with_the_group(
    path: Path,
) -> None:
    # Its function counted and the next ones built on its state: it stands, and its
    # caller gets CancelledError, as a task alone whose commit has begun does.
    store = AsyncStateStore(Doc, path, default=Doc)
    ran, go = threading.Event(), threading.Event()

    def gate(s: Doc) -> None:  # plain (grouped), on a worker thread
        ran.set()
        go.wait(10)
        s.ids.append(3)
        s.n += 1

    async def main() -> list[Any]:
        holder_go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await holder_go.wait()

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        tasks = []
        for n, fn in enumerate([add(1), add(2), gate]):
            tasks.append(asyncio.create_task(store.update(fn)))
            await until(lambda n=n: queued(store) >= n + 2)
        holder_go.set()
        await holder
        await until(ran.is_set)  # add(2) has run and waits for the commit
        tasks[1].cancel()
        await asyncio.sleep(0.01)
        go.set()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        no_tasks_left()
        return out

    out = run(main())
    assert isinstance(out[1], asyncio.CancelledError)
    assert out[2].ids == [1, 2, 3]
    assert StateStore(Doc, path).load().ids == [1, 2, 3]


def test_a_leader_cancelled_while_it_waits_for_a_lock_held_elsewhere_hands_on(
    path: Path,
) -> None:
    store = AsyncStateStore(Doc, path, default=Doc, timeout=30)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with StateStore(Doc, path).transaction():
            held.set()
            release.wait(20)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(20)

    async def main() -> list[Any]:
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(store.update(add(i) if i % 2 else aadd(i))))
            await until(lambda i=i: queued(store) >= i + 1)
        tasks[0].cancel()
        await asyncio.sleep(0.05)
        await asyncio.to_thread(release.set)
        out = await asyncio.gather(*tasks, return_exceptions=True)
        no_tasks_left()
        return out

    try:
        out = run(main())
    finally:
        release.set()
        thread.join()
    assert isinstance(out[0], asyncio.CancelledError)
    assert [r.ids for r in out[1:]] == [[1], [1, 2], [1, 2, 3]]
    assert StateStore(Doc, path).load().ids == [1, 2, 3]


class SlowCloseStorage:
    """A storage that locks itself (as a database does), in memory; when armed, the
    closing of a session waits (on its worker thread) until let go."""

    location = "memory://slow-close"

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.lock = threading.Lock()
        self.closing, self.go = threading.Event(), threading.Event()
        self.armed = False

    def read(self) -> bytes | None:
        return self.data

    def exists(self) -> bool:
        return self.data is not None

    @contextlib.contextmanager
    def session(self, timeout: float) -> Any:
        if not self.lock.acquire(timeout=timeout):
            raise AssertionError("lock")
        try:
            yield self
        finally:
            if self.armed:
                self.armed = False
                self.closing.set()
                self.go.wait(20)
            self.lock.release()

    def write(self, data: bytes) -> None:
        self.data = data

    def backup_location(self, label: str) -> str:
        return f"{self.location}.{label}"

    def backup(self, label: str, data: bytes) -> str:
        return self.backup_location(label)


@pytest.mark.parametrize("grouped_too", [False, True])
def test_a_cancellation_while_a_session_closes_is_not_lost(grouped_too: bool) -> None:
    # The commit is completed, then the task gets its CancelledError: a task whose
    # cancel() was accepted does not go on as if nothing happened. Alone, and as
    # the leader of a group (whose followers get their states).
    storage = SlowCloseStorage()
    store = AsyncStateStore(Doc, storage, default=Doc)  # type: ignore[arg-type]

    async def main() -> list[Any]:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()
            s.ids.append(0)

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        tasks = []
        for n in range(1, 4 if grouped_too else 2):
            tasks.append(asyncio.create_task(store.update(add(n))))
            await until(lambda n=n: queued(store) >= n + 1)
        go.set()
        await holder
        storage.armed = True  # the next session: add(1)'s (its group's)
        await asyncio.to_thread(storage.closing.wait, 20)
        assert tasks[0].cancel()
        await asyncio.sleep(0.01)
        storage.go.set()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        no_tasks_left()
        return out

    out = run(main())
    assert isinstance(out[0], asyncio.CancelledError), out[0]
    assert [r.ids for r in out[1:]] == [[0, 1, 2], [0, 1, 2, 3]][: len(out) - 1]
    assert run(store.load()).ids == [0, 1, 2, 3][: len(out) + 1]


def test_a_loop_closed_with_a_group_under_way_leaves_the_store_usable(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio.run() returns while a group is under way: it cancels the tasks (the
    # leader in a function, followers queued or in their turn); the lock is let
    # go, nothing half-written, and the store works in the next loop. No task
    # exception is left unretrieved.
    store = AsyncStateStore(Doc, path, default=Doc, timeout=5)

    async def slow(s: Doc) -> None:
        await asyncio.sleep(0.05)
        s.n += 1
        s.ids.append(len(s.ids) + 100)

    left: list[Any] = []

    async def abandon() -> None:
        for i in range(20):
            left.append(asyncio.create_task(store.update(slow if i % 3 == 0 else add(i))))
        await asyncio.sleep(0.08)  # a commit or two, then the loop ends

    caplog.set_level("ERROR", logger="asyncio")
    asyncio.run(abandon())
    assert all(t.done() for t in left)
    left.clear()
    gc.collect()
    on_disk = StateStore(Doc, path).load()
    assert on_disk.n == len(on_disk.ids)

    async def again() -> Doc:
        got = await asyncio.gather(*(store.update(add(1000 + i)) for i in range(5)))
        no_tasks_left()
        return got[-1]

    last = run(again())
    assert sorted(last.ids[-5:]) == [1000, 1001, 1002, 1003, 1004]
    StateStore(Doc, path, timeout=1).update(lambda s: None)
    gc.collect()
    assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []


def test_a_follower_whose_function_never_returns_holds_only_until_its_leader_is_cancelled(
    path: Path,
) -> None:
    store = AsyncStateStore(Doc, path, default=Doc)
    stuck_in, release = threading.Event(), threading.Event()

    def stuck(s: Doc) -> None:  # plain (grouped): it blocks its worker thread
        stuck_in.set()
        s.ids.append(99)
        release.wait(20)

    async def main() -> list[Any]:
        go, inside = asyncio.Event(), asyncio.Event()

        async def first(s: Doc) -> None:
            inside.set()
            await go.wait()

        holder = asyncio.create_task(store.update(first))
        await inside.wait()
        tasks = []
        for n, fn in enumerate([add(1), stuck]):
            tasks.append(asyncio.create_task(store.update(fn)))
            await until(lambda n=n: queued(store) >= n + 2)
        go.set()
        await holder
        await until(stuck_in.is_set)
        later = asyncio.create_task(store.update(add(2)))  # queued behind the group
        await until(lambda: queued(store) >= 3)
        tasks[0].cancel()  # the leader: the lock goes to add(2)
        got = await later
        assert got.ids == [2]
        assert not tasks[1].done()  # its function still runs: it fails itself
        tasks[1].cancel()
        release.set()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        no_tasks_left()
        return out

    out = run(main())
    assert isinstance(out[0], asyncio.CancelledError)
    assert isinstance(out[1], asyncio.CancelledError)
    assert StateStore(Doc, path).load().ids == [2]
