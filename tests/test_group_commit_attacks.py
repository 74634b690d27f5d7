"""Attacks on the group commit of one store's updates (``_combine.py``).

Each test pins a rule of the module's docstring from a side the first tests
(``test_group_commit.py``) do not: a forked child inside a group, a function
that never returns, a lost lock, many threads with failures, history,
migrations, folders, interruptions and timeouts.
"""

from __future__ import annotations

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
        self,
        store: StateStore[Any],
        fns: list[Callable[[Any], Any]],
        *,
        join: bool = True,
        via_lock: bool = False,
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

        if via_lock:  # the lock held by this thread: the first caller waits for it
            assert store.lock is not None
            held = store.lock.acquire()
            self.lead = threading.Thread(target=lambda: None)
        else:
            self.lead = threading.Thread(target=store.update, args=(first,))
            self.lead.start()
            assert inside.wait(10)
        self.workers = []
        for i, fn in enumerate(fns):
            t = threading.Thread(target=self._call, args=(i, fn))
            t.start()
            wait_queued(store, i + 1 + (not via_lock))
            self.workers.append(t)
        if via_lock:
            self.lead.start()
            held.release()
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


def test_a_group_handed_on_twice_commits_each_part_once_and_in_order(tmp_path: Path) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, history=20)
    store.save(Doc())
    before = counter_of(store)
    releases = [threading.Event(), threading.Event()]

    def slow(k: int) -> Callable[[Doc], None]:
        def fn(s: Doc) -> None:
            assert releases[k].wait(20)
            s.n += 10

        return fn

    def failing(s: Doc) -> None:
        s.n += 1000
        raise KeyError("mine only")

    group = Group(store, [failing, bump, slow(0), bump, slow(1), bump], join=False)
    try:
        assert group.done[1].wait(10) and group.done[0].wait(10)
        assert isinstance(group.results[0], KeyError) and group.results[1].n == 1
        releases[0].set()
        assert group.done[3].wait(10) and group.done[2].wait(10)
        assert [group.results[2].n, group.results[3].n] == [11, 12]
        assert store.load().n == 12
    finally:
        for r in releases:
            r.set()
        group.join()
    assert [r.n for r in group.results[1:]] == [1, 11, 12, 22, 23]
    assert store.load().n == 23
    # One write per part (the leader's failure counted nothing), each recorded once.
    assert counter_of(store) == before + 3
    ns = [json.loads(store.version_bytes(e.revision))["n"] for e in store.history()]
    assert ns == [23, 12, 1, 0]
    store.update(bump)
    assert store.load().n == 24


def test_a_caller_handed_its_group_can_still_take_the_lock_again(tmp_path: Path) -> None:
    lock = tmp_path / "shared.lock"
    store = StateStore(Doc, tmp_path / "a.json", default=Doc, lock=lock, timeout=5)
    other = StateStore(Doc, tmp_path / "b.json", default=Doc, lock=lock, timeout=5)
    store.save(Doc())
    release = threading.Event()

    def slow_then_nested(s: Doc) -> None:
        assert release.wait(20)
        other.update(bump)  # the group's lock, lent to this thread, which drives it now
        s.n += 1

    group = Group(store, [bump, slow_then_nested, bump], join=False)
    try:
        assert group.done[0].wait(10)
    finally:
        release.set()
        group.join()
    assert [r.n for r in group.results] == [1, 2, 3]
    assert other.load().n == 1


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_an_interrupted_function_of_a_handed_on_group_fails_only_itself(
    store: StateStore[Doc],
) -> None:
    main = threading.main_thread().ident
    assert main is not None
    outcomes: list[Any] = []
    handed = threading.Event()

    def slow(s: Doc) -> None:  # on the main thread
        handed.wait(10)
        time.sleep(5)  # interrupted here
        s.n += 100

    def first(s: Doc) -> None:
        s.n += 1

    gate, inside = threading.Event(), threading.Event()

    def blocker_fn(s: Doc) -> None:
        inside.set()
        gate.wait(10)

    def call(fn: Callable[[Doc], Any]) -> None:
        try:
            outcomes.append(store.update(fn))
        except BaseException as e:
            outcomes.append(e)

    blocker = threading.Thread(target=store.update, args=(blocker_fn,))
    blocker.start()
    assert inside.wait(10)
    leader = threading.Thread(target=call, args=(first,))
    leader.start()
    wait_queued(store, 2)
    after: list[threading.Thread] = []

    def arrange() -> None:
        wait_queued(store, 3)  # the main thread's slow update
        t = threading.Thread(target=call, args=(bump,))
        t.start()
        after.append(t)
        wait_queued(store, 4)
        gate.set()
        leader.join(10)  # returns: the group was handed to the main thread
        handed.set()
        time.sleep(0.2)
        signal.pthread_kill(main, signal.SIGINT)

    arranger = threading.Thread(target=arrange)
    arranger.start()
    with pytest.raises(KeyboardInterrupt):
        store.update(slow)
    for t in (blocker, leader, arranger, *after):
        t.join(10)
    assert [getattr(o, "n", o) for o in outcomes] == [1, 2]
    assert store.load().n == 2
    store.update(bump)
    assert store.load().n == 3


