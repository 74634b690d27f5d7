"""The asyncio face of the lock: AsyncDirectoryLock, and the turns tasks take at a path.

Tasks of one event loop wait for their turn at a path in memory, first come,
first served (:func:`gate`); the task whose turn it is tries the lock once on
the loop (a few system calls), and only if another process holds it does a
thread wait for the directory, polling an abandon flag, so queued tasks cost
no threads and a cancelled wait ends at once. Release runs on the loop. The
lock is held by a handle, not by a thread or a task.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .._errors import LockError, LockTimeout, WaitAbandoned
from .api import DEFAULT_LEASE, AcquiredLock, DirectoryLock
from .turns import wait_time

__all__ = ["AsyncAcquiredLock", "AsyncDirectoryLock", "consume", "turn_gate"]


def consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Gate:
    """First come, first served turns at one lock for the tasks of one event loop.

    Only the task whose turn it is has a thread waiting for the lock; the others
    wait here, where cancelling one is instant and costs no thread. (A thousand
    threads waiting for one lock would all wake at every release.)
    """

    def __init__(self) -> None:
        self._busy = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def enter(self, timeout: float) -> bool:
        """Wait for our turn; False if ``timeout`` seconds passed first."""
        if not self._busy and not self._waiters:
            self._busy = True
            return True
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait((turn,), timeout=None if timeout == math.inf else max(timeout, 0.0))
        except asyncio.CancelledError:
            if turn.done():
                self.leave()  # the turn came with the cancellation: pass it on
            else:
                self._waiters.remove(turn)
            raise
        if turn.done():
            return True
        self._waiters.remove(turn)
        return False

    def leave(self) -> None:
        """Give the turn to the oldest waiter (it stays busy), or free the gate."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._busy = False


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Gate]] = (
    weakref.WeakKeyDictionary()
)
_gates_lock = threading.Lock()  # several event loops may run in several threads


def turn_gate(key: str) -> _Gate:
    loop = asyncio.get_running_loop()
    with _gates_lock:
        return _gates.setdefault(loop, {}).setdefault(key, _Gate())


