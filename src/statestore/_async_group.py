"""Group commit of one async store's updates from several tasks of a loop.

The asyncio twin of ``_combine.py``: tasks of one event loop that call
``await store.update(fn)`` on the same :class:`~statestore.AsyncStateStore`
while another task's update holds the lock queue up; the task that holds it
(the leader) commits everything queued when it got the lock as one: one load,
each function in turn, one write and one fsync.

Rules this module keeps (the same as for threads):

* **Only plain functions are grouped**: an ``async def`` function awaits
  (the network, a model, a user) and would hold back the callers before it
  in its group, so it commits by itself, as without a group, and ends the run
  of plain functions a group takes from the queue (first come, first served).
* **Each function runs in its caller's task**: a plain function on a worker
  thread in a copy of that task's context (one that returns an awaitable has
  it awaited on the loop, in that task); in queue order, each on a model of
  its own holding the state after the function before it. A locked call of
  the same document or lock inside it is refused (``NestedTransactionError``),
  as without a group.
* **A function that raises, or whose task is cancelled before it returns,
  changes nothing and fails only its caller**; so does a result that does not
  validate or would not load back. That holds for what a function raises
  that is no ``Exception`` too (``KeyboardInterrupt``, ``SystemExit``, a
  ``CancelledError`` of its own while its task is not cancelled): the
  leader's own is raised once the group is committed. Each caller gets the
  model its own result loads as. An awaitable a plain function returned
  that never ran (its task cancelled meanwhile) is closed. A task cancelled
  after its function returned gets ``CancelledError``, and its update is
  written with the group (the functions after it started from its state),
  as a task alone whose commit has begun.
* **All or nothing on disk**: the group's last good state is published once;
  if that fails, every caller whose function counted gets the error.
* **Waiting**: a queued task waits at most the store's ``timeout`` (then
  ``LockTimeout``), and may be cancelled while it waits (it leaves the queue).
  A leader's ``LockTimeout`` fails the tasks queued before it began waiting.
  At most ``MAX_GROUP`` functions per group.
* **A cancelled leader** lets the lock go; the callers of its group whose
  updates were not committed get :class:`~statestore.StateWriteError` saying
  nothing of theirs was written, and the next queued task leads.
* **What a caller is told is true**: a cancellation of the leader that comes
  while the group's write is made waits for it; the session is then closed
  normally (a database commits), every caller whose function counted gets its
  state, and only then does the leader get its ``CancelledError`` (as a task
  alone does: a commit that has started is completed). No caller hears
  "nothing written" of a state that was written.
* **No reference cycle**: a group holds its store weakly (the store keeps its
  groups, one per loop), so a store let go goes at once with its storage.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import math
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Generic, cast

from ._combine import settle
from ._document import Document, Loaded, ModelT
from ._errors import LockTimeout, StateWriteError
from ._lock import wait_time
from ._transaction import Transaction, entered

if TYPE_CHECKING:
    from ._async import AsyncStateStore

__all__ = ["AsyncUpdateGroup", "is_async"]

#: The most update functions one group commits (then the lock is handed on).
MAX_GROUP: Final = 64

_QUEUED, _LEADING, _TURN, _RAN, _DONE = range(5)


class _Job:
    __slots__ = (
        "checked",
        "context",
        "data",
        "error",
        "fn",
        "promoted",
        "published",
        "queued_at",
        "reported",
        "state",
        "wake",
    )

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.queued_at = time.monotonic()
        self.state = _QUEUED
        self.promoted = False
        self.published = False  # its state is in the write that was made
        self.wake: asyncio.Future[None] | None = None
        self.reported: asyncio.Future[None] | None = None
        self.context: _Context[Any] | None = None
        self.data: bytes | None = None
        self.checked: Any = None
        self.error: BaseException | None = None

    def rouse(self) -> None:
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)


class _Context(Generic[ModelT]):
    """What a group's functions share: the document as loaded, and the state so far.
    Its methods run on worker threads, one function's at a time."""

    def __init__(self, document: Document[ModelT], loaded: Loaded[ModelT]) -> None:
        self.document = document
        self.loaded = loaded
        self.fresh: list[ModelT] = [loaded.model]
        self.base: bytes | None = None  # the bytes of the state so far (None: as loaded)

    def start(self) -> ModelT:
        doc, loaded = self.document, self.loaded
        if self.base is not None:
            return doc.parse(self.base).model
        if self.fresh:
            loaded.model = None  # type: ignore[assignment]  # the function's now
            return self.fresh.pop()
        if loaded.raw is None:
            return doc.make_default()
        return doc.parse(loaded.raw).model

    def finish(self, fn: object, state: ModelT, result: ModelT | None) -> tuple[bytes, ModelT]:
        _, data, checked = settle(self.document, self.loaded, fn, state, result)
        return data, checked


