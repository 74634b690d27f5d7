"""The public lock: :class:`DirectoryLock` and its handles, and turns within a process.

This file is the API and the in-process half of acquiring: which thread or
handle of this process has a path's turn (:mod:`.registry` keeps the state),
reentrancy, the decorator, :meth:`DirectoryLock.for_file`. The cross-process
steps are functions of their own files (the package docstring lists them);
:class:`DirectoryLock` calls them with its path, canonical key and lease.

The public API's own rules (a held lock is a handle, not a thread; reentrancy
per thread; a waiter leaves cleanly however its wait ends; releasing nothing
is harmless; a file's lock follows its symlinks at every acquire) are stated
in :class:`DirectoryLock`'s docstring. The lock path must name the lock
directory itself (not ``""``, ``"."``, ``".."`` or a path ending in a
separator), and a ``lease`` that is not a finite number in ``(0, MAX_LEASE]``
is a ``ValueError`` when the lock is built, so no lock writes a record others
would read as garbage.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Final

from .._errors import LockCompromisedError, LockError
from . import registry
from .lease import verify_held
from .observe import LockStatus, observe, status_of
from .paths import canonical, check_lock_path, real_path
from .record import LockOwner
from .release import break_stale
from .turns import release_hold, take_turn, to_seconds, wait_time

__all__ = [
    "DEFAULT_LEASE",
    "MAX_LEASE",
    "AcquiredLock",
    "DirectoryLock",
]

log = logging.getLogger("statestore")

DEFAULT_LEASE: Final = 30.0
#: The longest lease: one an owner record can carry (its times end at 10**12 s).
MAX_LEASE: Final = 1e9


class AcquiredLock:
    """One level of a :class:`DirectoryLock`, as :meth:`DirectoryLock.acquire` returns it.

    ``with lock.acquire(timeout=5):`` holds the lock for the block and no
    longer (entering does not acquire again; leaving releases this level).
    :meth:`release` may be called from any thread, once; again, or after a
    ``fork()`` in the child, it does nothing. ``path`` is the lock directory
    this level holds, ``file`` (for :meth:`DirectoryLock.for_file`) the state
    file as it was resolved when the lock was taken.
    """

    __slots__ = ("_at", "_hold", "_origin", "_released", "file", "lock", "path", "thread")

    def __init__(
        self, origin: DirectoryLock, at: DirectoryLock, hold: registry.Hold, file: str | None
    ) -> None:
        self.lock = origin
        self.path = at.path
        self.file = file
        self.thread = threading.get_ident()
        self._origin = origin
        self._at = at
        self._hold = hold
        self._released = False

    def __repr__(self) -> str:
        state = "held" if self.is_held else "released"
        return f"<AcquiredLock {self.path!r} {state}>"

    @property
    def is_held(self) -> bool:
        """Whether this level is still held (by this process)."""
        hold = self._hold
        return not self._released and hold.pid == registry.PID and self._at._st.hold is hold

    def release(self) -> None:
        """Release this level; the lock directory goes with the last level."""
        origin = self._origin
        with origin._taken_lock:
            if self._released:
                return
            self._released = True
            with contextlib.suppress(ValueError):
                origin._taken.remove(self)
        self._at._release_hold(self._hold)

    @contextlib.contextmanager
    def lent_to(self, thread: int) -> Iterator[None]:
        """For the block, ``thread`` is the one that may nest on this hold.

        A store that commits the updates of several threads together holds the
        lock once and runs each thread's function on that thread: while it runs,
        the thread may take the lock again (a store of another file under the
        same lock, as if it held it itself). The hold is given back however the
        block ends.
        """
        hold = self._hold
        before = hold.thread
        hold.thread = thread
        try:
            yield
        finally:
            hold.thread = before

    def verify(self) -> None:
        """Raise :class:`LockCompromisedError` unless this level is still held and the
        lock still ours (see :meth:`DirectoryLock.verify`)."""
        if self._hold.pid != registry.PID:
            raise LockCompromisedError(
                self.path,
                "the lock belongs to the parent process: a forked child holds none of "
                "its parent's locks; nothing was written",
            )
        st = self._at._st
        held = st.held
        if self._released or st.hold is not self._hold or held is None:
            raise LockCompromisedError(self.path, "this lock was released; nothing was written")
        verify_held(self._at.path, held)

    def __enter__(self) -> DirectoryLock:
        return self.lock

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class DirectoryLock(contextlib.ContextDecorator):
    """A lock shared by processes (and threads), made of the directory ``path``.

    >>> with DirectoryLock("/tmp/app/state.json.lock"):  # doctest: +SKIP
    ...     ...  # one holder at a time, across processes and hosts

    ``timeout`` is how long :meth:`acquire` waits by default (negative or
    ``float("inf")``: forever); ``lease`` how long the lock stays valid without
    a heartbeat (the holder refreshes it every third of that). The object is
    also a decorator: the function runs under the lock.

    Rules of the public API (``docs/locking.md``, "Threads"):

    * **A held lock is a handle, not a thread.** :meth:`acquire` returns an
      :class:`AcquiredLock`; whoever has it releases it, from any thread. A
      ``with`` block entered on one thread and left on another releases what
      it took. The store's locked operations go through handles, so a
      transaction that ends on another thread never leaks its lock.
    * **Reentrancy is per thread.** A thread that holds the lock may acquire it
      again without waiting (through any DirectoryLock object on the same
      path); each level is released on its own, the directory goes with the
      last. Other threads wait their turn in memory, first come first served.
    * **Waiting ends cleanly, however it ends.** A timeout, ``cancel_check()``
      returning true or raising, a ``KeyboardInterrupt`` or any other exception
      while queued removes the waiter from the queue (a turn already handed to
      it is passed on), so nobody waits for a waiter that left and a later
      :meth:`acquire` really takes the lock. From the moment a thread is given
      the path's turn until it holds the directory, one handler gives the turn
      back, so no interrupt in between can strand it. Waits are sliced, so no timeout,
      ``inf`` included, can overflow a system call.
    * **Release is harmless when there is nothing to release**: :meth:`release`
      on a thread that holds no level taken through this object, a second
      :meth:`AcquiredLock.release`, or one in a forked child, does nothing.
    * **A lock built by** :meth:`for_file` **follows the file**: each acquire
      resolves the state file's real path again and takes ``<real path>.lock``;
      its handle releases that same directory, wherever the link points by then.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self._setup(os.fspath(path), timeout, lease, None)

    def _setup(self, path: str, timeout: float, lease: float, follows: str | None) -> None:
        check_lock_path(path)
        # A lease the owner record cannot carry (NaN, inf, past its range) would make
        # every other process read our record as garbage and break a live lock.
        if not 0 < to_seconds(lease) <= MAX_LEASE:
            raise ValueError(f"lease must be a number of seconds in (0, {MAX_LEASE:g}]")
        if math.isnan(to_seconds(timeout)):
            raise ValueError(
                "timeout must be a number of seconds (negative: wait forever), not NaN"
            )
        self.path = os.path.abspath(path)
        self.timeout = timeout
        self.lease = float(lease)
        self._key = canonical(self.path)
        # Keeps this path's per-process state alive as long as this object lives.
        self._st = registry.state(self._key)
        #: For :meth:`for_file`: the state file whose lock this is, and the lock at
        #: its last resolution.
        self._follows = follows
        self._inner: DirectoryLock | None = None
        #: Levels taken through this object and not yet released, oldest first.
        self._taken: list[AcquiredLock] = []
        self._taken_lock = threading.Lock()

    @classmethod
    def for_file(
        cls,
        file: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        lease: float = DEFAULT_LEASE,
    ) -> DirectoryLock:
        """The lock of the state file ``file``: ``<real path of file>.lock``.

        Beside the file a symlink points to, so that stores opened through a link
        and through its target share one lock; resolved again at every acquire,
        so a link switched meanwhile (a deploy's ``current``) takes the lock of
        the file it now names. ``path`` is the lock as last resolved.
        """
        file = os.path.abspath(os.fspath(file))
        lock = cls.__new__(cls)
        lock._setup(os.path.realpath(file) + ".lock", timeout, lease, file)
        return lock

    def __getstate__(self) -> dict[str, Any]:
        # What the lock is, not what this process holds: a copy elsewhere holds nothing.
        return {
            "path": self.path,
            "timeout": self.timeout,
            "lease": self.lease,
            "follows": self._follows,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["path"], state["timeout"], state["lease"], state["follows"])

    def __repr__(self) -> str:
        if self._follows is not None:
            return (
                f"DirectoryLock.for_file({self._follows!r}, timeout={self.timeout!r}, "
                f"lease={self.lease!r})"
            )
        return f"DirectoryLock({self.path!r}, timeout={self.timeout!r}, lease={self.lease!r})"

    # ----------------------------------------------------------------- public API

    def _at(self) -> DirectoryLock:
        """The lock to act on: this one, or (:meth:`for_file`) the one beside the file now."""
        if self._follows is None:
            return self
        path = real_path(self._follows) + ".lock"
        inner = self._inner
        if inner is None or inner.path != path:
            inner = DirectoryLock(path, timeout=self.timeout, lease=self.lease)
            self._inner = inner
            self.path, self._key, self._st = inner.path, inner._key, inner._st
        return inner

    @property
    def is_held(self) -> bool:
        """Whether the calling thread holds this lock."""
        me = threading.get_ident()
        if any(h.thread == me and h.is_held for h in self._taken):
            return True
        st = self._at()._st
        hold = st.hold
        return (
            hold is not None
            and hold.thread == me
            and st.held is not None
            and hold.pid == registry.PID
        )

    def acquire(
        self,
        timeout: float | None = None,
        *,
        blocking: bool = True,
        cancel_check: Callable[[], bool] | None = None,
    ) -> AcquiredLock:
        """Wait until this thread holds the lock, or raise :class:`LockTimeout`.

        ``timeout`` in seconds (None: the lock's own; negative or ``inf``:
        forever); ``blocking=False`` tries once. ``cancel_check`` is called while
        waiting (at least every :data:`GIVE_UP_POLL` seconds): when it returns
        true the wait ends with :class:`WaitAbandoned` (a LockTimeout).

        Returns the :class:`AcquiredLock` for this level: ``with
        lock.acquire(timeout=5):`` releases it at the end of the block.
        """
        wait = wait_time(timeout, self.timeout, blocking)
        return self._take(wait, cancel_check, threading.get_ident(), None)

    def _acquire(self, timeout: float | None, gave_up: Callable[[], bool] | None) -> AcquiredLock:
        """:meth:`acquire` with a ``cancel_check`` (kept for the asyncio store)."""
        return self.acquire(timeout, cancel_check=gave_up)

    def _take(
        self, wait: float, gave_up: Callable[[], bool] | None, thread: int | None, task: object
    ) -> AcquiredLock:
        """Take one level: reentrant for ``thread`` (None: for nobody), held for ``task``."""
        at = self._at()
        hold = at._turn(wait, gave_up, thread, task)
        handle = AcquiredLock(self, at, hold, at.path[:-5] if self._follows is not None else None)
        with self._taken_lock:
            self._taken.append(handle)
        return handle

    def _turn(
        self, wait: float, gave_up: Callable[[], bool] | None, thread: int | None, task: object
    ) -> registry.Hold:
        return take_turn(self.path, self._key, self.lease, self._st, wait, gave_up, thread, task)

    def _release_hold(self, hold: registry.Hold) -> None:
        """Release one level of ``hold``; the directory goes with the last level."""
        release_hold(self.path, self.lease, self._st, hold)

    def _mine(self, fallback: bool) -> AcquiredLock | None:
        """The newest level this thread took through this object (or, with
        ``fallback``, the newest of any thread: a block entered on another one)."""
        me = threading.get_ident()
        with self._taken_lock:
            for handle in reversed(self._taken):
                if handle.thread == me:
                    return handle
            return self._taken[-1] if fallback and self._taken else None

    def release(self) -> None:
        """Release one level this thread took through this object.

        Nothing happens when it holds none (as with filelock). To release from
        another thread, call :meth:`AcquiredLock.release` on what acquire() returned.
        """
        handle = self._mine(fallback=False)
        if handle is None:
            log.debug(
                "release() of lock %s, which this thread does not hold: nothing to do", self.path
            )
            return
        handle.release()

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The level this block took: this thread's newest, or, for a block entered
        # on another thread (a generator resumed elsewhere), the newest of all.
        handle = self._mine(fallback=True)
        if handle is not None:
            handle.release()

    def owner(self) -> LockOwner | None:
        """The current owner record, or None when the lock is free or being created."""
        at = self._at()
        return observe(at.path, at._key).owner

    def status(self) -> LockStatus:
        """What is at the lock path now: free, held, being created or stale, and by whom.

        Only looks; nothing is changed. Raises :class:`LockError` when what is
        at the path is not a lock (a link, a file, a folder statestore did not
        make) or cannot be inspected.
        """
        at = self._at()
        return status_of(at.path, observe(at.path, at._key))

    def verify(self) -> None:
        """Raise :class:`LockCompromisedError` unless this thread still holds the lock.

        Called by the store right before it publishes a save: a holder that was
        suspended past its lease must not write over the next holder's work.
        """
        handle = self._mine(fallback=False)
        if handle is not None and handle.is_held:
            handle.verify()
            return
        at = self._at()
        st = at._st
        hold, held = st.hold, st.held
        if held is None or hold is None or hold.thread != threading.get_ident():
            raise LockCompromisedError(at.path, "the lock is not held by this thread")
        if hold.pid != registry.PID:
            raise LockCompromisedError(
                at.path, "the lock belongs to the parent process: a forked child holds none"
            )
        verify_held(at.path, held)

    def break_lock(self, *, force: bool = False) -> LockOwner | None:
        """Break the lock if it is stale (or, with ``force``, even if it is not).

        Returns the owner record of the lock that was broken, or None when there
        was nothing to break. A live lock without ``force`` raises :class:`LockError`.
        """
        at = self._at()
        seen = observe(at.path, at._key)
        if seen.ino is None:
            return None
        if not seen.stale and not force:
            raise LockError(
                at.path,
                f"the lock is live ({seen.reason}); use force to break it anyway",
                errno=errno.EBUSY,
            )
        log.debug("breaking lock %s (%s%s)", at.path, "forced; " if force else "", seen.reason)
        if not break_stale(at.path, at._key, at.lease, seen, force=force):
            raise LockError(
                at.path, "the lock changed while breaking it; look again", errno=errno.EAGAIN
            )
        return seen.owner
