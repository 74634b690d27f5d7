"""AsyncStateStore: the asyncio face of StateStore, driving the same transaction core.

A locked operation is the transaction core's steps (``_transaction.py``), driven
from the event loop: the storage's async session takes the lock without
blocking the loop (tasks of one loop queue first come, first served, and only
the task whose turn it is has a thread waiting for a lock held by another
process), then each blocking step (read and validate, commit and fsync) runs on
a worker thread, and the caller's code (an ``async def`` update function, the
body of ``async with store.transaction()``) runs on the loop in between. The
lock is held by a handle, not a thread, so no thread is dedicated to an
operation.

Cancellation. A task cancelled while it waits for the lock, or while its
update function or block runs, writes nothing and leaves the lock free. A
step already running on a worker thread finishes before the lock is let go
(a read is short; a commit that has started is completed, then the task gets
``CancelledError``), so a cancelled task never leaves a half-done step behind
a released lock.

Nesting is refused per task (a locked call inside a transaction of the same
document or lock in the same task would wait for itself): the sync check is
per thread, and the worker thread that runs a plain update function is marked
too.

Watching (``docs/watching.md``): :meth:`AsyncStateStore.watch` is the async
iterator of :meth:`StateStore.watch`: the loop waits on the watcher's inotify
descriptor (or sleeps between polls), and each read runs on a worker thread.

See ``docs/async.md`` for what runs where and what cancellation does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import math
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from ._async_group import AsyncUpdateGroup, is_async
from ._document import Snapshot
from ._errors import LockTimeout, NestedTransactionError
from ._lock import DirectoryLock, consume, turn_gate, wait_time
from ._migrate import MigrationReport, Migrations
from ._schema import Draft
from ._store import ModelT, StateStore, Watch
from ._transaction import Transaction, entered, lock_identity, lock_key
from .backends import Storage, complete

__all__ = [
    "AsyncStateStore",
    "AsyncWatch",
    "inside",
    "run_step",
    "threaded_session",
]

T = TypeVar("T")
S = TypeVar("S")

#: The documents and locks the current task holds through a locked operation. The
#: sync nesting check is per thread and cannot see a task: without this, a nested
#: call would wait for the outer lock until its timeout.
inside: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "statestore_asyncinside", default=frozenset()
)


class _Abandon(Exception):
    """Raised on the worker thread to end a step without committing: the task gave up."""


def _in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """``fn`` on a worker thread of the loop's executor, in a copy of this context
    (``asyncio.to_thread`` without the task around it)."""
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(None, context.run, fn)


async def run_step(fn: Callable[[], T]) -> T:
    """Run a blocking step on a worker thread; when the task is cancelled meanwhile,
    let the step finish (it may hold a file half-written) and then re-raise."""
    future = _in_thread(fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):  # the cancellation is what the caller asked about
            await _finish(future)
        raise


async def _finish(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` even if cancelled meanwhile; then raise its error, or the
    cancellation (a cancellation is deferred, never lost)."""
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as e:
            cancelled = e
    future.result()
    if cancelled is not None:
        raise cancelled