# ------------------------------------------------------- other stores, folders


def test_a_grouped_function_using_the_async_store_of_its_file_is_refused_not_stuck(
    store: StateStore[Doc],
) -> None:
    import asyncio

    from statestore import AsyncStateStore, NestedTransactionError

    astore = AsyncStateStore(Doc, store.path, default=Doc, timeout=3)

    def via_async(s: Doc) -> None:
        asyncio.run(astore.update(bump))

    started = time.monotonic()
    group = Group(store, [bump, via_async, bump])
    assert time.monotonic() - started < 10
    assert isinstance(group.results[1], (NestedTransactionError, LockTimeout)), group.results
    assert [group.results[0].n, group.results[2].n] == [1, 2]
    assert store.load().n == 2
    assert asyncio.run(astore.update(bump)).n == 3  # and it works outside


def test_the_documents_of_a_folder_updated_from_threads(tmp_path: Path) -> None:
    folder = StateFolder(tmp_path / "f", timeout=30)
    a = folder.store(Doc, "a.json", default=Doc)
    b = folder.store(Doc, "b.json", default=Doc)
    a.save(Doc())

    def both(s: Doc) -> None:
        b.update(bump)  # another document under the folder's lock this group holds
        s.n += 1

    group = Group(a, [both, bump, both])
    assert [r.n for r in group.results] == [1, 2, 3]
    assert b.load().n == 2
    snap = folder.read(a, b)
    assert snap[a].n == 3 and snap[b].n == 2

    def worker(store: StateStore[Doc], count: int) -> None:
        for _ in range(count):
            store.update(bump)

    threads = [threading.Thread(target=worker, args=(s, 20)) for s in (a, b, a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert a.load().n == 63 and b.load().n == 62
    assert not folder.recover()  # nothing left unfinished


def test_a_grouped_function_may_not_open_a_folder_transaction_over_its_document(
    tmp_path: Path,
) -> None:
    from statestore import NestedTransactionError

    folder = StateFolder(tmp_path / "f", timeout=3)
    a = folder.store(Doc, "a.json", default=Doc)
    b = folder.store(Doc, "b.json", default=Doc)
    a.save(Doc())

    def via_folder(s: Doc) -> None:
        with folder.transaction() as tx:
            tx[a].n += 100

    def other_doc(s: Doc) -> None:
        with folder.transaction() as tx:
            tx[b].n += 1
        s.n += 1

    group = Group(a, [bump, via_folder, other_doc, bump])
    assert isinstance(group.results[1], NestedTransactionError), group.results
    assert [group.results[0].n, group.results[2].n, group.results[3].n] == [1, 2, 3]
    assert a.load().n == 3 and b.load().n == 1


# ------------------------------------------------------- errors and interruptions


@pytest.mark.parametrize("kind", [SystemExit, GeneratorExit, KeyboardInterrupt])
def test_a_function_raising_a_base_exception_fails_only_its_caller(
    store: StateStore[Doc], kind: type[BaseException]
) -> None:
    def raising(s: Doc) -> None:
        s.n += 100
        raise kind()

    group = Group(store, [bump, raising, bump, raising])
    assert isinstance(group.results[1], kind) and isinstance(group.results[3], kind)
    assert [group.results[0].n, group.results[2].n] == [1, 2]
    assert store.load().n == 2
    # and the leader's own
    group = Group(store, [raising, bump])
    assert isinstance(group.results[0], kind) and group.results[1].n == 3


class Other(BaseModel):
    n: int = 0


class Sub(Doc):
    extra: int = 7


def test_a_function_returning_another_model_fails_only_its_caller(store: StateStore[Doc]) -> None:
    group = Group(store, [lambda s: Other(n=50), bump, lambda s: Sub(n=99), bump])
    assert isinstance(group.results[0], TypeError), group.results
    assert group.results[1].n == 1
    got = group.results[2]
    if isinstance(got, BaseException):  # refused: fine, as long as only for it
        assert group.results[3].n == 2
    else:  # accepted: what is stored is what loads back, a Doc
        assert type(got) is Doc and got.n == 99 and group.results[3].n == 100
    assert store.load() == group.results[3]


def test_a_file_broken_or_removed_between_groups(store: StateStore[Doc]) -> None:
    from statestore import StateCorruptError

    Group(store, [bump] * 3)
    store.path.write_text("{ not json")
    group = Group(store, [bump] * 3, via_lock=True)
    assert all(isinstance(r, StateCorruptError) for r in group.results), group.results
    assert store.path.read_text() == "{ not json"  # not overwritten
    store.path.unlink()
    group = Group(store, [bump] * 3, via_lock=True)
    assert [r.n for r in group.results] == [1, 2, 3]  # the default, once
    nodefault = StateStore(Doc, store.path.with_name("none.json"))
    group = Group(nodefault, [bump] * 2, via_lock=True)
    assert all(isinstance(r, StateStoreError) for r in group.results), group.results
    assert not nodefault.path.exists()


@pytest.mark.parametrize("timeout", [-1, float("inf"), 10**400])
def test_a_group_with_an_endless_timeout_commits(tmp_path: Path, timeout: float) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=timeout)
    group = Group(store, [bump] * 4)
    assert [r.n for r in group.results] == [1, 2, 3, 4]


def test_a_timeout_changed_while_queued(store: StateStore[Doc]) -> None:
    go = threading.Event()

    def slow(s: Doc) -> None:
        go.wait(10)

    lead = threading.Thread(target=store.update, args=(slow,))
    lead.start()
    wait_queued(store, 1)
    store.timeout = 0.2
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        store.update(bump)  # the timeout when it was called
    assert time.monotonic() - started < 5
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(store.update(bump)))
    store.timeout = 30
    t.start()
    wait_queued(store, 2)
    store.timeout = 0.01  # changed while it waits: its own call keeps 30 s
    time.sleep(0.3)
    go.set()
    lead.join(10)
    t.join(10)
    assert outcome and outcome[0].n == 1
    with pytest.raises(ValueError):
        store.timeout = float("nan")
        store.update(bump)


