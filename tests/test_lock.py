"""DirectoryLock: exclusion, reentrancy, stale-lock recovery, leases, fork safety."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import workers
from conftest import Counter

from statestore import (
    DirectoryLock,
    LockCompromisedError,
    LockError,
    LockTimeout,
    NestedTransactionError,
    StateStore,
)
from statestore._lock import observe
from statestore._lock.liveness import identity
from statestore._lock.record import new_owner

pytestmark = pytest.mark.timeout(120)

SPAWN = mp.get_context("spawn")


def write_record(lock_dir: Path, **changes: object) -> dict[str, object]:
    """Plant an owner record as another process would have written it."""
    lock_dir.mkdir(exist_ok=True)
    record = json.loads(new_owner(30.0).to_json())
    record.update(changes)
    (lock_dir / "owner.json").write_text(json.dumps(record))
    return record


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_release_and_owner_record(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    assert lock.owner() is None
    with lock:
        assert lock.is_held
        owner = lock.owner()
        assert owner is not None
        me = identity()
        assert (owner.pid, owner.host, owner.boot_id, owner.start_time) == (
            os.getpid(),
            socket.gethostname(),
            me.boot_id,
            me.start_time,
        )
        assert len(owner.token) == 32
        assert owner.expires_at - owner.acquired_at == pytest.approx(30.0)
        assert 0 <= owner.age < 5
    assert not lock.is_held
    assert os.listdir(tmp_path) == []  # the directory exists only while held


def test_reentrant_in_a_thread_and_shared_between_objects(tmp_path: Path) -> None:
    a = DirectoryLock(tmp_path / "x.lock")
    b = DirectoryLock(str(tmp_path / "x.lock"))
    with a, a, b:
        assert a.is_held and b.is_held
    assert os.listdir(tmp_path) == []
    a.release()  # holding nothing: harmless, as with filelock (tests/test_lock_threads.py)
    assert not a.is_held and os.listdir(tmp_path) == []


def test_threads_serialise_without_two_inside(tmp_path: Path) -> None:
    inside = 0
    most = 0
    guard = threading.Lock()
    errors: list[BaseException] = []

    def run() -> None:
        nonlocal inside, most
        lock = DirectoryLock(tmp_path / "x.lock")
        try:
            for _ in range(30):
                with lock:
                    with guard:
                        inside += 1
                        most = max(most, inside)
                    time.sleep(0.0005)
                    with guard:
                        inside -= 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert most == 1


def test_timeout_names_the_live_holder(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    holder = SPAWN.Process(
        target=workers.hold_lock, args=(str(tmp_path / "x.lock"), str(ready), 30)
    )
    holder.start()
    try:
        workers.wait_for(str(ready))
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            DirectoryLock(tmp_path / "x.lock").acquire(timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 2
        e = info.value
        assert e.holder is not None and e.holder["pid"] == holder.pid
        assert e.alive is True
        assert f"pid {holder.pid}" in str(e) and "looks alive" in str(e)
    finally:
        holder.kill()
        holder.join()


def test_holder_killed_with_sigkill_is_replaced_within_a_second(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    holder = SPAWN.Process(
        target=workers.hold_lock, args=(str(tmp_path / "x.lock"), str(ready), 60)
    )
    holder.start()
    workers.wait_for(str(ready))
    os.kill(holder.pid, signal.SIGKILL)
    time.sleep(0.05)  # not reaped yet: a zombie holds nothing
    started = time.monotonic()
    with DirectoryLock(tmp_path / "x.lock", timeout=10):
        took = time.monotonic() - started
    holder.join()
    assert took < 1.0


def test_stale_lock_breaking_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid = dead_pid()
    write_record(tmp_path / "x.lock", pid=pid)
    with caplog.at_level(logging.WARNING, logger="statestore"), DirectoryLock(tmp_path / "x.lock"):
        pass
    assert any(
        f"pid {pid}" in r.getMessage() and "no longer running" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


def test_reused_pid_with_another_start_time_is_dead(tmp_path: Path) -> None:
    me = identity()
    assert me.start_time is not None
    write_record(tmp_path / "x.lock", pid=os.getppid(), start_time=me.start_time + 12345)
    started = time.monotonic()
    with DirectoryLock(tmp_path / "x.lock", timeout=5):
        pass
    assert time.monotonic() - started < 1


def test_another_boot_waits_for_the_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same host name, other boot id: a cloned machine or a container, not proof of death."""
    monkeypatch.setattr(observe, "CLOCK_SKEW", 0.3)
    pid = dead_pid()
    now = time.time()
    write_record(
        tmp_path / "x.lock",
        pid=pid,
        boot_id="00000000-dead-beef-0000-000000000000",
        acquired_at=now,
        expires_at=now + 1.0,
    )
    with pytest.raises(LockTimeout) as info:
        DirectoryLock(tmp_path / "x.lock").acquire(timeout=0.3)
    assert info.value.alive is None
    with DirectoryLock(tmp_path / "x.lock", timeout=5):
        assert time.time() >= now + 1.0 + 0.3  # the lease and the skew allowance ran out


