"""Updates of several threads through one store are committed together (``_combine.py``).

Each test forms a group deterministically: a first update holds the lock in
its function until the others have queued, then lets go; the queued ones are
then one group (one load, one write, one fsync), which the revision counter
shows: it goes up once per commit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statestore import (
    LockTimeout,
    NestedTransactionError,
    StateStore,
    StateValidationError,
    StateWriteError,
)


class Doc(BaseModel):
    n: int = 0
    poisoned: bool = False
    notes: list[str] = []


def counter_of(store: StateStore[Doc]) -> int:
    return int(store.read().revision.split("-")[0])


def wait_queued(store: StateStore[Doc], count: int) -> None:
    deadline = time.monotonic() + 10
    while len(store._group._queue) < count:
        assert time.monotonic() < deadline, "the updates did not queue"
        time.sleep(0.002)


class Group:
    """A first update that holds the lock until ``len(fns)`` more have queued, then
    those updates, each on a thread of its own; their outcomes in order."""

    def __init__(self, store: StateStore[Doc], fns: list[Callable[[Doc], Any]]) -> None:
        self.store = store
        self.results: list[Any] = [None] * len(fns)
        self.threads: list[int] = [0] * len(fns)
        go, inside = threading.Event(), threading.Event()

        def first(s: Doc) -> None:
            inside.set()  # its group is formed: the others queue for the next one
            go.wait(10)
            s.n += 1

        lead = threading.Thread(target=store.update, args=(first,))
        lead.start()
        assert inside.wait(10)
        workers = []
        for i, fn in enumerate(fns):
            t = threading.Thread(target=self._call, args=(i, fn))
            t.start()
            wait_queued(store, i + 2)  # in this order
            workers.append(t)
        go.set()
        lead.join(10)
        for t in workers:
            t.join(10)
        assert not any(t.is_alive() for t in [lead, *workers])

    def _call(self, i: int, fn: Callable[[Doc], Any]) -> None:
        self.threads[i] = threading.get_ident()
        try:
            self.results[i] = self.store.update(fn)
        except BaseException as e:
            self.results[i] = e


def bump(s: Doc) -> None:
    s.n += 1


@pytest.fixture
def store(tmp_path: Path) -> StateStore[Doc]:
    s = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=10)
    s.save(Doc())
    return s


def test_queued_updates_are_one_commit_and_each_caller_gets_its_own_state(
    store: StateStore[Doc],
) -> None:
    before = counter_of(store)
    group = Group(store, [bump] * 7)
    assert store.load().n == 8
    assert counter_of(store) == before + 2  # the first update, then one group of seven
    assert [r.n for r in group.results] == [2, 3, 4, 5, 6, 7, 8]  # in queue order
    assert len({id(r) for r in group.results}) == 7  # models of their own


def test_each_function_runs_on_its_callers_thread(store: StateStore[Doc]) -> None:
    local = threading.local()
    seen: list[tuple[int, int, Any]] = []

    def record(s: Doc) -> None:
        seen.append(
            (threading.get_ident(), id(threading.current_thread()), getattr(local, "v", None))
        )
        s.n += 1

    group = Group(store, [record] * 4)
    assert [t for t, _, _ in seen] == group.threads
    assert all(v is None for _, _, v in seen)  # not the leader's thread-locals


def test_a_function_that_raises_fails_only_its_caller_and_changes_nothing(
    store: StateStore[Doc],
) -> None:
    def poison(s: Doc) -> None:
        s.poisoned = True
        s.n += 100
        raise ValueError("no")

    group = Group(store, [bump, poison, bump, bump])
    assert isinstance(group.results[1], ValueError)
    assert [r.n for i, r in enumerate(group.results) if i != 1] == [2, 3, 4]
    state = store.load()
    assert state.n == 4 and not state.poisoned


def test_a_result_that_does_not_validate_fails_only_its_caller(store: StateStore[Doc]) -> None:
    def wrong_type(s: Doc) -> Any:
        return {"n": 5}

    def invalid(s: Doc) -> None:
        s.n = "not a number"  # type: ignore[assignment]

    group = Group(store, [wrong_type, bump, invalid, bump])
    assert isinstance(group.results[0], TypeError)
    assert isinstance(group.results[2], StateValidationError)
    assert [group.results[1].n, group.results[3].n] == [2, 3]
    assert store.load().n == 3


def test_a_failed_write_fails_every_caller_of_the_group_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, max_size=1200)
    store.save(Doc())

    def grow(s: Doc) -> None:
        s.notes.append("x" * 300)

    group = Group(store, [grow] * 4)  # each state alone fits; the group's last does not
    assert all(isinstance(r, StateWriteError) for r in group.results), group.results
    assert store.load() == Doc(n=1)


def test_a_nested_update_in_a_queued_function_is_refused_for_its_caller_only(
    store: StateStore[Doc],
) -> None:
    other = StateStore(Doc, store.path, default=Doc)

    def nested(s: Doc) -> None:
        other.update(bump)

    group = Group(store, [bump, nested, bump])
    assert isinstance(group.results[1], NestedTransactionError)
    assert store.load().n == 3


def test_a_queued_function_may_take_the_lock_again_as_its_holder_could(tmp_path: Path) -> None:
    lock = tmp_path / "shared.lock"
    store = StateStore(Doc, tmp_path / "a.json", default=Doc, lock=lock, timeout=3)
    other = StateStore(Doc, tmp_path / "b.json", default=Doc, lock=lock, timeout=3)
    store.save(Doc())

    def both(s: Doc) -> None:
        other.update(bump)  # another file under the lock this group holds
        s.n += 1

    group = Group(store, [both, both])
    assert [r.n for r in group.results] == [2, 3]
    assert other.load().n == 2


def test_an_update_inside_a_transaction_on_the_same_lock_does_not_queue(tmp_path: Path) -> None:
    # This thread holds the shared lock (a transaction of the other store); another
    # thread's update of this store waits for it. Queued behind that update, this
    # thread would wait for a thread that waits for it.
    lock = tmp_path / "shared.lock"
    store = StateStore(Doc, tmp_path / "a.json", default=Doc, lock=lock, timeout=2)
    other = StateStore(Doc, tmp_path / "b.json", default=Doc, lock=lock, timeout=2)
    errors: list[BaseException] = []

    def waiting() -> None:
        try:
            store.update(bump)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with other.transaction() as state:
        t = threading.Thread(target=waiting)
        t.start()
        wait_queued(store, 1)
        assert store.update(bump).n == 1  # reentrant, as the lock's holder
        state.n = 5
    t.join(10)
    assert not errors
    assert store.load().n == 2 and other.load().n == 5


def test_a_queued_caller_times_out_with_the_stores_timeout(tmp_path: Path) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=0.2)
    go = threading.Event()

    def slow(s: Doc) -> None:
        go.wait(10)
        s.n += 1

    lead = threading.Thread(target=store.update, args=(slow,))
    lead.start()
    wait_queued(store, 1)
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="another thread of this process"):
            store.update(bump)
        assert time.monotonic() - started < 5
        assert len(store._group._queue) == 1  # it left the queue
    finally:
        go.set()
        lead.join(10)
    store.update(bump)
    assert store.load().n == 2


def _updates(store: StateStore[Doc], count: int) -> None:
    for _ in range(count):
        store.update(bump)


def test_the_group_commit_keeps_counts_across_processes_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    StateStore(Doc, path).save(Doc())
    procs, threads, each = 3, 4, 15
    pids = []
    for _ in range(procs):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                child = StateStore(Doc, path, default=Doc, timeout=60)

                workers = [
                    threading.Thread(target=_updates, args=(child, each)) for _ in range(threads)
                ]
                for t in workers:
                    t.start()
                for t in workers:
                    t.join()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    store = StateStore(Doc, path)
    assert store.load().n == procs * threads * each
    assert counter_of(store) <= procs * threads * each


def test_a_forked_child_does_not_wait_for_its_parents_queue(store: StateStore[Doc]) -> None:
    go = threading.Event()

    def slow(s: Doc) -> None:
        go.wait(10)
        s.n += 1

    lead = threading.Thread(target=store.update, args=(slow,))
    lead.start()
    wait_queued(store, 1)
    store.timeout = 20
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            store.update(bump)  # waits for the parent's lock, not for its queue
            code = 0
        finally:
            os._exit(code)
    time.sleep(0.2)
    go.set()
    lead.join(10)
    assert os.waitpid(pid, 0)[1] == 0
    assert store.load().n == 2


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_an_interrupted_leader_commits_nothing_of_its_group_and_fails_its_callers(
    store: StateStore[Doc],
) -> None:
    main = threading.main_thread().ident
    assert main is not None
    go = threading.Event()
    outcome: list[Any] = []

    inside = threading.Event()

    def slow(s: Doc) -> None:  # holds the lock while the group queues
        inside.set()
        go.wait(10)
        s.n += 1

    def follower_fn(s: Doc) -> None:
        signal.pthread_kill(main, signal.SIGINT)  # the leader waits for this function
        time.sleep(0.3)
        s.n += 10

    def follow() -> None:
        try:
            outcome.append(store.update(follower_fn))
        except BaseException as e:
            outcome.append(e)

    follower = threading.Thread(target=follow)

    def arrange() -> None:
        wait_queued(store, 2)  # the slow update, then this test's own (the next leader)
        follower.start()
        wait_queued(store, 3)
        go.set()

    blocker = threading.Thread(target=store.update, args=(slow,))
    blocker.start()
    assert inside.wait(10)
    arranger = threading.Thread(target=arrange)
    arranger.start()
    with pytest.raises(KeyboardInterrupt):
        store.update(bump)
    for t in (blocker, arranger, follower):
        t.join(10)
    assert isinstance(outcome[0], StateWriteError), outcome
    assert "interrupted" in str(outcome[0])
    assert store.load().n == 1  # the slow update only: nothing of the group was written
    store.update(bump)  # and the store works on
    assert store.load().n == 2


def test_a_store_is_freed_as_soon_as_it_is_let_go(tmp_path: Path) -> None:
    # No reference cycle: a store's storage (and its connections, for a database)
    # goes with the last reference, not at the collector's next pass.
    import gc
    import weakref

    gc.disable()
    try:
        store = StateStore(Doc, tmp_path / "state.json", default=Doc)
        store.update(bump)
        ref = weakref.ref(store)
        del store
        assert ref() is None
    finally:
        gc.enable()
