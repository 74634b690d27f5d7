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
  file under the same lock; ``AcquiredLock.lent_to``, lent before the
  function can start). A nested update of the same document is refused as
  before (``NestedTransactionError``): each caller marks its own thread for
  the whole call.
* **A function that raises changes nothing and fails only its caller**: the
  next function starts from the state before it. So does one whose result
  does not validate or would not load back (each result is checked as it is
  made, on the exact bytes). Each caller gets the model its own result loads
  as.
* **All or nothing on disk**: the group's last good state is published once
  (twice when a function runs long: below), and every caller whose function
  counted gets that commit's outcome: its model, or the error of the write (a
  full disk, a lost lock), which then fails all of them. No caller returns
  before the bytes it counted on are durable; a state once written stands
  (a later failure of the group does not fail its callers), and callers whose
  write was interrupted as it landed are told it may have been written.
* **No caller waits for a later function**: a function that runs longer than
  ``FLUSH_AFTER`` is handed the rest of the group. The states that counted
  before it are written first (one more write) and their callers, the leader
  among them, return; the lock is lent to its thread, which drives the rest
  of the group when the function returns (a result framed after a state
  written meanwhile is framed and checked again). A function that never
  returns so holds back only itself and the callers after it, which time out
  as they would behind any holder of the lock.
* **Waiting**: a caller waits behind the leader in memory; the leader waits
  for the lock within the store's ``timeout`` (as it was when the caller
  called: each caller keeps its own). If that wait times out, the queued
  callers whose own wait is over too fail with the ``LockTimeout`` (it names
  the holder); the others stay queued and the next of them leads. A group
  holds at most ``MAX_GROUP`` functions, so other processes still get their
  turns.
* **Only plain callers combine**: a thread already inside a locked operation
  (of any store), a storage whose session cannot lend its lock (PostgreSQL's
  row lock belongs to its connection), and ``transaction()`` / ``save()`` go
  their own way, each under the lock by itself.
* **Interruptions**: a caller interrupted while queued leaves the queue; one
  interrupted while its function runs fails only itself; one interrupted
  after its function ran waits for the commit it is part of (a write at
  most), then raises the interruption with a note saying whether its update
  was written. A leader interrupted fails the callers of its group that had
  not yet been committed with :class:`~statestore.StateWriteError` saying
  nothing of theirs was written, and hands the lead on.
* **Fork**: in a forked child the queue starts empty (the parent's threads did
  not come along), and an update the forking thread was part of (a function
  that forked) ends in the child with :class:`~statestore.LockCompromisedError`
  at once, writing nothing: the child holds none of its parent's locks. The
  condition is looked up afresh at every wait, since the child has its own.
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

__all__ = ["UpdateGroup", "settle"]

#: The most update functions one group commits (then the lock is handed on).
MAX_GROUP: Final = 64
#: After a function of the group has run this long (seconds), the ones before it
#: are committed without waiting for it.
FLUSH_AFTER: Final = 0.1

_QUEUED, _LEADING, _RUNNING, _RAN, _DONE = range(5)


