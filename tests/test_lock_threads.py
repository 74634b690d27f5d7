"""The lock's public API: handles not tied to a thread, waiters that stop cleanly,
timeouts without limits, symlinks followed per operation, fork, bounded per-path
state, and filelock's conventions (docs/locking.md, "Threads" and "filelock").

Every test uses real threads, real processes, real signals and real files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gc
import hashlib
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Counter

from statestore import (
    AcquiredLock,
    AsyncDirectoryLock,
    DirectoryLock,
    LockCompromisedError,
    LockError,
    LockPermissionError,
    LockTimeout,
    NestedTransactionError,
    StateStore,
)
from statestore._cli import main as cli_main
from statestore._lock import WaitAbandoned
from statestore._lock import handoff as _handoff
from statestore._lock import registry as _lease
from statestore._lock.paths import canonical as _canonical

pytestmark = pytest.mark.timeout(120)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _bump(s: Counter) -> None:
    s.count += 1


HOLD = (
    "import sys, time\n"
    "from statestore import DirectoryLock\n"
    "lock = DirectoryLock(sys.argv[1])\n"
    "lock.acquire()\n"
    "print('held', flush=True)\n"
    "sys.stdin.readline()\n"
    "lock.release()\n"
    "print('released', flush=True)\n"
    "time.sleep(120)\n"
)


@contextlib.contextmanager
def held_by_a_process(lock_path: Path | str) -> Iterator[Callable[[], None]]:
    """Hold the lock in another process; the yielded function releases it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == "held\n"

    def release() -> None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "released\n"

    try:
        yield release
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def in_thread(fn: Callable[[], object]) -> object:
    """Run ``fn`` on a new thread and return its result (or raise its exception)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=30)


def other_process_can_take(lock_path: Path | str, timeout: float = 5.0) -> bool:
    code = (
        "import sys\n"
        "from statestore import DirectoryLock, LockTimeout\n"
        "try:\n"
        f"    DirectoryLock(sys.argv[1]).acquire(timeout={timeout}).release()\n"
        "except LockTimeout:\n"
        "    sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(lock_path)]).returncode == 0


def is_lock_dir(path: Path) -> bool:
    return path.is_dir() and (path / "owner.json").is_file()


# ------------------------------------------------------- acquire() as filelock's


def test_with_acquire_holds_for_the_block_only(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    with lock.acquire(timeout=5) as entered:
        assert entered is lock
        assert lock.is_held and is_lock_dir(tmp_path / "x.lock")
    assert not lock.is_held
    assert not (tmp_path / "x.lock").exists()
    # Nested inside a plain block: each level released on its own.
    with lock:
        with lock.acquire(timeout=5):
            assert lock.is_held
        assert lock.is_held and is_lock_dir(tmp_path / "x.lock")
    assert not (tmp_path / "x.lock").exists()
    assert other_process_can_take(tmp_path / "x.lock", timeout=0.5)


def test_the_handle_releases_once_and_then_is_harmless(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    outer = lock.acquire()
    inner = lock.acquire()
    assert isinstance(inner, AcquiredLock) and inner.path == lock.path
    inner.release()
    inner.release()  # again: nothing, the outer level stays
    assert outer.is_held and is_lock_dir(tmp_path / "x.lock")
    outer.release()
    assert not outer.is_held and not (tmp_path / "x.lock").exists()
    outer.release()
    lock.release()  # nothing held: harmless, as with filelock
    assert not (tmp_path / "x.lock").exists()


def test_release_on_a_thread_that_holds_nothing_is_harmless(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    with lock:
        in_thread(lock.release)  # that thread holds nothing: it must not free ours
        assert lock.is_held and is_lock_dir(tmp_path / "x.lock")
        assert not other_process_can_take(tmp_path / "x.lock", timeout=0.2)
        lock.verify()
    assert not (tmp_path / "x.lock").exists()


def test_the_lock_is_a_decorator(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")

    @lock
    def work(x: int) -> int:
        assert lock.is_held and is_lock_dir(tmp_path / "x.lock")
        return x * 2

    assert work(21) == 42
    assert not (tmp_path / "x.lock").exists()


def test_lock_timeout_names_lock_file(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    with held_by_a_process(lock.path), pytest.raises(LockTimeout) as caught:
        lock.acquire(timeout=0.1)
    assert caught.value.lock_file == lock.path == caught.value.path
    assert pickle.loads(pickle.dumps(caught.value)).lock_file == lock.path


# ---------------------------------------------------------------- timeouts


@pytest.mark.parametrize("forever", [float("inf"), -1, -0.5])
def test_waiting_forever_between_threads(tmp_path: Path, forever: float) -> None:
    """``inf`` once overflowed Condition.wait as soon as two threads contended."""
    lock = DirectoryLock(tmp_path / "x.lock", timeout=forever)
    got: list[object] = []
    with lock:
        t = threading.Thread(target=lambda: got.append(lock.acquire(forever)))
        t.start()
        time.sleep(0.2)
        assert t.is_alive() and not got  # waiting, not crashed
    t.join(10)
    assert len(got) == 1 and isinstance(got[0], AcquiredLock)
    got[0].release()
    # The lock's own timeout of inf, with the lock held by another thread.
    with lock:
        t = threading.Thread(target=lambda: got.append(lock.acquire()))
        t.start()
        time.sleep(0.1)
    t.join(10)
    assert len(got) == 2
    got[1].release()  # type: ignore[attr-defined]
    assert not (tmp_path / "x.lock").exists()


def test_waiting_forever_for_another_process(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    with held_by_a_process(lock.path) as release:
        timer = threading.Timer(0.3, release)
        timer.start()
        with lock.acquire(timeout=float("inf")):
            assert lock.is_held
        timer.join(10)  # the holder said it released before it is stopped


def test_non_blocking_tries_once(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock", timeout=30)
    with lock.acquire(blocking=False):  # free: taken at once
        assert lock.is_held
    with held_by_a_process(lock.path):
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            lock.acquire(blocking=False)
        assert time.monotonic() - started < 5  # not the lock's 30 s
    with lock:  # held by a thread of this process
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            in_thread(lambda: lock.acquire(blocking=False))
        assert time.monotonic() - started < 5


def test_a_nan_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN"):
        DirectoryLock(tmp_path / "x.lock", timeout=float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        DirectoryLock(tmp_path / "x.lock").acquire(float("nan"))


# ------------------------------------------------------- interrupted waiters


def _queued_behind(lock: DirectoryLock, waiters: int, timeout: float = 5.0) -> None:
    st = lock._at()._st
    end = time.monotonic() + timeout
    while len(st.waiting) < waiters:
        assert time.monotonic() < end, "the waiters never queued"
        time.sleep(0.005)


def _check_left_cleanly(lock: DirectoryLock, path: Path) -> None:
    """The interrupted waiter is out of the queue: the next thread gets its turn, and
    a later acquire by the interrupted thread really takes the directory."""
    st = lock._at()._st
    assert st.hold is None and not st.waiting
    with lock.acquire(timeout=5):
        assert is_lock_dir(path)
        assert not other_process_can_take(path, timeout=0.3)
    assert not path.exists()


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_keyboard_interrupt_while_waiting_for_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    holding, let_go = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            holding.set()
            let_go.wait(10)

    later: list[float] = []

    def behind() -> None:
        started = time.monotonic()
        with lock.acquire(timeout=5):
            later.append(time.monotonic() - started)

    h = threading.Thread(target=holder)
    h.start()
    assert holding.wait(5)
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        w = threading.Thread(target=behind)

        def interrupt() -> None:
            _queued_behind(lock, 1)
            w.start()  # queued behind the main thread
            _queued_behind(lock, 2)
            signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]

        threading.Thread(target=interrupt).start()
        with pytest.raises(KeyboardInterrupt):
            lock.acquire(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    let_go.set()
    h.join(10)
    w.join(10)
    assert later and later[0] < 4, "the thread behind the interrupted one waited out its timeout"
    _check_left_cleanly(lock, path)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_keyboard_interrupt_while_waiting_for_another_process(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with held_by_a_process(path) as release:
        try:
            timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                lock.acquire(timeout=30)
        finally:
            signal.signal(signal.SIGINT, previous)
        # Another thread of ours is not held up by the waiter that left.
        got: list[bool] = []
        t = threading.Thread(
            target=lambda: got.append(bool(lock.acquire(timeout=5).release() or 1))
        )
        t.start()
        time.sleep(0.1)
        release()
        t.join(10)
        assert got == [True]
    _check_left_cleanly(lock, path)
    assert _queue_folders([path]) == []  # the pipe of the interrupted waiter is gone


def test_cancel_check_raising_while_queued(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    calls = 0

    def explode() -> bool:
        nonlocal calls
        calls += 1
        if calls >= 2:
            raise ValueError("cancel_check failed")
        return False

    with lock, pytest.raises(ValueError, match="cancel_check failed"):
        in_thread(lambda: lock.acquire(timeout=10, cancel_check=explode))
    _check_left_cleanly(lock, path)
    # ... and while waiting on the file system (another process holds it).
    calls = 0
    with held_by_a_process(path), pytest.raises(ValueError, match="cancel_check failed"):
        lock.acquire(timeout=10, cancel_check=explode)
    _check_left_cleanly(lock, path)


def test_cancel_check_ends_the_wait_as_a_lock_timeout(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with lock, pytest.raises(WaitAbandoned) as caught:
        in_thread(lambda: lock.acquire(timeout=float("inf"), cancel_check=stop.is_set))
    assert isinstance(caught.value, LockTimeout)
    assert time.monotonic() - started < 5
    _check_left_cleanly(lock, path)
    stop.clear()
    threading.Timer(0.2, stop.set).start()
    with held_by_a_process(path), pytest.raises(LockTimeout):
        lock.acquire(timeout=-1, cancel_check=stop.is_set)
    _check_left_cleanly(lock, path)


def test_a_turn_handed_to_a_waiter_that_gives_up_is_passed_on(tmp_path: Path) -> None:
    """The holder releases while the waiter's cancel_check runs; the waiter then
    gives up: the turn it was handed must go to the next thread, not be lost."""
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    first = lock.acquire()
    behind: list[float] = []

    def third() -> None:
        started = time.monotonic()
        with lock.acquire(timeout=5):
            behind.append(time.monotonic() - started)

    t3 = threading.Thread(target=third)

    def give_up() -> bool:
        if not t3.is_alive():
            t3.start()
            _queued_behind(lock, 2)
            first.release()  # from this thread: a handle is not tied to a thread
            assert lock._at()._st.hold is not None  # handed to us, while we are here
            raise RuntimeError("changed my mind")
        return False

    with pytest.raises(RuntimeError, match="changed my mind"):
        in_thread(lambda: lock.acquire(timeout=10, cancel_check=give_up))
    t3.join(10)
    assert behind and behind[0] < 4
    _check_left_cleanly(lock, path)


def test_a_timeout_in_the_queue_lets_the_next_one_through(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    hold = lock.acquire()
    errors: list[BaseException] = []
    got: list[bool] = []

    def short() -> None:
        try:
            lock.acquire(timeout=0.2)
        except LockTimeout as e:
            errors.append(e)

    def patient() -> None:
        with lock.acquire(timeout=10):
            got.append(True)

    a = threading.Thread(target=short)
    a.start()
    _queued_behind(lock, 1)
    b = threading.Thread(target=patient)
    b.start()
    a.join(10)
    assert len(errors) == 1
    hold.release()
    b.join(10)
    assert got == [True]
    _check_left_cleanly(lock, path)


# ------------------------------------------------------- threads and handles


def test_a_handle_is_released_from_another_thread(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    handle = in_thread(lambda: lock.acquire())
    assert isinstance(handle, AcquiredLock) and handle.is_held and is_lock_dir(path)
    in_thread(handle.verify)
    handle.verify()
    in_thread(handle.release)
    assert not path.exists() and not handle.is_held
    with pytest.raises(LockCompromisedError):
        handle.verify()
    assert other_process_can_take(path, timeout=0.5)


def test_a_with_block_left_on_another_thread_releases(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)

    @contextlib.contextmanager
    def dependency() -> Iterator[None]:  # FastAPI's sync ``yield`` dependencies
        with lock:
            yield

    cm = dependency()
    entered, finish = threading.Event(), threading.Event()

    def enter() -> None:  # stays alive, so the other thread cannot reuse its id
        cm.__enter__()
        entered.set()
        finish.wait(10)

    t1 = threading.Thread(target=enter)
    t1.start()
    assert entered.wait(10)
    assert is_lock_dir(path)
    t2 = threading.Thread(target=lambda: cm.__exit__(None, None, None))
    t2.start()
    t2.join(10)
    finish.set()
    t1.join(10)
    assert not path.exists()
    assert lock._at()._st.hold is None
    assert other_process_can_take(path, timeout=0.5)


@pytest.mark.parametrize("fails", [False, True])
def test_a_transaction_entered_and_left_on_different_threads(state_path: Path, fails: bool) -> None:
    """As a thread pool runs a sync ``yield`` dependency: the thread that entered is
    alive (and busy elsewhere) when another thread leaves the block."""
    store = StateStore(Counter, state_path, default=Counter)
    store.save(Counter(count=1))
    cm = store.transaction()
    entered, finish = threading.Event(), threading.Event()
    box: list[Counter] = []

    def enter() -> None:
        box.append(cm.__enter__())
        entered.set()
        finish.wait(10)  # stays alive while another thread ends the transaction

    t1 = threading.Thread(target=enter)
    t1.start()
    assert entered.wait(10)
    box[0].count = 5
    assert is_lock_dir(Path(f"{state_path}.lock"))
    outcome: list[BaseException | None] = []

    def leave() -> None:
        try:
            if fails:
                with contextlib.suppress(ValueError):
                    cm.__exit__(ValueError, ValueError("no"), None)
            else:
                cm.__exit__(None, None, None)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t2 = threading.Thread(target=leave)
    t2.start()
    t2.join(10)
    finish.set()
    t1.join(10)
    assert outcome == [None]
    assert not Path(f"{state_path}.lock").exists(), "the lock leaked"
    assert store.load().count == (1 if fails else 5)
    # Nobody waits for it: another process gets it at once, and so does this one.
    assert other_process_can_take(f"{state_path}.lock", timeout=1)
    assert store.update(lambda s: Counter(count=s.count + 1)).count == (2 if fails else 6)


def test_a_transaction_left_on_another_thread_exactly(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    cm = store.transaction()
    state = in_thread(cm.__enter__)
    assert isinstance(state, Counter)
    state.count = 7
    in_thread(lambda: cm.__exit__(None, None, None))  # a new thread, not the one that entered
    assert store.load().count == 7
    assert not Path(f"{state_path}.lock").exists()
    assert other_process_can_take(f"{state_path}.lock", timeout=1)


def test_reentrancy_is_per_thread(tmp_path: Path) -> None:
    a = DirectoryLock(tmp_path / "x.lock")
    b = DirectoryLock(tmp_path / "x.lock")
    with a:
        with b.acquire(timeout=0):  # the same thread: a level more, no wait
            assert a.is_held and b.is_held
        with pytest.raises(LockTimeout):  # another thread: waits its turn
            in_thread(lambda: b.acquire(timeout=0.2))
        assert not in_thread(lambda: a.is_held)


# ---------------------------------------------------------------- symlinks


def _deploy(tmp_path: Path, *versions: str) -> Path:
    for v in versions:
        (tmp_path / v).mkdir()
        StateStore(Counter, tmp_path / v / "state.json").save(Counter())
    (tmp_path / "current").symlink_to(versions[0])
    return tmp_path / "current" / "state.json"


def _switch(tmp_path: Path, version: str) -> None:
    (tmp_path / "next").symlink_to(version)
    os.replace(tmp_path / "next", tmp_path / "current")  # atomic, as deploy tools do


def test_stores_built_before_and_after_a_link_switch_exclude_each_other(tmp_path: Path) -> None:
    state = _deploy(tmp_path, "v1", "v2")
    before = StateStore(Counter, state, default=Counter, timeout=0.3)
    _switch(tmp_path, "v2")
    after = StateStore(Counter, state, default=Counter, timeout=0.3)
    inside, done = threading.Event(), threading.Event()

    def slow(s: Counter) -> None:
        inside.set()
        done.wait(30)
        s.count += 1

    t = threading.Thread(target=before.update, args=(slow,))
    t.start()
    assert inside.wait(5)
    try:
        assert is_lock_dir(tmp_path / "v2" / "state.json.lock")
        assert not (tmp_path / "v1" / "state.json.lock").exists()
        with pytest.raises(LockTimeout):  # the same file, so the same lock
            in_thread(lambda: after.update(_bump))
        with pytest.raises(LockTimeout):
            in_thread(lambda: before.update(_bump))
    finally:
        done.set()
        t.join(10)
    after.update(_bump)
    assert StateStore(Counter, tmp_path / "v2" / "state.json").load().count == 2
    assert StateStore(Counter, tmp_path / "v1" / "state.json").load().count == 0


def _deployed_worker(state: str, ready: str, go: str, times: int) -> None:
    store = StateStore(Counter, state, default=Counter)
    Path(ready).touch()
    while not os.path.exists(go):
        time.sleep(0.001)
    for _ in range(times):
        store.update(_bump)


def test_processes_on_both_sides_of_a_link_switch_lose_nothing(tmp_path: Path) -> None:
    state = _deploy(tmp_path, "v1", "v2")
    ctx = multiprocessing.get_context("fork")
    go = str(tmp_path / "go")
    early = ctx.Process(target=_deployed_worker, args=(str(state), str(tmp_path / "r1"), go, 40))
    early.start()
    while not (tmp_path / "r1").exists():
        time.sleep(0.001)
    _switch(tmp_path, "v2")  # the first store was built before this
    late = ctx.Process(target=_deployed_worker, args=(str(state), str(tmp_path / "r2"), go, 40))
    late.start()
    while not (tmp_path / "r2").exists():
        time.sleep(0.001)
    Path(go).touch()
    for p in (early, late):
        p.join(60)
        assert p.exitcode == 0
    assert StateStore(Counter, tmp_path / "v2" / "state.json").load().count == 80
    assert StateStore(Counter, tmp_path / "v1" / "state.json").load().count == 0


def test_release_after_the_link_is_switched_releases_what_was_taken(tmp_path: Path) -> None:
    state = _deploy(tmp_path, "v1", "v2")
    store = StateStore(Counter, state, default=Counter)
    with store.transaction() as s:
        s.count = 9
        _switch(tmp_path, "v2")
        assert is_lock_dir(tmp_path / "v1" / "state.json.lock")
    # The commit went to the file the lock guarded, and that lock was released.
    assert not (tmp_path / "v1" / "state.json.lock").exists()
    assert not (tmp_path / "v2" / "state.json.lock").exists()
    assert StateStore(Counter, tmp_path / "v1" / "state.json").load().count == 9
    assert StateStore(Counter, tmp_path / "v2" / "state.json").load().count == 0
    # The next operation follows the link.
    store.update(_bump)
    assert StateStore(Counter, tmp_path / "v2" / "state.json").load().count == 1
    # The same with the lock alone, released through the object and the handle.
    lock = DirectoryLock.for_file(state)
    with lock:
        _switch(tmp_path, "v1")
        assert lock.is_held
        assert is_lock_dir(tmp_path / "v2" / "state.json.lock")
    assert not (tmp_path / "v2" / "state.json.lock").exists()
    handle = lock.acquire()
    assert handle.file == str(tmp_path / "v1" / "state.json")
    _switch(tmp_path, "v2")
    lock.release()
    assert not handle.is_held and not (tmp_path / "v1" / "state.json.lock").exists()


def test_a_state_file_that_is_a_link_shares_its_targets_lock(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "real.json"
    link = tmp_path / "state.json"
    link.symlink_to(target)
    via_target = StateStore(Counter, target, default=Counter)
    via_link = StateStore(Counter, link, default=Counter, timeout=0.2)
    with via_target.transaction(), pytest.raises(LockTimeout):
        in_thread(lambda: via_link.update(_bump))
    via_link.update(_bump)
    assert link.is_symlink() and via_target.load().count == 1


def test_cli_and_doctor_look_at_the_lock_beside_a_links_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "real.json"
    target.write_text("{ not json")
    link = tmp_path / "state.json"
    link.symlink_to(target)
    real_lock = f"{target}.lock"
    with held_by_a_process(real_lock) as release:
        code = cli_main(["lock", "status", str(link)])
        out = capsys.readouterr().out
        assert code == 0, out
        assert real_lock in out and "held" in out and "free" not in out
        assert cli_main(["lock", "break", str(link)]) != 0  # live: refused
        capsys.readouterr()
        assert is_lock_dir(Path(real_lock))
        # doctor --fix leaves the file behind a held lock alone.
        cli_main(["doctor", str(tmp_path), "--fix"])
        out = capsys.readouterr().out
        assert "locked" in out
        assert link.is_symlink() and target.read_text() == "{ not json"
        assert is_lock_dir(Path(real_lock))
        release()
    assert cli_main(["lock", "status", str(link)]) == 0
    assert "free" in capsys.readouterr().out


# -------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_inside_a_transaction_can_update(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    store.save(Counter(count=0))
    lock_dir = Path(f"{state_path}.lock")
    with store.transaction() as s:
        s.count = 1
        token = (lock_dir / "owner.json").read_text()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                store.update(lambda c: Counter(count=c.count + 10))
            except NestedTransactionError:
                code = 3
            except BaseException:
                code = 4
            finally:
                os._exit(code)
        time.sleep(0.3)  # the child waits for our lock meanwhile
        assert (lock_dir / "owner.json").read_text() == token  # untouched
        store.lock.verify()  # type: ignore[union-attr]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.load().count == 11


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_leaving_the_parents_transaction_writes_and_releases_nothing(
    state_path: Path,
) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    store.save(Counter(count=1))
    lock_dir = Path(f"{state_path}.lock")
    cm = store.transaction()
    state = cm.__enter__()
    state.count = 2
    pid = os.fork()
    if pid == 0:  # child: the inherited block ends here, as a returning child's would
        code = 0
        try:
            cm.__exit__(None, None, None)
            code = 3  # it must not commit in the parent's name
        except LockCompromisedError:
            code = 0
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert is_lock_dir(lock_dir)
    assert store.load().count == 1
    store.lock.verify()  # type: ignore[union-attr]
    cm.__exit__(None, None, None)
    assert store.load().count == 2 and not lock_dir.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_releasing_an_inherited_lock_does_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    handle = lock.acquire()
    with lock:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if lock.is_held or handle.is_held:
                    code = 3
                lock.release()
                handle.release()
                lock.__exit__(None, None, None)
                try:
                    handle.verify()
                    code = 5
                except LockCompromisedError:
                    pass
            except BaseException:
                code = 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert is_lock_dir(path)
        lock.verify()
    handle.verify()
    handle.release()
    assert not path.exists()


# ------------------------------------------------------ per-path resources


def _queue_folders(lock_paths: list[Path]) -> list[str]:
    root = _handoff._runtime_root()
    if root is None:
        return []
    names = {hashlib.sha256(_canonical(str(p)).encode()).hexdigest()[:32] for p in lock_paths}
    return sorted(n for n in os.listdir(root) if n in names)


def test_per_path_state_is_freed_with_its_last_user(tmp_path: Path) -> None:
    gc.collect()
    base = _lease.sizes()[0]
    for i in range(2000):
        with DirectoryLock(tmp_path / f"{i}.lock"):
            pass
    for i in range(200):
        StateStore(Counter, tmp_path / f"{i}.json", default=Counter).update(_bump)
    gc.collect()
    assert _lease.sizes()[0] <= base + 5
    assert _lease.sizes()[1] == 0
    # While something uses a path, its state stays (and is shared).
    lock = DirectoryLock(tmp_path / "kept.lock")
    assert _lease.state(lock._key) is lock._st
    gc.collect()
    assert _lease.sizes()[0] >= base + 1


def test_a_held_lock_keeps_its_state_and_heartbeat_without_objects(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    DirectoryLock(path, lease=0.6).acquire()  # nothing kept: held until the process ends
    gc.collect()
    first = DirectoryLock(path).owner()
    assert first is not None
    time.sleep(0.5)
    later = DirectoryLock(path).owner()
    assert later is not None and later.expires_at > first.expires_at  # still refreshed
    st = _lease.state(_canonical(str(path)))
    assert st.held is not None and st.hold is not None
    # Release it as the code that dropped it would have had to: through a level.
    st.hold.count = 1
    DirectoryLock(path)._release_hold(st.hold)
    assert not path.exists()


def test_queue_folders_go_with_the_last_waiter(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.lock" for i in range(8)]
    for path in paths:
        with held_by_a_process(path) as release:
            t = threading.Thread(
                target=lambda p=path: DirectoryLock(p).acquire(timeout=10).release()
            )
            t.start()
            end = time.monotonic() + 5
            while not _queue_folders([path]) and time.monotonic() < end:
                time.sleep(0.005)
            assert _queue_folders([path]), "the waiter did not queue on the file system"
            release()
            t.join(10)
    assert _queue_folders(paths) == []


def test_a_queue_folder_with_foreign_content_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    root = _handoff._runtime_root()
    if root is None:
        pytest.skip("no runtime folder for queues here")
    folder = Path(root) / hashlib.sha256(_canonical(str(path)).encode()).hexdigest()[:32]
    folder.mkdir(mode=0o700)
    (folder / "notes.txt").write_text("not the library's")
    try:
        with held_by_a_process(path) as release:
            timer = threading.Timer(0.3, release)
            timer.start()
            DirectoryLock(path).acquire(timeout=10).release()
            timer.join(10)
        assert (folder / "notes.txt").read_text() == "not the library's"
    finally:
        (folder / "notes.txt").unlink()
        folder.rmdir()


# ------------------------------------------------------------ permissions


@pytest.mark.skipif(not IS_ROOT, reason="root ignores modes: the child drops to nobody")
def test_a_permission_failure_is_a_permission_error(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    tmp_path.chmod(0o755)  # readable, not writable, by nobody
    lock = DirectoryLock(tmp_path / "x.lock")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 9
        try:
            os.close(r)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                lock.acquire(timeout=1)
                code = 1
            except LockPermissionError as e:
                ok = isinstance(e, PermissionError) and isinstance(e, LockError)
                code = 0 if ok and e.errno == errno.EACCES and str(tmp_path) in str(e) else 2
            except BaseException:
                code = 3
        finally:
            os._exit(code)
    os.close(w)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    e = LockError(lock.path, "no", errno=errno.EPERM)
    assert (
        isinstance(e, PermissionError)
        and type(pickle.loads(pickle.dumps(e))) is LockPermissionError
    )
    assert not isinstance(LockError(lock.path, "full", errno=errno.ENOSPC), PermissionError)


# ---------------------------------------------------------------- logging


def test_debug_records_for_acquire_release_wait_and_break(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="statestore")
    path = tmp_path / "x.lock"
    lock = DirectoryLock(path)
    with lock:
        t = threading.Thread(target=lambda: lock.acquire(timeout=5).release())
        t.start()
        _queued_behind(lock, 1)
    t.join(10)
    with held_by_a_process(path) as release:
        timer = threading.Timer(0.3, release)
        timer.start()
        lock.acquire(timeout=10).release()
        timer.join(10)
    # A stale lock (its holder is gone), broken on purpose.
    with held_by_a_process(path):
        pass
    lock.break_lock()
    text = [r.getMessage() for r in caplog.records if r.name == "statestore"]
    assert any(m.startswith("acquired lock") for m in text)
    assert any(m.startswith("released lock") for m in text)
    assert any("waiting for lock" in m and "another thread" in m for m in text)
    assert any("waiting for lock" in m and "held by pid" in m for m in text)
    assert any(m.startswith("breaking lock") for m in text)


# ------------------------------------------------------------------ asyncio


def test_async_lock_serialises_tasks_and_releases_from_any_task(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = AsyncDirectoryLock(path)
    inside = 0
    most = 0

    async def work() -> None:
        nonlocal inside, most
        async with lock:
            inside += 1
            most = max(most, inside)
            assert is_lock_dir(path)
            await asyncio.sleep(0.01)
            inside -= 1

    async def main() -> None:
        await asyncio.gather(*(work() for _ in range(5)))
        level = await lock.acquire(timeout=5)
        await asyncio.create_task(level.release())  # another task lets it go
        assert not path.exists() and not lock.is_held
        async with await lock.acquire(timeout=float("inf")) as entered:
            assert entered is lock and is_lock_dir(path)
        assert not path.exists()

    asyncio.run(main())
    assert most == 1


def test_async_lock_refuses_a_same_task_deadlock_at_once(tmp_path: Path) -> None:
    lock = AsyncDirectoryLock(tmp_path / "x.lock", timeout=30)
    twin = AsyncDirectoryLock(tmp_path / "x.lock", timeout=30)

    async def main() -> float:
        async with lock:
            started = time.monotonic()
            with pytest.raises(LockError) as caught:
                await twin.acquire()
            assert caught.value.errno == errno.EDEADLK
            # Another task waits its turn instead.
            other = asyncio.create_task(twin.acquire(timeout=0.2))
            with pytest.raises(LockTimeout):
                await other
            return time.monotonic() - started

    assert asyncio.run(main()) < 5
    assert not (tmp_path / "x.lock").exists()


def test_async_lock_cancelled_while_waiting_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = AsyncDirectoryLock(path)

    async def main() -> None:
        with held_by_a_process(path) as release:
            task = asyncio.create_task(lock.acquire(timeout=float("inf")))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release()
        await asyncio.sleep(0.5)  # the worker thread stops within its poll
        assert not path.exists() and not lock.is_held
        async with lock:
            assert is_lock_dir(path)

    asyncio.run(main())
    assert not path.exists()


def test_async_lock_is_a_decorator(tmp_path: Path) -> None:
    lock = AsyncDirectoryLock(tmp_path / "x.lock")

    @lock
    async def work() -> int:
        assert lock.is_held and is_lock_dir(tmp_path / "x.lock")
        return 3

    assert asyncio.run(work()) == 3
    assert not (tmp_path / "x.lock").exists()


def test_the_async_store_waits_forever_when_told(state_path: Path) -> None:
    from statestore import AsyncStateStore

    store = AsyncStateStore(Counter, state_path, default=Counter, timeout=-1)
    lock_path = Path(f"{state_path}.lock")

    async def main() -> int:
        with held_by_a_process(lock_path) as release:
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, release)
            saved = await store.update(lambda s: Counter(count=s.count + 1))
        return saved.count

    assert asyncio.run(main()) == 1


def test_a_lock_pickles_as_what_it_is_not_what_is_held(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock", timeout=3, lease=7)
    follows = DirectoryLock.for_file(tmp_path / "s.json")
    with lock:
        copy = pickle.loads(pickle.dumps(lock))
        assert (copy.path, copy.timeout, copy.lease) == (lock.path, 3, 7.0)
        copy.release()  # it took nothing: harmless
        assert lock.is_held
    assert repr(pickle.loads(pickle.dumps(follows))) == repr(follows)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_a_store_update_interrupted_while_waiting_leaves_nothing_behind(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter, timeout=-1)
    inside, done = threading.Event(), threading.Event()

    def slow(s: Counter) -> None:
        inside.set()
        done.wait(30)
        s.count += 1

    t = threading.Thread(target=store.update, args=(slow,))
    t.start()
    assert inside.wait(5)
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            store.update(_bump)  # waits forever for the other thread, until interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
    done.set()
    t.join(10)
    assert store.update(_bump).count == 2  # no mark, no turn, no level left behind
    assert not Path(f"{state_path}.lock").exists()
    assert other_process_can_take(f"{state_path}.lock", timeout=1)


def test_many_tasks_on_an_async_lock_leave_the_executor_free(tmp_path: Path) -> None:
    """Queued tasks wait in memory, not each on a thread of the loop's executor
    (which has only a few workers): the holder's own to_thread work and its
    release must never queue behind waiters."""
    lock = AsyncDirectoryLock(tmp_path / "x.lock", timeout=20)
    order: list[int] = []

    async def work(i: int) -> None:
        async with lock:
            await asyncio.to_thread(time.sleep, 0.002)
            order.append(i)

    async def main() -> float:
        started = time.monotonic()
        await asyncio.gather(*(work(i) for i in range(40)))
        return time.monotonic() - started

    assert asyncio.run(main()) < 15
    assert sorted(order) == list(range(40))
    assert not (tmp_path / "x.lock").exists()
    assert not [t for t in threading.enumerate() if t.name == "statestore-lock-wait"]
