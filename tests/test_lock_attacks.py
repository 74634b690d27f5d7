"""Attacks on the directory lock from outside: odd arguments, odd files, odd processes.

Each test pins one rule of ``src/statestore/_lock/``'s package docstring (or of
``docs/locking.md``) against an input a hostile or unusual world produces. Attacks
that broke the lock come with the fix; the rest pin behaviour that held.
"""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import workers

from statestore import DirectoryLock
from statestore._lock import MAX_LEASE, create, turns
from statestore._lock.record import LockOwner, new_owner, read_owner_at

SPAWN = mp.get_context("spawn")

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ odd leases


@pytest.mark.parametrize("lease", [math.nan, math.inf, 10**13, 10**400, MAX_LEASE * 2, -1.0, 0])
def test_a_lease_no_owner_record_can_carry_is_refused(tmp_path: Path, lease: float) -> None:
    """A NaN, infinite or huge lease used to be written into the owner record, which
    every other process then read as garbage and broke after the creation grace:
    two holders. It is refused when the lock is built."""
    with pytest.raises(ValueError, match="lease"):
        DirectoryLock(tmp_path / "l.lock", lease=lease)
    with pytest.raises(ValueError, match="lease"):
        DirectoryLock.for_file(tmp_path / "s.json", lease=lease)
    assert not (tmp_path / "l.lock").exists()


def test_the_longest_lease_writes_a_record_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "l.lock"
    with DirectoryLock(path, lease=MAX_LEASE):
        owner = LockOwner.from_json(read_owner_at(str(path)))
        assert owner.lease == MAX_LEASE
        # Another process sees a live holder, not garbage to break.
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from statestore import DirectoryLock, LockTimeout\n"
                "try:\n"
                f"    DirectoryLock({str(path)!r}).acquire(timeout=0)\n"
                "except LockTimeout: sys.exit(0)\n"
                "sys.exit(1)",
            ],
            check=False,
        )
        assert r.returncode == 0


# ---------------------------------------------------------------- odd timeouts


@pytest.mark.parametrize("timeout", [10**400, -(10**400)])
def test_a_timeout_too_large_for_a_float_waits_forever(tmp_path: Path, timeout: int) -> None:
    """``timeout=10**400`` used to raise OverflowError: it waits forever, like inf."""
    path = tmp_path / "l.lock"
    DirectoryLock(path, timeout=timeout)  # the constructor accepts it too
    holder = DirectoryLock(path).acquire()
    got: list[object] = []

    def wait() -> None:
        try:
            DirectoryLock(path).acquire(timeout=timeout).release()
            got.append("acquired")
        except Exception as e:  # pragma: no cover - the failure being tested
            got.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    holder.release()
    t.join(10)
    assert got == ["acquired"]


def test_a_negative_zero_timeout_tries_once_and_says_zero(tmp_path: Path) -> None:
    path = tmp_path / "l.lock"
    with DirectoryLock(path):
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from statestore import DirectoryLock, LockTimeout\n"
                "try:\n"
                f"    DirectoryLock({str(path)!r}).acquire(timeout=-0.0)\n"
                "except LockTimeout as e: print(e)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    assert "within 0 s" in r.stdout, r.stdout
    assert "-0" not in r.stdout.split("within")[1][:4]


# ------------------------------------------- many breakers of one stale lock


def _plant_stale(lock_dir: Path, kind: str) -> None:
    lock_dir.mkdir()
    record = lock_dir / "owner.json"
    if kind == "garbage":
        record.write_text("{not json")
    elif kind == "expired":
        doc = json.loads(new_owner(30.0).to_json())
        doc.update(pid=1, start_time=None, expires_at=time.time() - 100)
        record.write_text(json.dumps(doc))
    old = time.time() - 10
    for p in (record, lock_dir):
        if p.exists():
            os.utime(p, (old, old))


@pytest.mark.parametrize("kind", ["empty", "garbage", "expired"])
def test_many_processes_breaking_one_stale_lock_never_hold_it_twice(
    tmp_path: Path, kind: str
) -> None:
    """Held: a record-less, a garbage and an expired-lease instance (test_lock.py
    covers a dead pid), broken by six processes at once: an occupied marker that
    only the holder creates (O_EXCL) never finds another holder inside."""
    log = tmp_path / "overlaps.log"
    for round_ in range(2):
        lock_dir = tmp_path / f"x{round_}.lock"
        _plant_stale(lock_dir, kind)
        start = tmp_path / f"start{round_}"
        procs = [
            SPAWN.Process(
                target=workers.critical_section,
                args=(str(lock_dir), str(start), str(tmp_path / f"m{round_}"), str(log), 5),
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
        assert not lock_dir.exists()
    assert not log.exists(), log.read_text()


# ------------------------------------------- KeyboardInterrupt at any line


def _line_of(func: object, text: str, before: int = 0) -> int:
    lines, first = inspect.getsourcelines(func)  # type: ignore[arg-type]
    for i, line in enumerate(lines):
        if line.strip() == text:
            return first + i - before
    raise AssertionError(f"{text!r} not found")


def _interrupt_at(code: object, *lines: int) -> Callable[..., Any]:
    """A tracer that raises KeyboardInterrupt at the first of ``lines`` run in ``code``."""

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno in lines:
                raise KeyboardInterrupt
            return local

        return local

    return tracer


def _other_thread_acquires(path: Path) -> list[object]:
    got: list[object] = []

    def other() -> None:
        try:
            DirectoryLock(path).acquire(timeout=0.5).release()
            got.append("acquired")
        except Exception as e:
            got.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    return got


def test_an_interrupt_between_taking_the_turn_and_the_directory_leaks_nothing(
    tmp_path: Path,
) -> None:
    """A KeyboardInterrupt after this thread was given the path's turn but before the
    try that gives it back used to leave the turn with nobody: every later acquire
    of the path in the process waited out its timeout."""
    path = tmp_path / "l.lock"
    turn = turns.take_turn
    # The first line run after the turn is ours: the one before the call (a 'try:'
    # there once left a gap) or the call itself.
    line = _line_of(
        turn,
        "held = acquire_dir(path, key, lease, deadline, wait, st.queue, gave_up)",
    )
    lock = DirectoryLock(path)  # kept: the path's state lives as long as it
    sys.settrace(_interrupt_at(turn.__code__, line - 1, line))
    try:
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        sys.settrace(None)
    assert _other_thread_acquires(path) == ["acquired"]
    assert not lock.is_held


@pytest.mark.parametrize(
    "where",
    [
        "dirfd = os.open(path, DIR_FLAGS)",  # made, not yet opened
        "fd_stat = os.fstat(dirfd)",  # opened, no record
        "os.write(fd, owner.to_json())",  # the record created, empty
        "ino = (fd_stat.st_dev, fd_stat.st_ino)",  # the record written
        "state = settle(path, dirfd, ino, patience=2 * CLAIM_GRACE)",  # before the settle
    ],
)
def test_an_interrupt_between_mkdir_and_the_owner_record_leaves_no_directory(
    tmp_path: Path, where: str
) -> None:
    path = tmp_path / "l.lock"
    publish = create._publish
    line = _line_of(publish, where)
    lock = DirectoryLock(path)
    fds = len(os.listdir("/proc/self/fd"))
    sys.settrace(_interrupt_at(publish.__code__, line))
    try:
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        sys.settrace(None)
    assert not path.exists()
    assert len(os.listdir("/proc/self/fd")) == fds  # the directory's descriptor closed
    assert _other_thread_acquires(path) == ["acquired"]