def _interrupt_main_when(cond: Callable[[], bool]) -> threading.Thread:
    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.002)
        signal.pthread_kill(main, signal.SIGINT)

    t = threading.Thread(target=watch)
    t.start()
    return t


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
@pytest.mark.parametrize("where", ["queued", "in its function", "waiting for the commit"])
def test_a_caller_interrupted_in_a_group_changes_only_its_own_outcome(
    store: StateStore[Doc], where: str
) -> None:
    # The main thread's update is the second of a group of three; it is interrupted
    # while queued (nothing of it runs), while its function runs (it fails alone),
    # or after it ran, while a later function runs (its result is in the commit:
    # the interruption says it was written).
    ran = threading.Event()
    later = threading.Event()
    release = threading.Event()
    go, inside = threading.Event(), threading.Event()
    outcomes: dict[str, Any] = {}

    def blocker_fn(s: Doc) -> None:
        inside.set()
        go.wait(10)

    def mine(s: Doc) -> None:
        ran.set()
        if where == "in its function":
            time.sleep(5)  # interrupted here
        s.n += 10

    def last(s: Doc) -> None:
        later.set()
        release.wait(10)  # long enough for the interrupt, shorter than a hand-on
        s.n += 100

    def call(name: str, fn: Callable[[Doc], Any]) -> None:
        try:
            outcomes[name] = store.update(fn)
        except BaseException as e:
            outcomes[name] = e

    blocker = threading.Thread(target=store.update, args=(blocker_fn,))
    blocker.start()
    assert inside.wait(10)
    first = threading.Thread(target=call, args=("first", bump))
    first.start()
    wait_queued(store, 2)
    rest: list[threading.Thread] = []

    def arrange() -> None:
        wait_queued(store, 3)
        t = threading.Thread(target=call, args=("last", last))
        t.start()
        rest.append(t)
        wait_queued(store, 4)
        if where == "queued":
            _interrupt_main_when(lambda: True).join()
            deadline = time.monotonic() + 10
            while len(store._group._queue) != 3:  # it left
                assert time.monotonic() < deadline
                time.sleep(0.002)
        go.set()
        if where == "waiting for the commit":
            _interrupt_main_when(later.is_set).join()
        elif where == "in its function":
            _interrupt_main_when(ran.is_set).join()
        time.sleep(0.05)
        release.set()

    arranger = threading.Thread(target=arrange)
    arranger.start()
    with pytest.raises(KeyboardInterrupt) as caught:
        store.update(mine)
    for t in (blocker, first, arranger):
        t.join(10)
    for t in rest:
        t.join(10)
    notes = getattr(caught.value, "__notes__", [])
    if where == "waiting for the commit":
        assert [outcomes["first"].n, outcomes["last"].n] == [1, 111]
        assert store.load().n == 111
        assert any("was written" in n for n in notes), notes
    else:
        assert [outcomes["first"].n, outcomes["last"].n] == [1, 101]
        assert store.load().n == 101
        assert not any("was written" in n for n in notes), notes
    store.update(bump)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_a_leader_interrupted_as_its_write_lands_does_not_tell_its_callers_nothing_was_written(
    store: StateStore[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    from faultfs import Interposer

    from statestore import StateWriteError

    class InterruptAfterRename(Interposer):
        """Ctrl-C landing just after the state file's rename, before the write returns."""

        def call(
            self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            result = real(*args, **kwargs)
            if name in ("replace", "rename", "exchange") and "state.json" in repr(args[1:2]):
                raise KeyboardInterrupt
            return result

    interposer = InterruptAfterRename()
    interposer.install(monkeypatch)
    go, inside = threading.Event(), threading.Event()
    outcomes: list[Any] = []

    def blocker_fn(s: Doc) -> None:
        inside.set()
        go.wait(10)

    def call() -> None:
        try:
            outcomes.append(store.update(bump))
        except BaseException as e:
            outcomes.append(e)

    blocker = threading.Thread(target=store.update, args=(blocker_fn,))
    blocker.start()
    assert inside.wait(10)
    followers = [threading.Thread(target=call) for _ in range(2)]

    def arrange() -> None:
        wait_queued(store, 2)  # this thread's update: the next leader
        for i, t in enumerate(followers):
            t.start()
            wait_queued(store, 3 + i)
        go.set()

    arranger = threading.Thread(target=arrange)
    arranger.start()
    with interposer.active(), pytest.raises(KeyboardInterrupt):
        store.update(bump)
    for t in (blocker, arranger, *followers):
        t.join(10)
    assert store.load().n == 3  # the group's state landed
    assert len(outcomes) == 2 and all(isinstance(o, StateWriteError) for o in outcomes)
    for o in outcomes:
        assert "nothing of it was written" not in str(o) and "may or may not" in str(o), o


def test_the_callers_after_a_stuck_function_time_out_and_the_rest_stands(tmp_path: Path) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=0.5)
    store.save(Doc())
    release = threading.Event()

    def stuck(s: Doc) -> None:
        release.wait(20)
        s.n += 100

    group = Group(store, [bump, stuck, bump, bump], join=False)
    try:
        for i in (0, 2, 3):
            assert group.done[i].wait(10)
        assert group.results[0].n == 1
        assert all(isinstance(group.results[i], LockTimeout) for i in (2, 3)), group.results
        assert store.load().n == 1
    finally:
        release.set()
        group.join()
    assert group.results[1].n == 101 and store.load().n == 101


def test_a_function_that_waits_for_another_threads_update_ends_with_its_timeout(
    tmp_path: Path,
) -> None:
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=0.5)
    store.save(Doc())
    inner: list[Any] = []

    def joins(s: Doc) -> None:
        def other() -> None:
            try:
                inner.append(store.update(bump))
            except BaseException as e:
                inner.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join(20)  # it waits for this group's lock, as it would for a plain update's
        s.n += 10

    started = time.monotonic()
    group = Group(store, [bump, joins, bump])
    assert time.monotonic() - started < 15
    assert isinstance(inner[0], LockTimeout)
    assert [getattr(r, "n", None) for r in group.results[:2]] == [1, 11]
    last = group.results[2]  # queued behind it: done, or timed out as behind any holder
    assert isinstance(last, LockTimeout) or last.n == 12, last
    assert store.load().n == (11 if isinstance(last, LockTimeout) else 12)


def test_a_grouped_function_takes_the_lent_lock_at_once(tmp_path: Path) -> None:
    # Each follower's function takes the group's lock again as its very first act
    # (a store of another file under the same lock, with no time to wait): the
    # lock is lent to its thread before its function can start.
    lock = tmp_path / "shared.lock"
    store = StateStore(Doc, tmp_path / "a.json", default=Doc, lock=lock, timeout=30)
    other = StateStore(Doc, tmp_path / "b.json", default=Doc, lock=lock, timeout=0)
    store.save(Doc())

    def first_thing(s: Doc) -> None:
        other.update(bump)
        s.n += 1

    for _ in range(15):
        group = Group(store, [first_thing] * 4)
        assert not [r for r in group.results if isinstance(r, BaseException)], group.results
    assert other.load().n == 60


def test_a_leader_that_times_out_fails_no_caller_that_has_time_left(store: StateStore[Doc]) -> None:
    # Callers of one store with different timeouts (the store's timeout changed
    # between calls): a leader whose own, short wait for the lock runs out must not
    # fail a caller queued behind it that may wait longer.
    assert store.lock is not None
    release_first, release_other = threading.Event(), threading.Event()
    inside = threading.Event()
    outcomes: dict[str, Any] = {}

    def first(s: Doc) -> None:
        inside.set()
        release_first.wait(10)

    def call(name: str) -> None:
        try:
            outcomes[name] = store.update(bump)
        except BaseException as e:
            outcomes[name] = e

    holder = threading.Thread(target=store.update, args=(first,))
    holder.start()
    assert inside.wait(10)
    store.timeout = 0.5
    short = threading.Thread(target=call, args=("short",))
    short.start()
    wait_queued(store, 2)
    store.timeout = 30
    patient = threading.Thread(target=call, args=("patient",))
    patient.start()
    wait_queued(store, 3)
    other_lock = DirectoryLock(store.lock.path)
    taken = threading.Event()

    def other_holder() -> None:  # takes the lock between the two groups
        with other_lock.acquire(timeout=10):
            taken.set()
            release_other.wait(10)

    other = threading.Thread(target=other_holder)
    other.start()
    deadline = time.monotonic() + 10
    while not other_lock._st.waiting:  # it waits for the lock, first in line
        assert time.monotonic() < deadline
        time.sleep(0.002)
    release_first.set()
    assert taken.wait(10)
    short.join(10)
    assert isinstance(outcomes["short"], LockTimeout)
    time.sleep(0.2)
    release_other.set()
    for t in (holder, patient, other):
        t.join(10)
    assert outcomes["patient"].n == 1, outcomes
    assert store.load().n == 1


def test_a_long_function_written_after_its_group_was_handed_on_follows_the_write_before(
    tmp_path: Path,
) -> None:
    # Its result was framed after the state it started from; a write came in
    # between: the bytes it commits must follow that write (the counter goes on).
    store = StateStore(Doc, tmp_path / "state.json", default=Doc, history=10)
    store.save(Doc())
    before = counter_of(store)
    release = threading.Event()

    def slow(s: Doc) -> None:
        assert release.wait(20)
        s.n += 10

    group = Group(store, [bump, slow], join=False)
    try:
        assert group.done[0].wait(10)
        assert counter_of(store) == before + 1
    finally:
        release.set()
        group.join()
    assert group.results[1].n == 11
    assert counter_of(store) == before + 2
    counters = [int(e.revision.split("-")[0]) for e in store.history()]
    assert counters == sorted(set(counters), reverse=True), counters
    assert store.read().written_by is not None


def test_a_lone_update_that_times_out_reports_the_stores_timeout(store: StateStore[Doc]) -> None:
    assert store.lock is not None
    other = DirectoryLock(store.lock.path)
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.acquire(timeout=10):
            taken.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert taken.wait(10)
        store.timeout = 0.3
        with pytest.raises(LockTimeout) as e:
            store.update(bump)
        assert e.value.timeout == 0.3  # its whole timeout, as a plain update's
    finally:
        release.set()
        t.join(10)