class AsyncDirectoryLock(contextlib.AsyncContextDecorator):
    """The asyncio twin of :class:`DirectoryLock`: the same lock directory, awaited.

    >>> lock = AsyncDirectoryLock("state.json.lock")  # doctest: +SKIP
    >>> async with lock:  # doctest: +SKIP
    ...     ...
    >>> async with await lock.acquire(timeout=5):  # doctest: +SKIP
    ...     ...

    Tasks of one event loop wait for their turn at a path in memory (first
    come, first served); only the task whose turn it is has a thread waiting
    for the directory, so queued tasks cost no threads, and a wait ends at once
    when its task is cancelled. Release runs on the event loop (a few system
    calls), so it never queues behind waiting threads. The lock is held by a
    handle, not by a thread or a task: any task may release what
    :meth:`acquire` returned. It is not reentrant: a task that holds it and
    acquires it again gets a :class:`LockError` (``errno.EDEADLK``) at once
    instead of waiting for itself until the timeout. Usable as a decorator of
    ``async def`` functions.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        #: The underlying lock (blocking: not for use on the event loop).
        self.sync = DirectoryLock(path, timeout=timeout, lease=lease)
        self._entered: list[tuple[object, AsyncAcquiredLock]] = []

    @classmethod
    def over(cls, lock: DirectoryLock) -> AsyncDirectoryLock:
        """The asyncio face of an existing :class:`DirectoryLock` (the same lock)."""
        self = cls.__new__(cls)
        self.sync = lock
        self._entered = []
        return self

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"

    @property
    def path(self) -> str:
        return self.sync.path

    @property
    def timeout(self) -> float:
        return self.sync.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self.sync.timeout = value

    @property
    def is_held(self) -> bool:
        """Whether a level taken through this object is still held."""
        return any(h.is_held for _, h in self._entered)

    async def acquire(
        self,
        timeout: float | None = None,
        *,
        blocking: bool = True,
        cancel_check: Callable[[], bool] | None = None,
    ) -> AsyncAcquiredLock:
        """Wait for the lock (see :meth:`DirectoryLock.acquire`); ``cancel_check`` is
        called from the worker thread. Returns the level, an async context manager."""
        lock = self.sync
        task = asyncio.current_task()
        at = lock._at()
        hold = at._st.hold
        if task is not None and hold is not None and hold.task is task and hold.count:
            raise LockError(
                lock.path,
                "this task already holds the lock, so waiting for it would never end (the "
                "asyncio lock is not reentrant); take it once for the whole block",
                errno=errno.EDEADLK,
            )
        wait = wait_time(timeout, lock.timeout, blocking)
        deadline = time.monotonic() + wait
        gate = turn_gate(at._key)
        if not await gate.enter(wait):
            raise LockTimeout(
                lock.path,
                f"could not acquire the lock within {wait:g} s: other tasks of this event "
                f"loop (pid {os.getpid()}) held it or were ahead in the queue",
                timeout=wait,
            )
        try:
            try:
                # One try on the loop first (a few system calls): an uncontended
                # acquire needs no thread at all.
                handle = lock._take(0.0, None, None, task)
            except LockTimeout:
                handle = await self._wait(lock, deadline, wait, task, cancel_check)
        except BaseException:
            gate.leave()
            raise
        level = AsyncAcquiredLock(self, handle, gate)
        self._entered.append((task, level))
        return level

    @staticmethod
    async def _wait(
        lock: DirectoryLock,
        deadline: float,
        wait: float,
        task: object,
        cancel_check: Callable[[], bool] | None,
    ) -> AcquiredLock:
        """Take the lock on a thread of its own (never one the event loop's executor needs)."""
        mutex = threading.Lock()
        stopped: list[bool] = []
        got: list[AcquiredLock] = []
        outcome: concurrent.futures.Future[AcquiredLock] = concurrent.futures.Future()

        def gave_up() -> bool:
            return bool(stopped) or (cancel_check is not None and cancel_check())

        def take() -> None:
            try:
                handle = lock._take(max(deadline - time.monotonic(), 0.0), gave_up, None, task)
                with mutex:
                    if stopped:  # the task was cancelled meanwhile: nobody will release it
                        handle.release()
                        raise WaitAbandoned(lock.path, timeout=wait)
                    got.append(handle)
            except BaseException as e:
                outcome.set_exception(e)
            else:
                outcome.set_result(handle)

        threading.Thread(target=take, name="statestore-lock-wait", daemon=True).start()
        waiting = asyncio.wrap_future(outcome)
        try:
            return await asyncio.shield(waiting)
        except asyncio.CancelledError:
            with mutex:
                stopped.append(True)
                late = list(got)
            waiting.add_done_callback(consume)
            for h in late:  # taken just as the task was cancelled
                h.release()
            raise

    async def release(self) -> None:
        """Release the newest level this task took (nothing if it holds none)."""
        level = self._pick(fallback=False)
        if level is not None:
            await level.release()

    def _pick(self, fallback: bool) -> AsyncAcquiredLock | None:
        task = asyncio.current_task()
        for t, level in reversed(self._entered):
            if t is task and level.is_held:
                return level
        if fallback:
            for _, level in reversed(self._entered):
                if level.is_held:
                    return level
        return None

    async def __aenter__(self) -> AsyncDirectoryLock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        level = self._pick(fallback=True)
        if level is not None:
            await level.release()


class AsyncAcquiredLock:
    """One level of an :class:`AsyncDirectoryLock`: ``async with await lock.acquire():``."""

    def __init__(self, lock: AsyncDirectoryLock, handle: AcquiredLock, gate: _Gate) -> None:
        self.lock = lock
        self.handle = handle
        self._gate: _Gate | None = gate

    @property
    def is_held(self) -> bool:
        return self.handle.is_held

    async def release(self) -> None:
        """Release this level (once; again does nothing)."""
        lock = self.lock
        lock._entered[:] = [(t, h) for t, h in lock._entered if h is not self]
        gate, self._gate = self._gate, None
        if gate is None:
            return
        try:
            self.handle.release()  # on the loop: a few system calls, never queued
        finally:
            gate.leave()

    async def __aenter__(self) -> AsyncDirectoryLock:
        return self.lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()