class _Job:
    __slots__ = (
        "after",
        "body",
        "checked",
        "cv",
        "data",
        "error",
        "fn",
        "queued_at",
        "round",
        "state",
        "step",
        "thread",
        "wait",
        "written",
    )

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.thread = threading.get_ident()
        self.queued_at = time.monotonic()
        self.wait = math.inf  # its caller's timeout (seconds)
        self.state = _QUEUED
        self.step: Callable[[_Job], None] | None = None
        self.round: _Round[Any] | None = None  # handed to this thread to drive
        self.after: Loaded[Any] | None = None  # the document its bytes were framed after
        self.body: bytes | None = None
        self.data: bytes | None = None
        self.checked: Any = None
        self.error: BaseException | None = None
        self.written = False  # its state is on disk (a write of its group returned)
        # Its own condition, on the group's lock: a change of its state wakes only
        # the threads waiting for it (its caller, the driver), not every caller.
        self.cv: threading.Condition | None = None


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
            job.round = None
            job.cv = None  # on the parent's lock: the child makes its own
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        self._leading = False

    def update(self, fn: Callable[[ModelT], ModelT | None]) -> ModelT:
        """``store.update(fn)``, committed together with other threads' queued updates."""
        if inside():
            return self._alone(fn)
        job = _Job(fn)
        job.wait = wait = wait_time(None, self._timeout())
        with self._mark():
            try:
                at_once = False
                with self._cond:
                    self._queue.append(job)
                    if not self._leading:
                        self._leading = at_once = True
                        job.state = _LEADING
                while True:
                    # The condition is looked up each time: a forked child has its own.
                    cond = self._cond
                    with cond:
                        while job.state == _QUEUED or job.state == _RAN:
                            if job.state == _RAN or wait == math.inf:
                                self._cv(job).wait()
                                continue
                            left = job.queued_at + wait - time.monotonic()
                            if left <= 0:  # still queued: the store's timeout holds here too
                                self._queue.remove(job)
                                job.state = _DONE
                                job.error = self._timed_out(wait)
                                break
                            self._cv(job).wait(left)
                        state = job.state
                    if state == _DONE:
                        break
                    if state == _LEADING:
                        self._lead(job, at_once)
                        break
                    self._run(job)  # _RUNNING: the leader gave this thread its turn
            except BaseException as e:
                if self._leave(job):
                    self._await_outcome(job, e)
                raise
        if job.error is not None:
            raise job.error
        result: ModelT = job.checked
        return result

    def _cv(self, job: _Job) -> threading.Condition:
        """(lock held) ``job``'s condition, on this group's (current) lock."""
        cv = job.cv
        if cv is None:
            cv = job.cv = threading.Condition(self._lock)
        return cv

    def _wake(self, *jobs: _Job) -> None:
        """(lock held) Wake the threads waiting for a change of these jobs' state."""
        for job in jobs:
            self._cv(job).notify_all()

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
        """This thread's turn in the group: run its function, report back; and drive
        the rest of the group if the driver handed it over meanwhile (the function
        took long)."""
        step = job.step
        assert step is not None
        handed: _Round[Any] | None = None
        try:
            step(job)
        finally:
            try:
                with self._cond:
                    if job.state == _RUNNING:
                        job.state = _RAN
                    handed, job.round = job.round, None
                    self._wake(job)
            finally:  # an interrupt here must not leave the round (and the lock) to nobody
                if handed is not None:
                    handed.drive(resumed=True)

    def _leave(self, job: _Job) -> bool:
        """An interrupted caller: out of the queue, its turn (if any) given up. True
        if its function had run: its result is in the group's commit."""
        with self._cond:
            if job.state == _QUEUED:
                if job in self._queue:
                    self._queue.remove(job)
                job.state = _DONE  # a leader that listed it skips it
            elif job.state == _RUNNING:
                job.state = _RAN
                if job.error is None and job.data is None:
                    job.error = _interrupted(self._document.location)
            elif job.state == _LEADING:  # promoted, but never led
                if job in self._queue:
                    self._queue.remove(job)
                self._hand_on()
            self._wake(job)
            return job.state == _RAN and job.error is None and job.data is not None

    def _await_outcome(self, job: _Job, e: BaseException) -> None:
        """An interrupted caller whose function ran: its result is committed with the
        group's or not; wait for that (a write at most), and say which on ``e``."""
        try:
            with self._cond:
                while job.state != _DONE:
                    self._cv(job).wait()
        except BaseException:  # interrupted again: it goes without knowing
            return
        if job.error is None:
            what = "this update was written (it was committed with other threads' updates)"
        else:
            what = f"this update was not written ({type(job.error).__name__}: {job.error})"
        add_note = getattr(e, "add_note", None)  # Python 3.11+
        if add_note is not None:
            add_note(f"{self._document.location}: {what}")

    def _hand_on(self) -> None:
        """(cond held) The next queued caller leads; or nobody does."""
        if self._queue:
            self._queue[0].state = _LEADING
            self._wake(self._queue[0])
        else:
            self._leading = False

    def _lead(self, me: _Job, at_once: bool) -> None:
        """Take the lock, then commit the group (``at_once``: this caller found
        nobody leading, so its wait for the lock is its whole timeout)."""
        began = time.monotonic()
        wait = me.wait
        if wait != math.inf and not at_once:  # a caller promoted to lead has waited
            wait = max(0.0, me.queued_at + wait - began)
        group: list[_Job] = [me]
        try:
            opened = self._session(wait)
            session = opened.__enter__()
        except LockTimeout as e:
            with self._cond:
                now = time.monotonic()
                for job in self._queue:  # those whose own wait is over: they waited as long
                    if job.state == _QUEUED and job.queued_at + job.wait <= now:
                        job.error = e
                        group.append(job)
                me.error = e
                self._finish(group)
            return
        except BaseException as e:
            with self._cond:
                me.error = e
                self._finish(group)
            return
        try:
            lend = getattr(session, "lend", None)
            with self._cond:
                if lend is not None:  # the rest of the queue, first come first served
                    group += [j for j in self._queue if j.state == _QUEUED]
                    del group[MAX_GROUP:]
            run = _Round(self, opened, session, group, me, lend)
        except BaseException as e:  # interrupted before the round began
            with self._cond:
                me.error = e
                for job in group[1:]:
                    job.error = _failed_with(self._document.location, e)
            try:
                opened.__exit__(type(e), e, e.__traceback__)
            finally:
                with self._cond:
                    self._finish(group)
            return
        run.drive(resumed=False)

    def _finish(self, group: list[_Job]) -> None:
        """(cond held) Each job of ``group`` has its outcome: out of the queue; the
        next queued caller leads."""
        for job in group:
            job.state = _DONE
            if job in self._queue:
                self._queue.remove(job)
        self._wake(*group)
        self._hand_on()