def test_live_pid_with_matching_start_time_is_respected(tmp_path: Path) -> None:
    parent = os.getppid()
    from statestore._lock.liveness import _proc_stat

    stat = _proc_stat(parent)
    assert stat is not None
    write_record(tmp_path / "x.lock", pid=parent, start_time=stat[1])
    with pytest.raises(LockTimeout) as info:
        DirectoryLock(tmp_path / "x.lock").acquire(timeout=0.3)
    assert info.value.alive is True


def test_other_host_is_broken_only_after_its_lease_and_skew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observe, "CLOCK_SKEW", 0.5)
    now = time.time()
    write_record(
        tmp_path / "x.lock", host="elsewhere.example", pid=1, acquired_at=now, expires_at=now + 1.0
    )
    with pytest.raises(LockTimeout) as info:
        DirectoryLock(tmp_path / "x.lock").acquire(timeout=0.5)
    assert info.value.alive is None
    assert "unknown liveness" in str(info.value)
    started = time.monotonic()
    with DirectoryLock(tmp_path / "x.lock", timeout=5):
        waited = time.monotonic() - started
    # The lease ends 1.0 s after `now`, plus 0.5 s of allowed clock skew; not before.
    assert time.time() >= now + 1.5
    assert waited < 2.5


def test_missing_owner_record_is_a_lock_being_created(tmp_path: Path) -> None:
    (tmp_path / "x.lock").mkdir()
    with pytest.raises(LockTimeout):
        DirectoryLock(tmp_path / "x.lock").acquire(timeout=0.3)
    old = time.time() - 60
    os.utime(tmp_path / "x.lock", (old, old))
    with DirectoryLock(tmp_path / "x.lock", timeout=2):
        pass


@pytest.mark.parametrize(
    "garbage", [b"", b"{", b"[]", b'{"format": "other"}', b"\xff\xfe"], ids=repr
)
def test_garbage_owner_record(tmp_path: Path, garbage: bytes) -> None:
    lock_dir = tmp_path / "x.lock"
    lock_dir.mkdir()
    (lock_dir / "owner.json").write_bytes(garbage)
    with pytest.raises(LockTimeout):  # fresh garbage: maybe being written, never two in
        DirectoryLock(lock_dir).acquire(timeout=0.3)
    old = time.time() - 60
    os.utime(lock_dir / "owner.json", (old, old))
    with DirectoryLock(lock_dir, timeout=2):  # old garbage: never blocks forever
        pass


def test_a_lock_path_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.lock").write_text("not mine")
    with pytest.raises(LockError, match="not a directory"):
        DirectoryLock(tmp_path / "x.lock").acquire(timeout=0.5)


def test_many_processes_race_to_break_one_stale_lock(tmp_path: Path) -> None:
    """Exactly one holder at a time, checked by a marker only the holder may create."""
    log = tmp_path / "overlaps.log"
    for round_ in range(6):
        lock_dir = tmp_path / f"x{round_}.lock"
        write_record(lock_dir, pid=dead_pid())
        start = tmp_path / f"start{round_}"
        procs = [
            SPAWN.Process(
                target=workers.critical_section,
                args=(str(lock_dir), str(start), str(tmp_path / f"marker{round_}"), str(log), 5),
            )
            for _ in range(6)
        ]
        for p in procs:
            p.start()
        time.sleep(0.3)
        start.touch()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
    assert not log.exists(), log.read_text()


def test_suspended_holder_loses_the_lock_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    ready, result = tmp_path / "ready", tmp_path / "result"
    child = SPAWN.Process(
        target=workers.transact_slowly, args=(str(path), 1.0, str(ready), str(result))
    )
    child.start()
    try:
        workers.wait_for(str(ready), 30)
        os.kill(child.pid, signal.SIGSTOP)
        store = StateStore(
            Counter, path, default=Counter, lock=DirectoryLock(str(path) + ".lock", lease=1.0)
        )
        started = time.monotonic()
        store.update(lambda s: Counter(count=41, note="from the next holder"))
        assert time.monotonic() - started < 5
        Path(str(ready) + ".go").touch()
    finally:
        os.kill(child.pid, signal.SIGCONT)
    child.join(30)
    assert result.read_text().startswith("LockCompromisedError")
    assert store.load() == Counter(count=41, note="from the next holder")
    assert sorted(os.listdir(tmp_path)) == ["ready", "ready.go", "result", "state.json"]