@contextlib.asynccontextmanager
async def threaded_session(
    open_session: Callable[[float], AbstractContextManager[S]],
    identity: str,
    location: str,
    timeout: float,
) -> AsyncIterator[S]:
    """A storage's blocking session for asyncio.

    For storages whose lock wait is itself a blocking call (a database's lock
    timeout bounds it). Tasks of one loop take turns per document first (so at
    most one thread per document waits, and the executor's threads stay free
    for the steps of the task that holds the lock); the session is opened on a
    thread of its own and closed on a worker thread. A task cancelled while the
    session opens gets its ``CancelledError`` at once; the session is closed
    (rolled back) as soon as the opening finishes.
    """
    loop = asyncio.get_running_loop()
    wait = wait_time(None, timeout)
    deadline = loop.time() + wait
    gate = turn_gate(identity)
    if not await gate.enter(wait):
        raise LockTimeout(
            location,
            f"could not acquire the lock within {timeout:g} s: other tasks of this event "
            f"loop (pid {os.getpid()}) held it or were ahead in the queue",
            timeout=timeout,
        )
    try:
        left = max(deadline - loop.time(), 0.0) if math.isfinite(wait) else timeout
        cm = open_session(left)
        opened: concurrent.futures.Future[S] = concurrent.futures.Future()

        def enter() -> None:
            try:
                opened.set_result(cm.__enter__())
            except BaseException as e:
                opened.set_exception(e)

        threading.Thread(target=enter, name="statestore-session-wait", daemon=True).start()
        future = asyncio.wrap_future(opened)
        try:
            session = await asyncio.shield(future)
        except asyncio.CancelledError:

            def close(done: asyncio.Future[S]) -> None:
                if not done.cancelled() and done.exception() is None:
                    cm.__exit__(asyncio.CancelledError, None, None)

            opened.add_done_callback(close)  # type: ignore[arg-type]
            future.add_done_callback(consume)
            raise
        try:
            yield session
        except BaseException as e:
            failed = e
            await _finish(
                _in_thread(lambda: cm.__exit__(type(failed), failed, failed.__traceback__))
            )
            raise
        await _finish(_in_thread(lambda: cm.__exit__(None, None, None)))
    finally:
        gate.leave()


