"""Attacks on the group commit of one store's updates (``_combine.py``).

Each test pins a rule of the module's docstring from a side the first tests
(``test_group_commit.py``) do not: a forked child inside a group, a function
that never returns, a lost lock, many threads with failures, history,
migrations, folders, interruptions and timeouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statestore import (
    DirectoryLock,
    LockCompromisedError,
    LockTimeout,
    StateFolder,
    StateStore,
    StateStoreError,
)


class Doc(BaseModel):
    n: int = 0
    seen: list[str] = []


def counter_of(store: StateStore[Any]) -> int:
    return int(store.read().revision.split("-")[0])


def wait_queued(store: StateStore[Any], count: int) -> None:
    deadline = time.monotonic() + 10
    while len(store._group._queue) < count:
        assert time.monotonic() < deadline, "the updates did not queue"
        time.sleep(0.002)


def bump(s: Doc) -> None:
    s.n += 1


class Group:
    """A first update holds the lock until ``len(fns)`` more have queued (in order),
    then lets go: those form one group. ``results[i]``: fns[i]'s outcome."""

    def __init__(
        self, store: StateStore[Any], fns: list[Callable[[Any], Any]], *, join: bool = True
    ) -> None:
        self.store = store
        self.pid = os.getpid()
        self.report: Path | None = None
        self.results: list[Any] = [None] * len(fns)
        self.done = [threading.Event() for _ in fns]
        go, inside = threading.Event(), threading.Event()

        def first(s: Any) -> None:
            inside.set()
            go.wait(10)

        self.lead = threading.Thread(target=store.update, args=(first,))
        self.lead.start()
        assert inside.wait(10)
        self.workers = []
        for i, fn in enumerate(fns):
            t = threading.Thread(target=self._call, args=(i, fn))
            t.start()
            wait_queued(store, i + 2)
            self.workers.append(t)
        go.set()
        if join:
            self.join()

    def join(self) -> None:
        for t in [self.lead, *self.workers]:
            t.join(20)
        assert not any(t.is_alive() for t in [self.lead, *self.workers])

    def _call(self, i: int, fn: Callable[[Any], Any]) -> None:
        try:
            self.results[i] = self.store.update(fn)
        except BaseException as e:
            self.results[i] = e
        finally:
            if os.getpid() != self.pid:  # pragma: no cover - a child forked in fn
                if self.report is not None:
                    self.report.write_text(repr(self.results[i]))
                os._exit(0)
            self.done[i].set()


@pytest.fixture
def store(tmp_path: Path) -> StateStore[Doc]:
    s = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=10)
    s.save(Doc())
    return s