def test_a_broken_lock_is_noticed_before_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    before = path.read_bytes()
    with pytest.raises(LockCompromisedError, match="broken by another process"):
        with store.transaction() as state:
            state.count = 2
            DirectoryLock(str(path) + ".lock").break_lock(force=True)
    assert path.read_bytes() == before
    assert not (tmp_path / "state.json.lock").exists()


def test_break_lock_refuses_a_live_lock_without_force(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    with lock, pytest.raises(LockError, match="live"):
        DirectoryLock(tmp_path / "x.lock").break_lock()
    assert DirectoryLock(tmp_path / "x.lock").break_lock() is None


def test_lease_is_refreshed_while_held(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock", lease=0.6)
    with lock:
        first = lock.owner()
        time.sleep(1.0)
        later = lock.owner()
        assert first is not None and later is not None
        assert later.token == first.token
        assert later.expires_at > first.expires_at
        lock.verify()  # still ours after more than one lease


def test_child_of_fork_does_not_hold_the_parents_lock(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    with lock:
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                if lock.is_held:
                    code = 3
                else:
                    try:
                        lock.acquire(timeout=0.2)
                        code = 4  # it must not get the lock its parent holds
                    except LockTimeout:
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lock.is_held
    assert not (tmp_path / "x.lock").exists()


def test_temp_files_of_dead_writers_are_swept(tmp_path: Path) -> None:
    from statestore._atomic import _host_tag

    path = tmp_path / "state.json"
    dead = tmp_path / f".state.json.{_host_tag()}-{dead_pid()}-abcdef.tmp"
    alive = tmp_path / f".state.json.{_host_tag()}-{os.getpid()}-abcdef.tmp"
    foreign = tmp_path / ".state.json.00000000-123-abcdef.tmp"
    for p in (dead, alive, foreign):
        p.write_text("partial")
    StateStore(Counter, path).save(Counter())
    assert not dead.exists()
    assert alive.exists() and foreign.exists()


def test_sixteen_processes_share_the_lock_without_timeouts(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    start = tmp_path / "start"
    procs = [
        SPAWN.Process(target=workers.increment, args=(str(path), 100, str(start)))
        for _ in range(16)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.touch()
    for p in procs:
        p.join(150)
    assert [p.exitcode for p in procs] == [0] * 16  # a LockTimeout would fail a worker
    assert StateStore(Counter, path).load().count == 1600


def test_nested_update_in_a_transaction_is_refused(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    with store.transaction(), pytest.raises(NestedTransactionError):
        store.update(lambda s: None)


def _tag(pid: int, start_time: int | None) -> str:
    me = identity()
    return json.dumps([me.host, me.boot_id, pid, start_time, me.pid_ns])


def test_a_claim_left_by_a_dead_breaker_is_taken_over_at_once(tmp_path: Path) -> None:
    lock_dir = tmp_path / "x.lock"
    write_record(lock_dir, pid=dead_pid())
    os.symlink(_tag(dead_pid(), None), lock_dir / "claim")
    started = time.monotonic()
    with DirectoryLock(lock_dir, timeout=5):
        took = time.monotonic() - started
    assert took < 1.0


def test_a_claim_of_a_live_process_is_never_taken_over(tmp_path: Path) -> None:
    """A breaker that merely stalls keeps its claim, however old (spec/ CLAIM_TAKEOVER)."""
    from statestore._lock.liveness import _proc_stat

    lock_dir = tmp_path / "x.lock"
    write_record(lock_dir, pid=dead_pid())
    parent = os.getppid()
    stat = _proc_stat(parent)
    assert stat is not None
    os.symlink(_tag(parent, stat[1]), lock_dir / "claim")
    old = time.time() - 3600
    os.utime(lock_dir / "claim", (old, old), follow_symlinks=False)
    with pytest.raises(LockTimeout):
        DirectoryLock(lock_dir).acquire(timeout=0.5)
    assert (lock_dir / "claim").is_symlink()


def test_commit_waits_out_a_claim_that_is_undone(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(Counter, path, default=Counter)
    from statestore._lock.liveness import _proc_stat

    stat = _proc_stat(os.getpid())
    assert stat is not None
    with store.transaction() as state:
        state.count = 5
        claim = Path(str(path) + ".lock") / "claim"
        os.symlink(_tag(os.getpid(), stat[1]), claim)  # a live breaker deciding
        threading.Timer(0.2, claim.unlink).start()  # ... that backs off
    assert store.load().count == 5