class _Once(AbstractAsyncContextManager[T]):
    """An async context manager that can be entered once, and says so the second time."""

    def __init__(self, cm: AbstractAsyncContextManager[T]) -> None:
        self._cm = cm
        self._entered = False

    async def __aenter__(self) -> T:
        if self._entered:
            raise RuntimeError("a transaction() can be entered only once; call transaction() again")
        self._entered = True
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._cm.__aexit__(exc_type, exc, tb)


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

    File I/O, fsync and lock waits never block the event loop. ``fn`` and
    transaction blocks may await; the lock is held meanwhile.
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
        history: int | None = None,
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
            history=history,
        )
        self._storage = complete(self._store.storage)

    @classmethod
    def from_store(cls, store: StateStore[ModelT]) -> AsyncStateStore[ModelT]:
        """Wrap an existing :class:`StateStore` (they share everything)."""
        if not isinstance(store, StateStore):
            raise TypeError(f"from_store() needs a StateStore, not {type(store).__name__}")
        self = cls.__new__(cls)
        self._store = store
        self._storage = complete(store.storage)
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

    async def load(self, *, shared: bool = False) -> ModelT:
        """Read, migrate in memory and validate the state, without taking the lock.
        ``shared``: see :meth:`StateStore.load` (a read-only model shared until the
        file changes)."""
        return await asyncio.to_thread(self._store.load, shared=shared)

    async def read(self, *, shared: bool = False) -> Snapshot[ModelT]:
        """The state with its revision and writer: see :meth:`StateStore.read`."""
        return await asyncio.to_thread(self._store.read, shared=shared)

    def watch(self, timeout: float | None = None) -> AsyncWatch[ModelT]:
        """``async for snapshot in store.watch():`` a :class:`Snapshot` for each new
        revision; the rules of :meth:`StateStore.watch` (an invalid document raises
        its typed error from ``__anext__``, and the iterator stays usable). A storage
        whose watch waits on a server (PostgreSQL) starts it on a worker thread."""
        store = self._store
        blocks = bool(getattr(store.storage, "watch_blocks", False))
        return AsyncWatch(Watch(store, timeout, start=not blocks))

    # ------------------------------------------------------------------ locked

    async def save(self, state: ModelT, *, expect: str | None = None) -> None:
        """Validate ``state`` and write it, under the lock (see :meth:`StateStore.save`;
        ``expect``: commit only at that revision, else :class:`ConflictError`)."""
        self._store.document.check_type(state, "save()")
        if expect is not None and not isinstance(expect, str):
            raise TypeError(f"expect= takes a revision string, not {type(expect).__name__}")
        async with self._begin("save()") as txn:
            await run_step(lambda: txn.save(state, expect))

    async def update(
        self, fn: Callable[[ModelT], ModelT | Awaitable[ModelT | None] | None]
    ) -> ModelT:
        """Load, apply ``fn``, validate and save, all under the lock; return what was saved.

        ``fn`` returns a new model, or None after changing the one it was given. A
        plain function runs on a worker thread; an ``async def`` function runs on
        the event loop, in this task. If ``fn`` raises (or this task is cancelled
        before ``fn`` returns), nothing is written.
        """
        # Tasks of this loop that update while another one holds the lock are
        # committed together with it (``_async_group.py``).
        return await self._group().update(fn)

    def _group(self) -> AsyncUpdateGroup[ModelT]:
        loop = asyncio.get_running_loop()
        groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncUpdateGroup[ModelT]]
        groups = self.__dict__.setdefault("_groups", weakref.WeakKeyDictionary())
        group = groups.get(loop)
        if group is None:
            group = groups[loop] = AsyncUpdateGroup(self)
        return group

    async def _update_alone(
        self,
        txn: Transaction[ModelT],
        fn: Callable[[ModelT], ModelT | Awaitable[ModelT | None] | None],
    ) -> ModelT:
        """One update by itself, in an open transaction."""
        if not is_async(fn):
            return await self._update_in_thread(txn, fn)
        state = await run_step(lambda: txn.begin(shed=True))
        try:
            result = await cast(Awaitable[ModelT | None], fn(state))
        except BaseException:
            txn.abort()
            raise
        return await run_step(lambda: txn.finish(fn, result))

    def _group_timed_out(self, wait: float) -> LockTimeout:
        lock = self._storage.lock
        return LockTimeout(
            lock.path if lock is not None else self.location,
            f"could not acquire the lock within {wait:g} s: another task of this "
            "loop holds it for its update (the updates of this store's tasks wait "
            "their turn in memory)",
            timeout=wait,
        )

    async def _update_in_thread(
        self, txn: Transaction[ModelT], fn: Callable[[ModelT], Any]
    ) -> ModelT:
        """A plain ``fn``: load, ``fn`` and commit in one hop to a worker thread."""
        gave_up = threading.Event()
        keys = self._keys
        location = self.location

        def run() -> tuple[bool, object]:
            state = txn.begin(shed=True)
            if gave_up.is_set():
                raise _Abandon
            with entered(keys, location, "a blocking call in update()'s function"):
                result = fn(state)
            del state
            if inspect.isawaitable(result):  # a plain function that returned a coroutine
                return False, result
            if gave_up.is_set():  # the task was cancelled while fn ran: do not commit
                raise _Abandon
            return True, txn.finish(fn, result)

        future = _in_thread(run)
        try:
            done, value = await asyncio.shield(future)
        except asyncio.CancelledError:
            gave_up.set()
            with contextlib.suppress(BaseException):
                await _finish(future)
            finished = future.done() and not future.cancelled() and future.exception() is None
            if finished and not future.result()[0]:
                _close(future.result()[1])
            raise
        if done:
            return cast(ModelT, value)
        # The awaitable runs on the loop, as an ``async def`` fn would.
        try:
            result = await cast(Awaitable[ModelT | None], value)
        except BaseException:
            txn.abort()
            raise
        return await run_step(lambda: txn.finish(fn, result))

    def transaction(self) -> AbstractAsyncContextManager[ModelT]:
        """``async with store.transaction() as state:`` load under the lock; saved on normal exit.

        An exception inside the block (``asyncio.CancelledError`` too) discards
        the changes and writes nothing. The lock is held while the block runs.
        """
        return _Once(self._transaction())

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[ModelT]:
        async with self._begin("transaction()") as txn:
            state = await run_step(txn.begin)
            try:
                yield state
            except BaseException:
                txn.abort()
                raise
            await run_step(lambda: txn.commit(state))

    async def migrate(self, *, dry_run: bool = False) -> MigrationReport:
        """Upgrade the file to this store's version, under the lock, keeping a backup."""
        async with self._begin("migrate()") as txn:
            return await run_step(lambda: txn.migrate(dry_run=dry_run))

    # ---------------------------------------------------------------- internals

    @property
    def _keys(self) -> frozenset[str]:
        """What a locked operation of this store takes: its document, and its lock
        (the async lock is not reentrant, so a nested call on another document of
        the same lock would wait for itself too)."""
        storage = self._storage
        lock = lock_identity(storage.lock)
        if lock is None:
            return frozenset((storage.identity,))
        return frozenset((storage.identity, lock_key(lock)))

    def _refuse_nested(self, what: str) -> None:
        if self._keys & inside.get():
            raise NestedTransactionError(
                self.location,
                f"{what} called inside a transaction on the same file or lock, in the "
                "same task: the outer transaction holds the lock this call would wait "
                "for, and its commit would overwrite the result. Change the state "
                "yielded by the transaction instead",
            )

    @contextlib.asynccontextmanager
    async def _begin(
        self, what: str, since: float | None = None
    ) -> AsyncIterator[Transaction[ModelT]]:
        """A transaction in an async session of the storage (its lock held).
        ``since``: when the caller began waiting (``time.monotonic()``), if before."""
        self._refuse_nested(what)
        keys = self._keys
        store = self._store
        timeout = store.timeout
        if since is not None:
            wait = wait_time(None, timeout)
            if wait != math.inf:
                timeout = max(0.0, since + wait - time.monotonic())
        async with self._storage.async_session(timeout) as session:
            token = inside.set(inside.get() | keys)
            try:
                yield Transaction(store.document, session, store.history_size)
            finally:
                inside.reset(token)


