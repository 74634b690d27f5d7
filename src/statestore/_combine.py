"""Group commit of one store's updates from several threads of a process.

Threads that call ``update()`` on the same :class:`~statestore.StateStore`
while another thread's update holds the lock queue up; the thread that holds
it (the group's *leader*) takes everything queued when it got the lock and
commits it as one: one load, each queued function in turn, one write and one
fsync. A lock taken, a file written and a folder synced per group instead of
per update is what lets eight threads reach several times one thread's
throughput.

Rules this module keeps:

* **Each function runs on its caller's thread**, in queue order (first come,
  first served), on a fresh model of the state after the function before it:
  thread-locals and context variables are the caller's, and while it runs
  the caller may take the lock again as its holder could (a store of another
  file under the same lock; ``AcquiredLock.lent_to``). A nested update of the
  same document is refused as before (``NestedTransactionError``): each
  caller marks its own thread for the whole call.
* **A function that raises changes nothing and fails only its caller**: the
  next function starts from the state before it. So does one whose result
  does not validate or would not load back (each result is checked as it is
  made, on the exact bytes). Each caller gets the model its own result loads
  as.
* **All or nothing on disk**: the group's last good state is published once,
  and every caller whose function counted gets that commit's outcome: its
  model, or the error of the write (a full disk, a lost lock), which then
  fails all of them. No caller returns before the bytes it counted on are
  durable.
* **Waiting**: a caller waits behind the leader in memory; the leader waits
  for the lock within the store's ``timeout``. If that wait times out, the
  callers queued before it began fail with the ``LockTimeout`` (they waited as
  long); later ones stay queued and the next of them leads. A group holds at
  most ``MAX_GROUP`` functions, so other processes still get their turns.
* **Only plain callers combine**: a thread already inside a locked operation
  (of any store), a storage whose session cannot lend its lock (PostgreSQL's
  row lock belongs to its connection), and ``transaction()`` / ``save()`` go
  their own way, each under the lock by itself.
* **Interruptions**: a caller interrupted while queued leaves the queue; one
  interrupted while its function runs fails only itself; a leader interrupted
  fails the callers of its group that had not yet been committed with
  :class:`~statestore.StateWriteError` saying nothing of theirs was written,
  and hands the lead on. In a forked child the queue starts empty (the
  parent's threads did not come along).
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final, Generic

from ._document import Document, Loaded, ModelT
from ._errors import LockCompromisedError, LockTimeout, StateWriteError
from ._lock import wait_time
from ._transaction import Transaction, inside
from .backends import Session

__all__ = ["UpdateGroup"]

#: The most update functions one group commits (then the lock is handed on).
MAX_GROUP: Final = 64

_QUEUED, _LEADING, _RUNNING, _RAN, _DONE = range(5)


class _Job:
    __slots__ = ("checked", "data", "error", "fn", "queued_at", "state", "step", "thread")

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.thread = threading.get_ident()
        self.queued_at = time.monotonic()
        self.state = _QUEUED
        self.step: Callable[[_Job], None] | None = None
        self.data: bytes | None = None
        self.checked: Any = None
        self.error: BaseException | None = None


_groups: weakref.WeakSet[UpdateGroup[Any]] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for group in list(_groups):
        group._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class UpdateGroup(Generic[ModelT]):
    """The queue of one store's updates in this process (see the module's rules).

    ``session`` opens the storage's session (its lock held); ``mark`` marks the
    calling thread as inside an update of the document for a block.
    """

    def __init__(
        self,
        document: Document[ModelT],
        session: Callable[[float], AbstractContextManager[Session]],
        mark: Callable[[], AbstractContextManager[None]],
        history: int | None,
        timeout: Callable[[], float],
        lock_path: Callable[[], str],
    ) -> None:
        self._document = document
        self._session = session
        self._timeout = timeout
        self._lock_path = lock_path
        self._mark = mark
        self._history = history
        self._reset()
        _groups.add(self)

    def _forked(self) -> None:
        """In a forked child: every update the parent's threads had under way ends
        here with :class:`LockCompromisedError` (the one thread that came along may
        be inside one of them: a function that forked), and the queue starts empty."""
        try:
            error = LockCompromisedError(
                self._lock_path(),
                "the update was not saved: this forked child holds none of its parent's "
                "locks, and its parent's threads, whose updates were committed together "
                "with it, did not come along; nothing of it was written",
            )
        except Exception:  # pragma: no cover - a path that no longer resolves
            error = LockCompromisedError(self._document.location, "forked child")
        for job in self._queue:
            if job.error is None:
                job.error = error
            job.state = _DONE
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Job] = deque()
        self._leading = False

    def update(self, fn: Callable[[ModelT], ModelT | None]) -> ModelT:
        """``store.update(fn)``, committed together with other threads' queued updates."""
        if inside():
            return self._alone(fn)
        job = _Job(fn)
        wait = wait_time(None, self._timeout())
        with self._mark():
            with self._cond:
                self._queue.append(job)
                if not self._leading:
                    self._leading = True
                    job.state = _LEADING
            try:
                while True:
                    # The condition is looked up each time: a forked child has its own.
                    cond = self._cond
                    with cond:
                        while job.state == _QUEUED or job.state == _RAN:
                            if job.state == _RAN or wait == math.inf:
                                cond.wait()
                                continue
                            left = job.queued_at + wait - time.monotonic()
                            if left <= 0:  # still queued: the store's timeout holds here too
                                self._queue.remove(job)
                                job.state = _DONE
                                job.error = self._timed_out(wait)
                                break
                            cond.wait(left)
                        state = job.state
                    if state == _DONE:
                        break
                    if state == _LEADING:
                        self._lead(job)
                        break
                    self._run(job)  # _RUNNING: the leader gave this thread its turn
            except BaseException:
                self._leave(job)
                raise
        if job.error is not None:
            raise job.error
        result: ModelT = job.checked
        return result

    def _timed_out(self, wait: float) -> LockTimeout:
        return LockTimeout(
            self._lock_path(),
            f"could not acquire the lock within {wait:g} s: another thread of this "
            "process holds it for its update (the updates of this store's threads "
            "wait their turn in memory)",
            timeout=wait,
        )

    def _alone(self, fn: Callable[[ModelT], ModelT | None]) -> ModelT:
        with self._mark(), self._session(self._timeout()) as session:
            return Transaction(self._document, session, self._history).update(fn)

    def _run(self, job: _Job) -> None:
        """This thread's turn in the leader's group: run its function, report back."""
        step = job.step
        assert step is not None
        try:
            step(job)
        finally:
            with self._cond:
                if job.state == _RUNNING:
                    job.state = _RAN
                self._cond.notify_all()

    def _leave(self, job: _Job) -> None:
        """An interrupted caller: out of the queue, its turn (if any) given up."""
        with self._cond:
            if job.state == _QUEUED:
                self._queue.remove(job)
                job.state = _DONE  # a leader that listed it skips it
            elif job.state == _RUNNING:
                job.state = _RAN
                if job.error is None and job.data is None:
                    job.error = _interrupted(self._document.location)
            elif job.state == _LEADING:  # promoted, but never led
                self._queue.remove(job)
                self._hand_on()
            self._cond.notify_all()

    def _hand_on(self) -> None:
        """(cond held) The next queued caller leads; or nobody does."""
        if self._queue:
            self._queue[0].state = _LEADING
        else:
            self._leading = False
        self._cond.notify_all()

    def _lead(self, me: _Job) -> None:
        doc = self._document
        began = time.monotonic()
        wait = wait_time(None, self._timeout())
        if wait != math.inf:  # a caller promoted to lead has waited already
            wait = max(0.0, me.queued_at + wait - began)
        group: list[_Job] = []
        try:
            try:
                with self._session(wait) as session:
                    lend = getattr(session, "lend", None)
                    with self._cond:
                        group = [me]
                        if lend is not None:  # the rest of the queue, first come first served
                            group += [j for j in self._queue if j.state == _QUEUED]
                            del group[MAX_GROUP:]
                    self._commit(Transaction(doc, session, self._history), group, me, lend)
            except LockTimeout as e:
                with self._cond:
                    for job in self._queue:
                        if job is me or (job.state == _QUEUED and job.queued_at <= began):
                            job.error = e
                            group.append(job)
                    group = list(dict.fromkeys(group))
                raise
            except BaseException as e:
                with self._cond:
                    if not group:
                        group = [me]
                    for job in group:
                        if job.state != _DONE and job.error is None:
                            job.error = e if job is me else _failed_with(doc.location, e)
                raise
        except BaseException:
            pass  # each caller's outcome is in its job
        finally:
            with self._cond:
                for job in group:  # each has its outcome now (an error, if not committed)
                    job.state = _DONE
                    if job in self._queue:
                        self._queue.remove(job)
                self._hand_on()

    def _commit(
        self,
        txn: Transaction[ModelT],
        group: list[_Job],
        me: _Job,
        lend: Callable[[int], AbstractContextManager[None]] | None,
    ) -> None:
        if len(group) == 1:  # alone: the plain update, which also lets a large file go
            try:
                me.checked = txn.update(me.fn)
                me.data = b""
            except BaseException as e:
                me.error = e
            return
        doc = self._document
        fresh = [txn.begin()]
        loaded = txn.loaded
        base: bytes | None = None  # the bytes of the state so far (None: as loaded)

        def start() -> ModelT:
            # The state after the last function that counted, as a model of its own.
            if base is not None:
                return doc.parse(base).model
            if fresh:
                loaded.model = None  # type: ignore[assignment]  # the function's now
                return fresh.pop()
            if loaded.raw is None:
                return doc.make_default()
            return doc.parse(loaded.raw).model

        def step(job: _Job) -> None:
            try:
                job.data, job.checked = _apply(doc, loaded, job.fn, start())
            except BaseException as e:
                job.error = e

        for job in group:
            if job is me:
                step(job)
            else:
                assert lend is not None
                cond = self._cond
                with cond:
                    if job.state != _QUEUED:
                        continue  # it left the queue meanwhile (or a fork ended it)
                    job.step = step
                    job.state = _RUNNING
                    cond.notify_all()
                    with lend(job.thread):
                        while job.state == _RUNNING:
                            cond.wait()
            if job.error is None and job.data is not None:
                base = job.data  # the next function starts from this state
        counted = [j for j in group if j.error is None and j.data is not None]
        if not counted:
            txn.abort()
            return
        last = counted[-1]
        assert last.data is not None
        last.checked = txn.publish(last.data, last.checked)  # its error fails them all


def _apply(
    doc: Document[ModelT],
    loaded: Loaded[ModelT],
    fn: Callable[[ModelT], ModelT | None],
    state: ModelT,
) -> tuple[bytes, ModelT]:
    """One function of a group: its state's exact bytes (framed after ``loaded``) and
    the model they load as."""
    result = fn(state)
    if result is not None:
        state = result
    doc.check_type(state, f"update(): {getattr(fn, '__qualname__', 'fn')} returned")
    data = doc.frame(doc.dump(state), loaded.schema, after=loaded)
    del state, result
    return data, doc.check(data)


def _failed_with(location: str, e: BaseException) -> BaseException:
    """The error a caller gets when its group's commit failed with ``e``."""
    if isinstance(e, Exception):
        return e  # the same error for every caller (as a future's result() gives it)
    return _interrupted(location)


def _interrupted(location: str) -> StateWriteError:
    return StateWriteError(
        location,
        "the update was not saved: the thread committing it with other threads' "
        "updates was interrupted before its commit; nothing of it was written. Run it again",
    )