class AsyncUpdateGroup(Generic[ModelT]):
    """The queue of one async store's updates on one event loop."""

    def __init__(self, store: AsyncStateStore[ModelT]) -> None:
        # Weak: the store keeps its groups, and a store let go must go at once
        # (with its storage's connections), not at the collector's next pass.
        self._store_ref = weakref.ref(store)
        self._queue: deque[_Job] = deque()
        self._leading = False

    @property
    def _store(self) -> AsyncStateStore[ModelT]:
        store = self._store_ref()
        assert store is not None  # every caller holds its store
        return store

    @property
    def busy(self) -> bool:
        """Whether a task leads (an update would queue behind it)."""
        return self._leading

    async def update(self, fn: Callable[[ModelT], Any]) -> ModelT:
        store = self._store
        store._refuse_nested("update()")
        loop = asyncio.get_running_loop()
        job = _Job(fn)
        wait = wait_time(None, store.sync.timeout)
        self._queue.append(job)
        if not self._leading:
            self._leading = True
            job.state = _LEADING
        try:
            while True:
                state = job.state
                if state == _LEADING:
                    await self._lead(job)
                    break
                if state == _DONE:
                    break
                if state == _TURN:
                    await self._run(job)
                    continue
                if state == _QUEUED and wait != math.inf:
                    left = job.queued_at + wait - time.monotonic()
                    if left <= 0:  # still queued: the store's timeout holds here too
                        self._queue.remove(job)
                        job.state = _DONE
                        job.error = store._group_timed_out(wait)
                        break
                    timer = loop.call_later(left, job.rouse)
                else:
                    timer = None
                job.wake = loop.create_future()
                try:
                    await job.wake
                finally:
                    job.wake = None
                    if timer is not None:
                        timer.cancel()
        except BaseException:
            self._leave(job)
            raise
        if job.error is not None:
            raise job.error
        if job.data is None:  # never run, yet no error: not committed, say so
            raise _interrupted(store.location)
        return cast(ModelT, job.checked)

    def _leave(self, job: _Job) -> None:
        """A cancelled caller: out of the queue (its turn, if any, already reported)."""
        if job.state == _QUEUED:
            self._queue.remove(job)
            job.state = _DONE
        elif job.state == _LEADING:  # promoted, but never led
            self._queue.remove(job)
            job.state = _DONE
            self._hand_on()
        elif job.state == _TURN:  # cancelled before its turn began
            job.state = _RAN
            job.error = job.error or _interrupted(self._store.location)
            self._report(job)

    def _hand_on(self) -> None:
        if self._queue:
            first = self._queue[0]
            first.state = _LEADING
            first.promoted = True
            first.rouse()
        else:
            self._leading = False

    @staticmethod
    def _report(job: _Job) -> None:
        reported = job.reported
        if reported is not None and not reported.done():
            reported.set_result(None)

    async def _run(self, job: _Job) -> None:
        """This task's turn in the leader's group: its function, in its own task."""
        from ._async import inside, run_step

        store = self._store
        context = job.context
        assert context is not None
        keys = store._keys
        token = inside.set(inside.get() | keys)
        returned: list[object] = []  # an awaitable a plain function returned
        try:
            fn = job.fn
            if is_async(fn):
                state = await run_step(context.start)
                result = await fn(state)
                job.data, job.checked = await run_step(lambda: context.finish(fn, state, result))
            else:
                location = store.location

                def plain() -> tuple[bool, Any, Any]:
                    state = context.start()
                    with entered(keys, location, "a blocking call in update()'s function"):
                        result = fn(state)
                    if inspect.isawaitable(result):
                        returned.append(result)
                        return False, state, result
                    return True, None, context.finish(fn, state, result)

                done, state, value = await run_step(plain)
                if not done:  # a plain function that returned an awaitable: on the loop
                    result = await cast(Awaitable[Any], value)
                    value = await run_step(lambda: context.finish(fn, state, result))
                job.data, job.checked = value
        except BaseException as e:
            job.error = e
            if not isinstance(e, Exception):
                raise
        finally:
            for awaitable in returned:  # never awaited (cancelled meanwhile): no warning
                _close(awaitable)
            inside.reset(token)
            if job.state == _TURN:
                job.state = _RAN
            self._report(job)

    async def _lead(self, me: _Job) -> None:
        store = self._store
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        group: list[_Job] = []
        try:
            try:
                async with store._begin("update()", me.queued_at if me.promoted else None) as txn:
                    group = [me]
                    if not is_async(me.fn):
                        for job in self._queue:  # the plain functions queued next
                            if len(group) >= MAX_GROUP or is_async(job.fn):
                                break
                            if job.state == _QUEUED:
                                group.append(job)
                    if len(group) == 1:
                        me.checked = await store._update_alone(txn, me.fn)
                        me.data = b""  # committed by itself
                        return
                    deferred = await self._commit(txn, group, me, loop)
                if deferred is not None:  # cancelled while the commit was made: after it
                    raise deferred
            except LockTimeout as e:
                for job in list(self._queue):
                    if job is me or (job.state == _QUEUED and job.queued_at <= began):
                        job.error = e
                        group.append(job)
                group = list(dict.fromkeys(group))
                raise
            except BaseException as e:
                if not group:
                    group = [me]
                for job in group:
                    if job.published and not isinstance(e, Exception):
                        continue  # written before the interruption: its state stands
                    if job.state != _DONE and job.error is None:
                        job.error = e if job is me else _failed_with(store.location, e)
                raise
        except BaseException as e:
            if me.error is None:
                me.error = e
        finally:
            for job in group:
                if job.state == _TURN:  # its function may still run: it fails itself
                    job.error = job.error or _interrupted(store.location)
                job.state = _DONE
                if job in self._queue:
                    self._queue.remove(job)
                job.rouse()
            if me in self._queue:
                self._queue.remove(me)
            me.state = _DONE
            self._hand_on()

    async def _commit(
        self,
        txn: Transaction[ModelT],
        group: list[_Job],
        me: _Job,
        loop: asyncio.AbstractEventLoop,
    ) -> BaseException | None:
        """Each function's turn, then the one write. What the leader raises after
        the session is closed (a database commits then) is returned: a cancellation
        that came while the write was made (it waited for the write), or what the
        leader's own function raised that is no ``Exception`` (``KeyboardInterrupt``,
        a ``CancelledError`` of its own: its task was not cancelled)."""
        from ._async import run_step

        document = txn.document
        await run_step(txn.begin)
        context = _Context(document, txn.loaded)
        own: BaseException | None = None
        for job in group:
            if job is not me and job.state != _QUEUED:
                continue  # it left the queue meanwhile
            job.context = context
            job.state = _TURN
            if job is me:
                try:
                    await self._run(job)
                except BaseException as e:
                    # Python 3.10 cannot tell a cancellation from a CancelledError of
                    # the function's own: there it ends the group.
                    cancelling = getattr(asyncio.current_task(), "cancelling", None)
                    if cancelling() if cancelling else isinstance(e, asyncio.CancelledError):
                        raise  # the leader's task is cancelled: the group ends
                    own = e  # its function's own: it fails only the leader
            else:
                job.reported = loop.create_future()
                job.rouse()
                await job.reported
            if job.error is None and job.data is not None:
                context.base = job.data  # the next function starts from this state
        counted = [j for j in group if j.error is None and j.data is not None]
        if not counted:
            txn.abort()
            return own
        last = counted[-1]
        data, checked = last.data, last.checked
        assert data is not None
        context_now = contextvars.copy_context()  # the write on a worker thread, as run_step
        writing = loop.run_in_executor(None, context_now.run, lambda: txn.publish(data, checked))
        cancelled: asyncio.CancelledError | None = None
        while not writing.done():
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError as e:
                cancelled = e
        try:
            last.checked = writing.result()
        except BaseException:
            if cancelled is not None:
                for job in counted:
                    if job is not me:
                        job.error = job.error or writing.exception()
                raise cancelled from None
            raise
        for job in counted:
            job.published = True
        return cancelled or own


def is_async(fn: object) -> bool:
    """Whether ``fn`` is an ``async def`` function (or an object with an ``async def
    __call__``)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with ``async def __call__``
    )


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()


def _failed_with(location: str, e: BaseException) -> BaseException:
    if isinstance(e, Exception):
        return e
    return _interrupted(location)


def _interrupted(location: str) -> StateWriteError:
    return StateWriteError(
        location,
        "the update was not saved: the task committing it with other tasks' updates "
        "was cancelled before its commit; nothing of it was written. Run it again",
    )