class AsyncWatch(Generic[ModelT]):
    """What :meth:`AsyncStateStore.watch` returns: ``async for``; ``close()``."""

    def __init__(self, watch: Watch[ModelT]) -> None:
        self._watch = watch
        # A watch not started yet waits on a server to start: on a worker thread, at
        # once (changes from now on are seen), never on the loop.
        self._starting: asyncio.Future[None] | None = None
        if watch.watcher is None and not watch.closed:
            try:
                self._starting = _in_thread(watch.start)
            except RuntimeError:  # no running loop: nothing to block
                watch.start()

    def __aiter__(self) -> AsyncWatch[ModelT]:
        return self

    async def __anext__(self) -> Snapshot[ModelT]:
        watch = self._watch
        await self.started()
        loop = asyncio.get_running_loop()
        timeout = watch.timeout
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            watcher = watch.watcher
            if watch.closed or watcher is None or not await watcher.wait_async(left):
                raise StopAsyncIteration
            snapshot = await run_step(watch.check)
            if snapshot is not None:
                return snapshot

    @property
    def closed(self) -> bool:
        return self._watch.closed

    def close(self) -> None:
        """Stop watching (from any thread); a waiting ``__anext__`` ends."""
        self._watch.close()

    async def started(self) -> None:
        """Wait until the watch has started (a storage that watches through a server
        starts it on a worker thread): changes committed after this are seen.
        ``async with store.watch() as watch:`` waits for it; an error starting it
        (the server cannot be reached) is raised here."""
        watch = self._watch
        starting = self._starting
        if starting is not None:
            try:
                await asyncio.shield(starting)
            finally:
                if starting.done():
                    self._starting = None
        elif watch.watcher is None and not watch.closed:
            await run_step(watch.start)  # a start that failed before: tried again

    async def __aenter__(self) -> AsyncWatch[ModelT]:
        try:
            await self.started()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