class _Round(Generic[ModelT]):
    """One group under the lock: each function in turn, then the write.

    Driven by the thread that took the lock (the leader). A function that runs
    longer than ``FLUSH_AFTER`` is handed the round: the ones before it are
    written first and their callers return, and its thread drives the rest when
    it returns (the lock is lent to it meanwhile).
    """

    def __init__(
        self,
        owner: UpdateGroup[ModelT],
        opened: AbstractContextManager[Session],
        session: Session,
        group: list[_Job],
        driver: _Job,
        lend: Callable[[int], AbstractContextManager[None]] | None,
    ) -> None:
        self.owner = owner
        self.doc = owner._document
        self.opened = opened
        self.session = session
        self.group = group
        self.driver = driver
        self.lend = lend
        self.index = 0  # the job whose turn it is
        self.lent: list[AbstractContextManager[None]] = []  # the lock, lent to a driver
        self.txn = Transaction(self.doc, session, owner._history)
        self.loaded: Loaded[ModelT] | None = None
        self.fresh: list[ModelT] = []
        self.base: bytes | None = None  # the bytes of the state so far (None: as loaded)
        self.pending: list[_Job] = []  # the functions that counted since the last write
        self.writing: list[_Job] = []  # those whose write is under way

    def drive(self, *, resumed: bool) -> None:
        """Go on from the job whose turn it is, on this (the driver's) thread; end the
        round unless it was handed to another thread. Each job's outcome is in it."""
        error: BaseException | None = None
        try:
            if self._steps(resumed):
                return  # handed on
        except BaseException as e:
            error = e
            location = self.doc.location
            with self.owner._cond:
                for job in self.group:
                    if job.state == _DONE or job.error is not None or job.written:
                        continue  # its outcome is known (written: it stands)
                    if job is self.driver:
                        job.error = e
                    elif job in self.writing and not isinstance(e, Exception):
                        job.error = _uncertain(location)  # interrupted while it was written
                    else:
                        job.error = _failed_with(location, e)
        self._close(error)

    def _close(self, error: BaseException | None) -> None:
        cond = self.owner._cond
        try:
            while self.lent:
                self.lent.pop().__exit__(None, None, None)
            if error is None:
                self.opened.__exit__(None, None, None)
            else:
                self.opened.__exit__(type(error), error, error.__traceback__)
        except BaseException as e:  # the lock's release failed: as the plain update
            with cond:
                for job in self.group:
                    if job.state != _DONE and job.error is None and not job.written:
                        job.error = e if job is self.driver else _failed_with(self.doc.location, e)
        finally:
            with cond:
                self.owner._finish(self.group)

    def _steps(self, resumed: bool) -> bool:
        group = self.group
        if not resumed:
            me = self.driver
            if len(group) == 1:  # alone: the plain update, which also lets a large file go
                try:
                    me.checked = self.txn.update(me.fn)
                    me.data = b""
                except BaseException as e:
                    me.error = e
                return False
            self.fresh.append(self.txn.begin())
            self.loaded = self.txn.loaded
        while self.index < len(group):
            job = group[self.index]
            if job is self.driver:
                if not resumed:
                    self._turn()(job)
            elif self._give_turn(job):
                return True
            self._count(job)
            self.index += 1
        if not self.pending:
            self.txn.abort()
            return False
        self._publish()  # its error fails them all
        return False

    def _publish(self) -> None:
        """Write the state after the last function that counted; each of them is
        then written (an interruption meanwhile leaves them uncertain)."""
        pending = self.pending
        last = pending[-1]
        assert last.data is not None
        self.writing = pending
        last.checked = self.txn.publish(last.data, last.checked)
        for job in pending:
            job.written = True
        self.writing = []
        self.pending = []

    def _turn(self) -> Callable[[_Job], None]:
        """A job's run: its starting point and framing fixed now (a write before it
        returns changes the round's)."""
        doc = self.doc
        at, after = self.base, self.loaded
        assert after is not None
        given = self.fresh.pop() if at is None and self.fresh else None
        if given is not None:
            after.model = None  # type: ignore[assignment]  # the function's now

        def step(job: _Job) -> None:
            nonlocal given
            try:
                if given is not None:
                    state, given = given, None
                elif at is not None:
                    state = doc.parse(at).model
                elif after.raw is None:
                    state = doc.make_default()
                else:
                    state = doc.parse(after.raw).model
                job.after = after
                job.body, job.data, job.checked = _apply(doc, after, job.fn, state)
            except BaseException as e:
                job.error = e

        return step

    def _give_turn(self, job: _Job) -> bool:
        """Run ``job``'s function on its thread; True if the round was handed to it."""
        assert self.lend is not None
        cond = self.owner._cond
        with cond:
            if job.state != _QUEUED:
                return False  # it left the queue meanwhile (or a fork ended it)
            job.step = self._turn()
            lent: AbstractContextManager[None] | None = self.lend(job.thread)
            assert lent is not None
            lent.__enter__()  # before its function can start
            try:
                job.state = _RUNNING
                self.owner._wake(job)
                long = time.monotonic() + FLUSH_AFTER  # other wake-ups do not delay it
                while job.state == _RUNNING:
                    left = long - time.monotonic()
                    if left > 0:
                        self.owner._cv(job).wait(left)
                        continue
                    # It takes long: write what counted so far, hand it the round.
                    self._flush()
                    self.driver = job
                    job.round = self
                    self.lent.append(lent)
                    lent = None
                    return True
            finally:
                if lent is not None:
                    lent.__exit__(None, None, None)
        return False

    def _flush(self) -> None:
        """(cond held) Commit the functions that counted so far; every caller before
        the running one has its outcome."""
        owner = self.owner
        written = bool(self.pending)
        if written:
            self._publish()
        for job in self.group[: self.index]:  # their outcome, before anything else fails
            job.state = _DONE
            if job in owner._queue:
                owner._queue.remove(job)
        owner._wake(*self.group[: self.index])
        if written:
            self.txn = Transaction(self.doc, self.session, owner._history)
            self.fresh = [self.txn.begin()]
            self.loaded, self.base = self.txn.loaded, None

    def _count(self, job: _Job) -> None:
        """A job whose function ran: the next one starts from its state."""
        if job.error is not None or job.data is None:
            return
        loaded = self.loaded
        assert loaded is not None
        if job.after is not loaded:  # framed after a state written since: again
            try:
                assert job.body is not None
                job.data = self.doc.frame(job.body, loaded.schema, after=loaded)
                job.checked = self.doc.check(job.data)
            except BaseException as e:
                job.error = e
                return
        job.body = None  # needed no more: let it go (a group holds many states)
        self.base = job.data
        self.pending.append(job)


