"""AsyncStateStore: the asyncio face of StateStore.

Every blocking step (file I/O, fsync, waiting for the lock) runs in a worker
thread, so the event loop keeps running. The lock is owned by a *thread*
(:class:`DirectoryLock` is reentrant and released per thread, and nesting is
detected per thread), so each locked operation runs from acquire to release on
one dedicated thread; code that must run on the event loop (an ``async def``
function given to :meth:`AsyncStateStore.update`, the body of ``async with
store.transaction()``) gets the loaded state handed over from that thread, and
the thread commits or discards once it is told how the code ended.

See ``docs/async.md`` for the threading model and what cancellation does.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import errno
import inspect
import math
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, TypeVar, cast

from ._errors import LockError, LockTimeout, NestedTransactionError
from ._lock import DEFAULT_LEASE, AcquiredLock, DirectoryLock, WaitAbandoned, wait_time
from ._migrate import MigrationReport, Migrations
from ._schema import Draft
from ._store import ModelT, StateStore
from .backends import Storage

__all__ = ["AsyncAcquiredLock", "AsyncDirectoryLock", "AsyncStateStore"]

T = TypeVar("T")

#: The documents whose lock the current task holds through a transaction (or an
#: ``async def`` update). The sync nesting check is per thread and cannot see a
#: task: without this, a nested call would wait for the outer lock until timeout.
_inside: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "statestore_async_inside", default=frozenset()
)

#: How often a thread waiting for the event loop's verdict checks the loop still runs.
_LOOP_CHECK: Final = 0.5


class _Abandon(Exception):
    """Raised inside the worker thread to leave the locked block without saving."""


class _Verdict:
    """What the event loop decided: commit ``value`` or abandon."""

    __slots__ = ("commit", "value")

    def __init__(self, commit: bool, value: object = None) -> None:
        self.commit = commit
        self.value = value


_ABANDON: Final = _Verdict(False)


class _LockedCall(Generic[T]):
    """One locked operation, run start to finish on its own thread.

    The thread calls ``op``; ``op`` may call :meth:`hand_over` once it holds the
    lock, to give the event loop a value (the loaded state) and wait for a verdict.
    The outcome (``op``'s result, or its exception, or None when abandoned) is
    delivered to the ``done`` future on the loop.

    The point of no return is the verdict (or, for work done wholly in the thread,
    the end of that work): before it, abandoning writes nothing; after it, the
    thread finishes the commit and a cancelled caller waits for that.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._name = name
        self.handed: asyncio.Future[Any] = loop.create_future()
        self.done: asyncio.Future[T | None] = loop.create_future()
        self._verdict: concurrent.futures.Future[_Verdict] = concurrent.futures.Future()
        # Set once the thread is past the lock wait: abandoning from then on is quick
        # (a release), so a cancelled caller waits for it and leaves the lock free.
        self.holding = threading.Event()

    # ------------------------------------------------------------ thread side

    def start(
        self, op: Callable[[_LockedCall[T]], T], lock: DirectoryLock | None, timeout: float
    ) -> None:
        def run() -> None:
            try:
                if lock is None:
                    # The storage locks inside ``op``, out of sight: count the wait as
                    # held, so that a cancelled caller waits for the thread to finish.
                    self.holding.set()
                    result = op(self)
                else:
                    # Take the store's (reentrant) lock first, so that a caller who
                    # gives up while we wait stops the wait (WaitAbandoned), and one
                    # who gave up just as we got the lock is noticed before any read.
                    held = lock._acquire(timeout, self.gave_up)
                    try:
                        self.holding.set()
                        self.check()
                        result = op(self)
                    finally:
                        held.release()
            except (_Abandon, WaitAbandoned):
                self._post(self.done, None)
            except BaseException as e:  # delivered to the awaiting task
                self._post(self.done, None, e)
            else:
                self._post(self.done, result)

        threading.Thread(target=run, name=self._name).start()

    def gave_up(self) -> bool:
        """Whether the caller abandoned this call (thread side)."""
        return self._verdict.done() and not self._verdict.result().commit

    def check(self) -> None:
        """Raise :class:`_Abandon` if the caller gave up (thread side)."""
        self.holding.set()
        if self.gave_up():
            raise _Abandon

    def hand_over(self, value: object) -> object:
        """Give ``value`` to the event loop; return the value to commit (thread side)."""
        self.check()
        if not self._post(self.handed, value):
            raise _Abandon  # the event loop is gone
        while True:
            try:
                verdict = self._verdict.result(timeout=_LOOP_CHECK)
            except concurrent.futures.TimeoutError:
                # A loop closed without finishing the task would never answer.
                if self._loop.is_closed():
                    raise _Abandon from None
                continue
            if not verdict.commit:
                raise _Abandon
            return verdict.value

    def _post(
        self, future: asyncio.Future[Any], value: object, error: BaseException | None = None
    ) -> bool:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed
            return False
        return True

    # ------------------------------------------------------------- loop side

    async def wait_handed(self) -> tuple[bool, object]:
        """Wait for the hand-over, or for the end: ``(True, value)`` or ``(False, result)``.

        Cancelled while the thread still waits for the lock, this returns at once
        (the thread stops waiting within ``GIVE_UP_POLL``, or lets the lock go as
        soon as it gets it, without reading or writing); cancelled later, it
        first waits for the thread to let go.
        """
        try:
            await asyncio.wait((self.handed, self.done), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.abandon()
            if self.holding.is_set():
                try:
                    # The cancellation is what the caller gets, not an error of the thread.
                    with contextlib.suppress(Exception):
                        await self.finish()
                finally:
                    if self.handed.done() and inspect.iscoroutine(self.handed.result()):
                        self.handed.result().close()  # handed over, never to be awaited
            else:
                # Nobody will read the outcome: mark it read so it is not logged.
                self.done.add_done_callback(_consume)
            raise
        if self.handed.done():
            return True, self.handed.result()
        return False, self.done.result()

    def commit(self, value: object) -> None:
        self._verdict.set_result(_Verdict(True, value))

    def abandon(self) -> None:
        if not self._verdict.done():
            self._verdict.set_result(_ABANDON)

    async def finish(self) -> T | None:
        """The thread's outcome, waited for even through cancellation.

        Cancellation is re-raised once the thread has finished: past the point of
        no return the commit completes, and the lock is free when the caller sees
        the CancelledError.
        """
        cancelled: asyncio.CancelledError | None = None
        while not self.done.done():
            try:
                await asyncio.wait((self.done,))
            except asyncio.CancelledError as e:
                cancelled = e
                self.abandon()  # a no-op past the point of no return
        if cancelled is not None:
            self.done.add_done_callback(_consume)
            raise cancelled
        return self.done.result()


def _consume(future: asyncio.Future[Any]) -> None:
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


def _gate(key: str) -> _Gate:
    loop = asyncio.get_running_loop()
    with _gates_lock:
        return _gates.setdefault(loop, {}).setdefault(key, _Gate())


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with ``async def __call__``
    )


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()  # a coroutine that will never run: no "never awaited" warning


class AsyncStateStore(Generic[ModelT]):
    """The asyncio face of :class:`StateStore`: the same file, lock and errors.

    >>> store = AsyncStateStore(Counter, "state.json", default=Counter)  # doctest: +SKIP
    >>> await store.update(lambda s: Counter(count=s.count + 1))  # doctest: +SKIP
    Counter(count=1)
    >>> async with store.transaction() as state:  # doctest: +SKIP
    ...     state.count += 1

    File I/O, fsync and lock waits run in worker threads; each locked operation
    runs on one thread from acquire to release. ``fn`` and transaction blocks may
    await; the lock is held meanwhile.
    """

    def __init__(
        self,
        model: type[ModelT],
        path: str | os.PathLike[str] | Storage,
        *,
        default: ModelT | Callable[[], ModelT] | None = None,
        lock: DirectoryLock | str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        durable: bool | None = None,
        version: int = 1,
        migrations: Migrations | None = None,
        schema_ref: str | None = None,
        read_attempts: int = 3,
        read_delay: float = 0.05,
        max_size: int | None = None,
        missing_wait: float | None = None,
    ) -> None:
        self._store: StateStore[ModelT] = StateStore(
            model,
            path,
            default=default,
            lock=lock,
            timeout=timeout,
            durable=durable,
            version=version,
            migrations=migrations,
            schema_ref=schema_ref,
            read_attempts=read_attempts,
            read_delay=read_delay,
            max_size=max_size,
            missing_wait=missing_wait,
        )

    @classmethod
    def from_store(cls, store: StateStore[ModelT]) -> AsyncStateStore[ModelT]:
        """Wrap an existing :class:`StateStore` (they share everything)."""
        if not isinstance(store, StateStore):
            raise TypeError(f"from_store() needs a StateStore, not {type(store).__name__}")
        self = cls.__new__(cls)
        self._store = store
        return self

    def __repr__(self) -> str:
        return f"AsyncStateStore({self.model.__name__}, {self.location!r})"

    # -------------------------------------------------------------- synchronous

    @property
    def sync(self) -> StateStore[ModelT]:
        """The underlying :class:`StateStore` (blocking: not for use on the event loop)."""
        return self._store

    @property
    def model(self) -> type[ModelT]:
        return self._store.model

    @property
    def path(self) -> Path:
        """The state file (file stores only): see :attr:`StateStore.path`."""
        return self._store.path

    @property
    def location(self) -> str:
        """Where the document lives, as messages name it (a path, or a URL)."""
        return self._store.storage.location

    @property
    def version(self) -> int:
        """The schema version this store reads and writes."""
        return self._store.version

    def json_schema(
        self, draft: Draft = "2020-12", *, schema_id: str | None = None
    ) -> dict[str, Any]:
        """The JSON Schema of the document as stored: see :meth:`StateStore.json_schema`."""
        return self._store.json_schema(draft, schema_id=schema_id)

    # ---------------------------------------------------------------- lock-free

    async def exists(self) -> bool:
        """Whether the state file exists (the default does not count)."""
        return await asyncio.to_thread(self._store.exists)

    async def load(self) -> ModelT:
        """Read, migrate in memory and validate the state, without taking the lock."""
        return await asyncio.to_thread(self._store.load)

    # ------------------------------------------------------------------ locked

    async def save(self, state: ModelT) -> None:
        """Validate ``state`` and write it, under the lock (see :meth:`StateStore.save`)."""
        store = self._store
        self._not_nested("save()")

        def op(call: _LockedCall[None]) -> None:
            store.save(state)

        call: _LockedCall[None] = await self._start("save", op)
        await self._run_in_thread(call)

    async def update(
        self, fn: Callable[[ModelT], ModelT | Awaitable[ModelT | None] | None]
    ) -> ModelT:
        """Load, apply ``fn``, validate and save, all under the lock; return what was saved.

        ``fn`` returns a new model, or None after changing the one it was given. A
        plain function runs in the worker thread; an ``async def`` function runs on
        the event loop, in this task, while the thread holds the lock. If ``fn``
        raises (or this task is cancelled before ``fn`` returns), nothing is written.
        """
        store = self._store
        self._not_nested("update()")
        on_loop = _is_async(fn)
        name = getattr(fn, "__qualname__", "fn")

        def op(call: _LockedCall[ModelT]) -> ModelT:
            def bridge(state: ModelT) -> ModelT | None:
                if on_loop:
                    return call.hand_over(state)  # type: ignore[return-value]  # update() checks it
                call.check()
                result = fn(state)
                if inspect.isawaitable(result):  # a plain function that returned a coroutine
                    try:
                        return call.hand_over(result)  # type: ignore[return-value]
                    except BaseException:
                        _close(result)
                        raise
                call.check()  # the caller gave up while fn ran: do not commit
                return result

            bridge.__qualname__ = name  # update() names fn when it returns a wrong type
            return store.update(bridge)

        call: _LockedCall[ModelT] = await self._start("update", op)
        handed, value = await call.wait_handed()
        if not handed:
            return cast(ModelT, value)  # fn ran wholly in the thread
        token = _inside.set(_inside.get() | self._keys)
        try:
            # The state for an ``async def`` fn; the awaitable a plain fn returned.
            result = fn(cast(ModelT, value)) if on_loop else value
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            call.abandon()
            await call.finish()
            raise
        finally:
            _inside.reset(token)
        call.commit(result)
        return cast(ModelT, await call.finish())

    def transaction(self) -> AbstractAsyncContextManager[ModelT]:
        """``async with store.transaction() as state:`` load under the lock; saved on normal exit.

        An exception inside the block (``asyncio.CancelledError`` too) discards
        the changes and writes nothing. The lock is held while the block runs.
        """
        return _Transaction(self)

    async def migrate(self, *, dry_run: bool = False) -> MigrationReport:
        """Upgrade the file to this store's version, under the lock, keeping a backup."""
        store = self._store
        self._not_nested("migrate()")

        def op(call: _LockedCall[MigrationReport]) -> MigrationReport:
            return store.migrate(dry_run=dry_run)

        call: _LockedCall[MigrationReport] = await self._start("migrate", op)
        report = await self._run_in_thread(call)
        assert report is not None
        return report

    # ---------------------------------------------------------------- internals

    def _not_nested(self, what: str) -> None:
        if self._keys & _inside.get():
            raise NestedTransactionError(
                self.location,
                f"{what} called inside a transaction on the same file or lock, in the "
                "same task: the outer transaction holds the lock this call would wait "
                "for, and its commit would overwrite the result. Change the state "
                "yielded by the transaction instead",
            )

    @property
    def _keys(self) -> frozenset[str]:
        """What a locked operation of this store takes: its document, and its lock."""
        lock = self._store.lock
        return frozenset((self._store._key, lock._key)) if lock else frozenset((self._store._key,))

    async def _start(self, what: str, op: Callable[[_LockedCall[T]], T]) -> _LockedCall[T]:
        """Wait for this task's turn at the lock, then start ``op`` on its own thread."""
        store = self._store
        lock = store.lock
        loop = asyncio.get_running_loop()
        wait = wait_time(None, store.timeout)  # negative or inf: forever, as for the lock
        deadline = loop.time() + wait
        gate = _gate(lock._key if lock else store._key)
        if not await gate.enter(wait):
            raise LockTimeout(
                lock.path if lock else self.location,
                f"could not acquire the lock within {store.timeout:g} s: other tasks of "
                f"this event loop (pid {os.getpid()}) held it or were ahead in the queue",
                timeout=store.timeout,
            )
        try:
            call: _LockedCall[T] = _LockedCall(
                loop, f"statestore {what} {os.path.basename(self.location)}"
            )
            # The turn passes on once the thread has let go of the lock.
            call.done.add_done_callback(lambda _: gate.leave())
            call.start(op, lock, max(deadline - loop.time(), 0.0))
        except BaseException:
            gate.leave()
            raise
        return call

    @staticmethod
    async def _run_in_thread(call: _LockedCall[T]) -> T | None:
        """Await an operation that never hands over: cancellable until the lock is held."""
        handed, value = await call.wait_handed()
        assert not handed
        return value  # type: ignore[return-value]


class _Transaction(AbstractAsyncContextManager[ModelT]):
    """The context manager :meth:`AsyncStateStore.transaction` returns (single use)."""

    def __init__(self, store: AsyncStateStore[ModelT]) -> None:
        self._store = store
        self._call: _LockedCall[ModelT] | None = None
        self._token: contextvars.Token[frozenset[str]] | None = None

    async def __aenter__(self) -> ModelT:
        if self._call is not None:
            raise RuntimeError("a transaction() can be entered only once; call transaction() again")
        store = self._store
        store._not_nested("transaction()")
        sync = store.sync

        def op(call: _LockedCall[ModelT]) -> ModelT:
            def bridge(state: ModelT) -> None:
                call.hand_over(state)  # the block changes ``state`` in place

            bridge.__qualname__ = "transaction()"
            return sync.update(bridge)

        self._call = call = await store._start("transaction", op)
        handed, value = await call.wait_handed()
        assert handed, "the transaction ended before the state was handed over"
        self._token = _inside.set(_inside.get() | store._keys)
        return value  # type: ignore[return-value]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        call = self._call
        assert call is not None and self._token is not None, "__aexit__ without __aenter__"
        _inside.reset(self._token)
        if exc is None:
            call.commit(None)
            await call.finish()
            return
        call.abandon()
        try:
            await call.finish()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # letting go of the lock failed
            e.__context__ = exc
            raise


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
        gate = _gate(at._key)
        if not await gate.enter(wait):
            raise LockTimeout(
                lock.path,
                f"could not acquire the lock within {wait:g} s: other tasks of this event "
                f"loop (pid {os.getpid()}) held it or were ahead in the queue",
                timeout=wait,
            )
        try:
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
            waiting.add_done_callback(_consume)
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