def _child_outcome(pid: int, seconds: float = 10) -> int | None:
    """The child's exit code, or None if it was still running after ``seconds``
    (then it is killed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None



# ------------------------------------------------------------------ fork


@pytest.mark.parametrize("position", [0, 1, 2], ids=["leader", "follower", "last"])
def test_a_child_forked_inside_a_grouped_function_fails_at_once_and_writes_nothing(
    store: StateStore[Doc], tmp_path: Path, position: int
) -> None:
    # The function forks; the child returns from it as if nothing happened. It holds
    # none of its parent's locks and has none of its parent's threads: its update
    # must end with a typed error at once, not wait for threads that are not there,
    # and write nothing.
    children: list[int] = []
    report = tmp_path / "child"

    def forking(s: Doc) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, inside the function
            s.n += 1000
            return
        children.append(pid)
        s.n += 1

    fns: list[Callable[[Doc], Any]] = [bump, bump, bump]
    fns[position] = forking
    group = Group(store, fns, join=False)
    group.report = report
    group.join()
    assert len(children) == 1
    code = _child_outcome(children[0])
    assert code == 0, "the child hung in its parent's group"
    assert "LockCompromisedError" in report.read_text(), report.read_text()
    assert [r.n for r in group.results] == [1, 2, 3]
    assert store.load().n == 3
    store.update(bump)  # the parent's store works on
    assert store.load().n == 4


# ------------------------------------------------------- functions that do things


def test_a_function_that_does_not_return_holds_back_no_caller_before_it(
    store: StateStore[Doc],
) -> None:
    # Alone, the updates before a stuck one would have been committed; in a group
    # they must not wait (without any timeout) for a function that never returns.
    release = threading.Event()

    def stuck(s: Doc) -> None:
        release.wait(20)
        s.n += 100

    group = Group(store, [bump, bump, stuck, bump], join=False)
    try:
        assert group.done[0].wait(10) and group.done[1].wait(10), "held back by a later function"
        assert [group.results[0].n, group.results[1].n] == [1, 2]
        assert store.load().n == 2  # committed, durable, while the stuck one runs
        assert not group.done[2].is_set()
    finally:
        release.set()
        group.join()
    assert [r.n for r in group.results] == [1, 2, 102, 103]
    assert store.load().n == 103


def test_a_lost_lock_fails_every_caller_of_the_group_and_writes_nothing(
    store: StateStore[Doc],
) -> None:
    before = store.path.read_bytes()

    def breaks(s: Doc) -> None:
        s.n += 1
        DirectoryLock(str(store.path) + ".lock").break_lock(force=True)

    group = Group(store, [bump, breaks, bump])
    assert all(isinstance(r, LockCompromisedError) for r in group.results), group.results
    assert store.path.read_bytes() == before
    store.update(bump)
    assert store.load().n == 1


def test_many_threads_with_failures_lose_and_double_no_update(tmp_path: Path) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=60)
    threads, each = 72, 6
    outcomes: dict[str, bool] = {}
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(w: int) -> None:
        rng = random.Random(w)
        start.wait()
        for k in range(each):
            tag = f"{w}.{k}"
            fail = rng.random() < 0.3

            def fn(s: Doc, tag: str = tag, fail: bool = fail) -> None:
                s.n += 1
                s.seen.append(tag)
                if fail:
                    raise KeyError(tag)

            try:
                got = store.update(fn)
            except KeyError:
                ok = False
            else:
                assert got.seen[-1] == tag and got.n == len(got.seen)
                ok = True
            with lock:
                outcomes[tag] = ok

    workers = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    final = store.load()
    committed = sorted(t for t, ok in outcomes.items() if ok)
    assert len(outcomes) == threads * each
    assert sorted(final.seen) == committed  # none lost, none doubled, no failed one
    assert final.n == len(committed)
    assert counter_of(store) < len(committed)  # and they did form groups


def test_history_records_each_write_of_a_group_once(tmp_path: Path) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, history=50)
    store.save(Doc())
    Group(store, [bump] * 5)
    Group(store, [bump] * 3)
    entries = store.history()
    revisions = [e.revision for e in entries]
    assert len(revisions) == len(set(revisions))
    assert entries[0].revision == store.read().revision
    assert counter_of(store) == len(entries)  # every committed version, no other
    assert [json.loads(store.version_bytes(r))["n"] for r in revisions] == [8, 5, 0]
    small = StateStore(Doc, tmp_path / "small.json", default=Doc, history=2)
    for _ in range(3):
        Group(small, [bump] * 4)
    assert len(small.history()) == 2  # bounded


class V2(BaseModel):
    count: int = 0


def test_a_migrated_file_is_backed_up_once_by_a_group(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"schema_version": 1, "n": 5}))
    calls = []

    def up(d: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return {"count": d.pop("n")}

    store = StateStore(V2, path, default=V2, version=2, migrations={1: up})

    def inc(s: V2) -> None:
        s.count += 1

    def bad(s: V2) -> None:
        raise ValueError

    group = Group(store, [bad, inc, inc])
    assert isinstance(group.results[0], ValueError)
    assert [r.count for r in group.results[1:]] == [6, 7]
    backups = [p.name for p in tmp_path.iterdir() if "v1" in p.name]
    assert len(backups) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert json.loads((tmp_path / backups[0]).read_text()) == {"schema_version": 1, "n": 5}