def _apply(
    doc: Document[ModelT],
    loaded: Loaded[ModelT],
    fn: Callable[[ModelT], ModelT | None],
    state: ModelT,
) -> tuple[bytes, bytes, ModelT]:
    """One function of a group: its state's dump, its exact bytes (framed after
    ``loaded``) and the model they load as."""
    return settle(doc, loaded, fn, state, fn(state))


def settle(
    doc: Document[ModelT],
    loaded: Loaded[ModelT],
    fn: object,
    state: ModelT,
    result: ModelT | None,
) -> tuple[bytes, bytes, ModelT]:
    """What a grouped function gave (a new model, or None: ``state`` changed in
    place) as its dump, its exact bytes framed after ``loaded``, and the model
    they load as; for the thread and the asyncio groups alike."""
    if result is not None:
        state = result
    doc.check_type(state, f"update(): {getattr(fn, '__qualname__', 'fn')} returned")
    body = doc.dump(state)
    del state, result
    data = doc.frame(body, loaded.schema, after=loaded)
    return body, data, doc.check(data)


def _failed_with(location: str, e: BaseException) -> BaseException:
    """The error a caller gets when its group's commit failed with ``e``."""
    if isinstance(e, Exception):
        return e  # the same error for every caller (as a future's result() gives it)
    return _interrupted(location)


def _uncertain(location: str) -> StateWriteError:
    return StateWriteError(
        location,
        "the thread writing this update together with other threads' updates was "
        "interrupted during the write: it may or may not have been written. Read the "
        "state to see, before running it again",
    )


def _interrupted(location: str) -> StateWriteError:
    return StateWriteError(
        location,
        "the update was not saved: the thread committing it with other threads' "
        "updates was interrupted before its commit; nothing of it was written. Run it again",
    )
