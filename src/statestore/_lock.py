"""A cross-process lock made of a directory, that recovers from crashed holders.

Protocol (``docs/locking.md`` has the full story, ``spec/`` a checked model):

* **Acquire**: ``mkdir(L)``. The winner writes its owner record into the
  directory *it* created (through a directory file descriptor, so a write can
  never land in somebody else's lock) and checks that ``L`` is still that
  directory.
* **Stale locks**: a holder that is provably dead or whose lease has expired
  may be broken. Only evidence that cannot collide proves a holder dead: its
  record carries our boot id and our pid namespace, and its pid is gone or now
  belongs to a process with another start time. The same host name with
  another boot id, another pid namespace, or a ``/proc`` that hides the pid
  (``hidepid``) prove nothing: the lease decides (``_owner.py``). Breaking
  first takes the instance's *claim* (a symbolic link ``L/claim`` naming its
  maker, made through a descriptor of the instance, so it guards that
  instance and no other), re-checks that ``L`` is
  still the stale instance it inspected, and only then renames ``L`` aside in
  one atomic step. Two breakers cannot both win, and a fresh lock taken
  meanwhile is never removed. ``rmdir`` then ``mkdir`` would let both in
  (proper-lockfile#121).
* **Release**: by token, never a blind ``rmdir``. While the lease has time
  left nobody else may remove the instance, so it is renamed aside at once;
  near the end of the lease the release goes through the claim, like a break.
* **Lease**: the holder's heartbeat thread pushes the expiry in its owner
  record forward; a holder that stops (SIGSTOP, a sleeping laptop) loses the
  lock once the lease has run out, and finds out at :meth:`DirectoryLock.verify`,
  which the store calls right before its commit rename.
* **Only a statestore lock is ever touched.** The lock path must name the lock
  directory itself (not ``""``, ``"."``, ``".."`` or a path ending in a
  separator). Whatever is at the lock path is looked at with ``lstat`` and
  opened with ``O_NOFOLLOW | O_DIRECTORY``: a symbolic link (to a folder, to a
  file, dangling), a regular file, a FIFO, a socket or a device there, or a
  directory that holds entries a lock never holds and no usable owner record,
  is a :class:`LockError` naming the path and what is there, at once, and is
  left as it is. An empty directory without an owner record is a lock being
  created; only after the creation grace is it stale. A lock is taken apart by
  its known entries and ``rmdir`` (``_claim.py``), never by a recursive delete.
* **Bad records are garbage.** An owner record or claim with a field of the
  wrong type or out of range is unusable, judged by its age like a record
  that does not parse; no such value reaches a system call. So a lock never
  writes one: a ``lease`` that is not a finite number in ``(0, MAX_LEASE]``
  is a ``ValueError`` when the lock is built.

Claims and moving instances aside live in ``_claim.py``; the per-process state
of lock paths and the heartbeat thread in ``_lease.py``; the owner record in
``_owner.py``.

The public API's own rules (a held lock is a handle, not a thread; reentrancy
per thread; a waiter leaves cleanly however its wait ends; releasing nothing
is harmless; a file's lock follows its symlinks at every acquire) are stated
in :class:`DirectoryLock`'s docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import random
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from . import _lease
from ._claim import (
    CLAIM_GRACE,
    drop_claim,
    foreign_entries,
    live_claim,
    move_aside,
    remove_instance,
    sweep_aside,
    take_claim,
)
from ._errors import LockCompromisedError, LockError, LockTimeout, WaitAbandoned
from ._handoff import WaitQueue
from ._lease import Held
from ._owner import (
    OWNER_FILE,
    LockOwner,
    holder_alive,
    identity,
    new_owner,
    read_owner_at,
    write_owner,
)

__all__ = [
    "DEFAULT_LEASE",
    "MAX_LEASE",
    "AcquiredLock",
    "DirectoryLock",
    "LockOwner",
    "WaitAbandoned",
    "wait_time",
]

log = logging.getLogger("statestore")

DEFAULT_LEASE: Final = 30.0
#: The longest lease: one an owner record can carry (its times end at 10**12 s).
MAX_LEASE: Final = 1e9
#: A lock directory without a readable owner record is "being created" for this long.
CREATE_GRACE: Final = 2.0
#: Extra time granted to holders on other hosts, whose clocks may disagree with ours.
CLOCK_SKEW: Final = 5.0
#: Polling bounds (seconds): full jitter between 0 and min(cap, base * 2**attempt).
BACKOFF_BASE: Final = 0.002
BACKOFF_CAP: Final = 0.1
#: A waiter that has not reached the head of the local queue after this long polls anyway,
#: so a stuck waiter ahead of it cannot hold everyone up.
QUEUE_PATIENCE: Final = 1.0
#: How often a waiter that may be abandoned (see ``DirectoryLock._acquire``) asks.
GIVE_UP_POLL: Final = 0.2
#: The longest single wait on a condition: threading refuses timeouts past an OS limit
#: (``timeout=inf`` would overflow), so long waits are cut into slices.
MAX_WAIT_SLICE: Final = 60.0


@dataclass
class _Observation:
    """What a waiter saw when it looked at a lock held by somebody else."""

    ino: tuple[int, int] | None
    owner: LockOwner | None
    alive: bool | None
    stale: bool
    reason: str


def _canonical(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _real_path(file: str) -> str:
    """``file`` with every symlink resolved; a link that cannot be read is an error.

    (``os.path.realpath`` alone takes an unreadable link for a plain name, which
    would name another lock.) A file or folder that does not exist yet is fine,
    and so is a loop of links: reading the file then says what is wrong.
    """
    try:
        try:
            return os.path.realpath(file, strict=True)
        except OSError as e:
            if not isinstance(e, FileNotFoundError) and e.errno != errno.ELOOP:
                raise
            return os.path.realpath(file)
    except OSError as e:
        raise LockError(
            file,
            f"cannot resolve the state file's path to find its lock ({e.strerror or e})",
            errno=e.errno,
        ) from e


def wait_time(timeout: float | None, default: float, blocking: bool = True) -> float:
    """Seconds to wait: ``timeout`` (``default`` when None); negative or ``inf``: forever."""
    if not blocking:
        return 0.0
    seconds = _seconds(default if timeout is None else timeout)
    if math.isnan(seconds):
        raise ValueError("timeout must be a number of seconds (negative: wait forever), not NaN")
    return math.inf if seconds < 0 else seconds + 0.0  # + 0.0: no "-0 s" in messages


def _seconds(value: float) -> float:
    """``value`` as a float; an int too large for one (``10**400``) is +-inf, not an
    ``OverflowError``."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


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
        self, origin: DirectoryLock, at: DirectoryLock, hold: _lease.Hold, file: str | None
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
        return not self._released and hold.pid == _lease.PID and self._at._st.hold is hold

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

    def verify(self) -> None:
        """Raise :class:`LockCompromisedError` unless this level is still held and the
        lock still ours (see :meth:`DirectoryLock.verify`)."""
        if self._hold.pid != _lease.PID:
            raise LockCompromisedError(
                self.path,
                "the lock belongs to the parent process: a forked child holds none of "
                "its parent's locks; nothing was written",
            )
        st = self._at._st
        held = st.held
        if self._released or st.hold is not self._hold or held is None:
            raise LockCompromisedError(self.path, "this lock was released; nothing was written")
        self._at._verify_held(held)

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
        _check_lock_path(path)
        # A lease the owner record cannot carry (NaN, inf, past its range) would make
        # every other process read our record as garbage and break a live lock.
        if not 0 < _seconds(lease) <= MAX_LEASE:
            raise ValueError(f"lease must be a number of seconds in (0, {MAX_LEASE:g}]")
        if math.isnan(_seconds(timeout)):
            raise ValueError(
                "timeout must be a number of seconds (negative: wait forever), not NaN"
            )
        self.path = os.path.abspath(path)
        self.timeout = timeout
        self.lease = float(lease)
        self._key = _canonical(self.path)
        # Keeps this path's per-process state alive as long as this object lives.
        self._st = _lease.state(self._key)
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
        path = _real_path(self._follows) + ".lock"
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
            and hold.pid == _lease.PID
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
    ) -> _lease.Hold:
        st = self._st
        deadline = time.monotonic() + wait
        mine: _lease.Hold | None = None
        # One protected region from taking the turn to the directory: an interrupt
        # that lands between the two (after the turn is ours, before a try that would
        # give it back) would leave the turn with nobody, and every later acquire of
        # the path in this process would wait for it.
        try:
            with st.cond:
                hold = st.hold
                if (
                    thread is not None
                    and hold is not None
                    and hold.thread == thread
                    and hold.count
                    and hold.pid == _lease.PID
                ):
                    hold.count += 1
                    return hold
                mine = _lease.Hold(thread, task)
                # Other threads of this process wait here, not on the file system.
                if hold is None and not st.waiting:
                    st.hold = mine
                else:
                    st.waiting.append(mine)
                    log.debug(
                        "waiting for lock %s: another thread of this process holds it", self.path
                    )
                    try:
                        while st.hold is not mine:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                held = st.held
                                raise LockTimeout(
                                    self.path,
                                    timeout=wait,
                                    holder=held.owner.describe() if held else None,
                                    alive=True,
                                )
                            if gave_up is not None:
                                # Asked without the state's mutex: a cancel_check may
                                # take its time, or look at the lock, without stalling
                                # a release.
                                st.cond.release()
                                try:
                                    stop = gave_up()
                                finally:
                                    st.cond.acquire()
                                if stop:
                                    raise WaitAbandoned(self.path, timeout=wait)
                                if st.hold is mine:
                                    break
                                remaining = min(remaining, GIVE_UP_POLL)
                            st.cond.wait(min(remaining, MAX_WAIT_SLICE))
                    except BaseException:
                        # Whatever ended the wait (a timeout, KeyboardInterrupt, an
                        # error in gave_up): leave the queue, and pass on a turn
                        # handed to us meanwhile.
                        if st.hold is mine:
                            st.pass_turn_locked()
                        else:
                            with contextlib.suppress(ValueError):
                                st.waiting.remove(mine)
                        raise
            assert mine is not None  # the reentrant case returned above
            held = self._acquire_dir(deadline, wait, st.queue, gave_up)
        except BaseException:
            with st.cond:
                if mine is not None and st.hold is mine:
                    st.pass_turn_locked()
                elif mine is not None:
                    with contextlib.suppress(ValueError):
                        st.waiting.remove(mine)
            raise
        try:
            with st.cond:
                st.held = held
                mine.count = 1
            _lease.mark_held(st, True)
            if _lease.first_sweep(self._key):
                sweep_aside(self.path)
            _lease.heartbeat(_refresh_held).start(held.next_refresh)
        except BaseException:
            # Interrupted here: give back what we took (the directory is ours either way).
            with st.cond:
                st.held, mine.count = held, 1
            self._release_hold(mine)
            raise
        log.debug("acquired lock %s", self.path)
        return mine

    def _release_hold(self, hold: _lease.Hold) -> None:
        """Release one level of ``hold``; the directory goes with the last level."""
        st = self._st
        with st.cond:
            if st.hold is not hold or hold.count == 0 or hold.pid != _lease.PID:
                return  # not ours (any more): a forked child, or released already
            hold.count -= 1
            if hold.count:
                return
            held, st.held = st.held, None
        _lease.mark_held(st, False)
        try:
            if held is not None:
                self._release_dir(held, st.queue)
        finally:
            st.pass_turn()
        log.debug("released lock %s", self.path)

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
        return self._at()._observe().owner

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
        if hold.pid != _lease.PID:
            raise LockCompromisedError(
                at.path, "the lock belongs to the parent process: a forked child holds none"
            )
        at._verify_held(held)

    def _verify_held(self, held: Held) -> None:
        if held.lost:
            raise LockCompromisedError(self.path, held.lost)
        now = time.time()
        if now >= held.owner.expires_at:
            raise LockCompromisedError(
                self.path,
                f"our lease ran out {now - held.owner.expires_at:.1f} s ago (the process was "
                "suspended or too slow to refresh it), so another process may hold the "
                "lock now; nothing was written. Retry the operation, or raise 'lease'",
            )
        try:
            try:
                ours = held.token_mark in read_owner_at(self.path)
            except FileNotFoundError:
                ours = False
            # A claim in our lock is a breaker that will back off (our lease is live)
            # or one that judged it stale: wait for it to decide rather than fail now.
            state = self._settle(held.dirfd, held.ino, patience=CLAIM_GRACE) if ours else ""
        except OSError as e:
            raise LockCompromisedError(
                self.path,
                f"could not confirm that the lock is still ours ({e.strerror or e}); "
                "nothing was written",
            ) from e
        if not ours:
            raise LockCompromisedError(
                self.path,
                "the lock was broken by another process after our lease ran out; "
                "nothing was written. Retry the operation, or raise 'lease'",
            )
        if state != "ours":
            raise LockCompromisedError(
                self.path, "another process is breaking this lock; nothing was written"
            )

    def break_lock(self, *, force: bool = False) -> LockOwner | None:
        """Break the lock if it is stale (or, with ``force``, even if it is not).

        Returns the owner record of the lock that was broken, or None when there
        was nothing to break. A live lock without ``force`` raises :class:`LockError`.
        """
        at = self._at()
        seen = at._observe()
        if seen.ino is None:
            return None
        if not seen.stale and not force:
            raise LockError(
                at.path,
                f"the lock is live ({seen.reason}); use force to break it anyway",
                errno=errno.EBUSY,
            )
        log.debug("breaking lock %s (%s%s)", at.path, "forced; " if force else "", seen.reason)
        if not at._break(seen, force=force):
            raise LockError(
                at.path, "the lock changed while breaking it; look again", errno=errno.EAGAIN
            )
        return seen.owner

    # -------------------------------------------------------------- the protocol

    def _acquire_dir(
        self,
        deadline: float,
        timeout: float,
        queue: WaitQueue,
        gave_up: Callable[[], bool] | None = None,
    ) -> Held:
        started = time.monotonic()
        seen: _Observation | None = None
        # Who we are (read from /proc once per process, milliseconds in a fresh one)
        # before mkdir, not between mkdir and the owner record: a process killed in
        # that window leaves a lock that others must wait out the creation grace for.
        identity()
        # An immediate first try, unless others on this host are already queued.
        if not queue.has_waiters():
            got = self._try_once()
            if isinstance(got, Held):
                return got
            seen = got
        ticket = queue.join()
        try:
            attempt = 0
            woken = False
            while True:
                # A release wakes the oldest waiter; the others need not look until then.
                first = (
                    ticket is None
                    or woken
                    or time.monotonic() - started >= QUEUE_PATIENCE
                    or ticket.is_first()
                )
                if first:
                    got = self._try_once()
                    if isinstance(got, Held):
                        return got
                    seen = got or seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeout(
                        self.path,
                        timeout=timeout,
                        holder=seen.owner.describe() if seen and seen.owner else None,
                        alive=seen.alive if seen else None,
                    )
                if gave_up is not None and gave_up():
                    raise WaitAbandoned(self.path)
                delay = min(
                    remaining, random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
                )
                attempt += 1
                if seen is not None and attempt in (1, 8):
                    log.debug(
                        "waiting for lock %s (%s)",
                        self.path,
                        f"held by pid {seen.owner.pid} on {seen.owner.host}"
                        if seen.owner
                        else seen.reason,
                    )
                if ticket is None:
                    time.sleep(delay)
                    continue
                # The head polls with backoff (the holder may be on another host, or
                # dead without a release to wake anyone); the rest wait for their turn,
                # looking now and then in case the waiters ahead of them died.
                patience = min(remaining, QUEUE_PATIENCE / 2)
                if gave_up is not None:
                    patience = min(patience, GIVE_UP_POLL)
                woken = ticket.wait(delay if first else patience)
                if woken:
                    attempt = 0  # woken by a release: try at once
        finally:
            if ticket is not None:
                ticket.leave()

    def _try_once(self) -> Held | _Observation | None:
        """One attempt: the lock, or what stands in the way (None: try again now)."""
        try:
            os.mkdir(self.path)
        except FileExistsError:
            seen = self._observe()
            if seen.stale and seen.ino is not None:
                self._break(seen)
                return None
            return seen
        except FileNotFoundError:
            # The state folder does not exist yet: statestore creates it on first save.
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            except OSError as e:
                raise self._os_error(e, "create the folder for") from e
            return None
        except OSError as e:
            raise self._os_error(e, "create") from e
        return self._publish()

    def _publish(self) -> Held | None:
        """Write our owner record into the directory we just created."""
        try:
            dirfd = os.open(self.path, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return None  # replaced meanwhile: the next look says by what
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None
            self._abandon(None, False, e)
            raise self._os_error(e, "open") from e
        recorded = False
        try:
            fd_stat = os.fstat(dirfd)
            owner = new_owner(self.lease)
            # O_EXCL: a record already there means this is not the directory we made.
            # A reader that catches the record half-written treats it as a lock
            # "being created", so no temp file and rename are needed here.
            fd = os.open(
                OWNER_FILE,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o644,
                dir_fd=dirfd,
            )
            recorded = True
            try:
                os.write(fd, owner.to_json())
            finally:
                os.close(fd)
            ino = (fd_stat.st_dev, fd_stat.st_ino)
        except FileExistsError:
            os.close(dirfd)
            return None
        except OSError as e:
            self._abandon(dirfd, recorded, e)
            raise self._os_error(e, "write the owner record of") from e
        held = Held(owner=owner, dirfd=dirfd, ino=ino)
        # Only now, with the record written, is it safe to look: a breaker that judged
        # our record-less directory stale may be between its re-check and its rename.
        # Its claim is in our directory until it decides (spec/: without this check,
        # a creator stalled past the grace and its breaker both hold the lock).
        try:
            state = self._settle(dirfd, ino, patience=2 * CLAIM_GRACE)
        except OSError as e:
            self._abandon(dirfd, True, e)
            raise self._os_error(e, "inspect") from e
        if state == "claimed":
            # A claim stuck in the lock we just made: its maker died in the claim's
            # window. The lock is ours alone to take apart (our record is in it).
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == ino:
                    remove_instance(move_aside(self.path, "released"), dirfd)
        if state != "ours":
            with contextlib.suppress(OSError):
                os.close(dirfd)
            return None
        held.next_refresh = time.monotonic() + self.lease / 3
        return held

    def _settle(self, dirfd: int, ino: tuple[int, int], patience: float) -> str:
        """After writing into our instance: "ours" (at the lock path, no claim in it),
        "moved" (broken), or "claimed" (a claim still undecided after ``patience``).

        Raises OSError when the file system cannot tell.
        """
        give_up = time.monotonic() + patience
        while True:
            # Claims first, then the path: a breaker claims before it renames, so "no
            # claim, then still ours at L" leaves it no gap. The other order misses a
            # breaker that claims, renames and deletes between the two looks.
            claimed = live_claim(dirfd)
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                return "moved"
            if (st.st_dev, st.st_ino) != ino:
                return "moved"
            if not claimed:
                return "ours"
            if time.monotonic() >= give_up:
                return "claimed"
            time.sleep(0.001)

    def _abandon(self, dirfd: int | None, recorded: bool, cause: OSError) -> None:
        """Take apart the directory we made but could not publish, so nobody waits for it."""
        log.warning("lock %s: could not publish the owner record (%s)", self.path, cause)
        with contextlib.suppress(OSError):
            if dirfd is not None:
                try:
                    made = os.fstat(dirfd)
                    if recorded:
                        os.unlink(OWNER_FILE, dir_fd=dirfd)
                    now = os.lstat(self.path)
                    if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
                        return
                finally:
                    with contextlib.suppress(OSError):
                        os.close(dirfd)
            os.rmdir(self.path)  # only an empty directory: never somebody's published lock

    def _observe(self) -> _Observation:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return _Observation(None, None, None, False, "free")
        except OSError as e:
            raise self._os_error(e, "inspect") from e
        if not stat.S_ISDIR(st.st_mode):
            raise self._not_a_lock(st)
        ino = (st.st_dev, st.st_ino)
        now = time.time()
        try:
            owner = LockOwner.from_json(read_owner_at(self.path))
        except FileNotFoundError:
            self._foreign_check(ino, None)
            age = max(now - st.st_mtime, _lease.state(self._key).unrecorded_for(ino))
            return _Observation(
                ino,
                None,
                None,
                age > CREATE_GRACE,
                f"no owner record for {age:.1f} s (being created, or its creator died)",
            )
        except PermissionError as e:
            raise self._os_error(e, "read the owner record of") from e
        except (OSError, ValueError) as e:
            self._foreign_check(ino, e)
            try:
                age = now - os.lstat(os.path.join(self.path, OWNER_FILE)).st_mtime
            except OSError:
                age = now - st.st_mtime
            age = max(age, _lease.state(self._key).unrecorded_for(ino))
            return _Observation(
                ino, None, None, age > CREATE_GRACE, f"unreadable owner record ({e})"
            )
        alive = holder_alive(owner)
        if alive is False:
            return _Observation(
                ino,
                owner,
                False,
                True,
                f"holder pid {owner.pid} on {owner.host} is no longer running",
            )
        expiry = owner.expires_at + (CLOCK_SKEW if alive is None else 0.0)
        if now > expiry:
            return _Observation(
                ino,
                owner,
                alive,
                True,
                f"lease of pid {owner.pid} on {owner.host} expired "
                f"{now - owner.expires_at:.1f} s ago",
            )
        return _Observation(ino, owner, alive, False, f"held by pid {owner.pid} on {owner.host}")

    def _not_a_lock(self, st: os.stat_result) -> LockError:
        """The error for something at the lock path that is not a directory."""
        what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a directory")
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(self.path)
            except OSError:
                target = "?"
            gone = "" if os.path.exists(self.path) else ", which does not exist"
            return LockError(
                self.path,
                f"the lock path is a symbolic link (to {target!r}{gone}), not a lock "
                "directory; statestore never follows a link there. Remove the link, or "
                "give the lock a path of its own",
                errno=errno.ELOOP,
            )
        return LockError(
            self.path,
            f"the lock path is {what}, not a directory; statestore did not make it. "
            "Move it away if nothing else uses it, or give the lock a path of its own",
            errno=errno.ENOTDIR,
        )

    def _foreign_check(self, ino: tuple[int, int], cause: Exception | None) -> None:
        """Raise :class:`LockError` if the directory at the lock path, which has no
        usable owner record, holds entries no lock instance holds: it is not a lock
        (a project folder, the working directory), and must not be broken."""
        try:
            dirfd = os.open(self.path, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return  # gone or replaced meanwhile: the next look says by what
        except OSError as e:
            if e.errno == errno.ELOOP:
                return
            raise self._os_error(e, "inspect") from e
        try:
            made = os.fstat(dirfd)
            if (made.st_dev, made.st_ino) != ino:
                return
            foreign = foreign_entries(dirfd)
        except OSError as e:
            raise self._os_error(e, "list") from e
        finally:
            with contextlib.suppress(OSError):  # the descriptor is gone either way
                os.close(dirfd)
        if not foreign:
            return
        shown = ", ".join(repr(n) for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        record = "no owner record" if cause is None else f"no usable owner record ({cause})"
        raise LockError(
            self.path,
            f"the lock path is a directory that statestore did not make: it holds {shown} "
            f"and {record}. It was left untouched; move it away, or give the lock a "
            "path of its own",
            errno=errno.EEXIST,
        )

    def _claim(self, dirfd: int) -> str | None:
        try:
            return take_claim(dirfd, self.lease)
        except OSError as e:
            raise self._os_error(e, "claim") from e

    def _break(self, seen: _Observation, *, force: bool = False) -> bool:
        try:
            dirfd = os.open(self.path, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:
                return False  # replaced by a symbolic link: the next look reports it
            raise self._os_error(e, "open") from e
        try:
            try:
                st = os.fstat(dirfd)
            except OSError as e:
                raise self._os_error(e, "inspect") from e
            if (st.st_dev, st.st_ino) != seen.ino:
                return False  # not the instance we judged stale
            claim = self._claim(dirfd)
            if claim is None:
                return False
            try:
                now = self._observe()
                same = now.ino == seen.ino and (
                    (now.owner.token if now.owner else None)
                    == (seen.owner.token if seen.owner else None)
                )
                # Our own claim has just moved the directory's mtime, so an instance
                # that still has no owner record would look freshly made to a process
                # that saw it only now: it is the same instance we judged stale before.
                if not same or not (now.stale or force or now.owner is None):
                    drop_claim(dirfd, claim)
                    return False
                # The path still holds the instance we claimed (same inode, and only a
                # claim holder removes a stale instance): move it aside in one step.
                aside = move_aside(self.path, "broken")
            except BaseException as e:
                drop_claim(dirfd, claim)
                if isinstance(e, OSError) and not isinstance(e, LockError):
                    raise self._os_error(e, "break") from e
                raise
            log.warning("broke stale lock %s: %s", self.path, seen.reason)
            # Through the descriptor of the instance we claimed: whatever has been put
            # at the aside name meanwhile, only that instance's own entries go.
            remove_instance(aside, dirfd)
        finally:
            with contextlib.suppress(OSError):  # the descriptor is gone either way
                os.close(dirfd)
        return True

    def _lost(self, held: Held) -> bool:
        """For release: whether the instance at ``path`` is no longer ours.

        A read error proves nothing: while our lease runs nobody may break the lock,
        and a release that gives up leaves a live lock that everyone waits for.
        """
        try:
            return held.token_mark not in read_owner_at(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return time.time() >= held.owner.expires_at - CLAIM_GRACE

    def _release_dir(self, held: Held, queue: WaitQueue) -> None:
        aside: str | None = None
        try:
            if time.time() < held.owner.expires_at - CLAIM_GRACE:
                aside = self._release_fast(held)
            else:
                self._release_claimed(held)
        finally:
            # Waking a waiter only saves it time (waiters poll anyway): an error here
            # must not turn a finished release into a failure. Wake first, tidy after:
            # the next holder's hand-off is on the critical path, deleting is not.
            with contextlib.suppress(OSError):
                queue.wake_first()
            with held.mutex:  # the heartbeat writes through the same descriptor
                held.lost = "released"
                if aside is not None:
                    remove_instance(aside, held.dirfd)
                with contextlib.suppress(OSError):  # the descriptor is gone either way
                    os.close(held.dirfd)

    def _release_fast(self, held: Held) -> str | None:
        """Release a lock whose lease still has a while to run; returns the moved-aside copy.

        While our lease runs, no other process may remove our instance (only a dead
        holder's lock, or one whose lease expired, is broken; ``force`` aside), so
        no claim is needed: check the token, then move the instance away from the
        lock path in one step. The path is free from that instant, even if we are
        killed before the copy is deleted (the next acquirer sweeps it).
        """
        if self._lost(held):
            log.warning("lock %s was lost before release (lease expired)", self.path)
            return None
        try:
            aside = move_aside(self.path, "released")
        except FileNotFoundError:
            return None
        except OSError as e:
            # The rename needs a new directory entry (a full disk refuses it); taking
            # the instance apart in place needs none. Still ours alone, as above.
            try:
                os.unlink(OWNER_FILE, dir_fd=held.dirfd)
                os.rmdir(self.path)
            except OSError:
                raise self._os_error(e, "release") from e
            return None
        return aside

    def _release_claimed(self, held: Held) -> None:
        """Release a lock whose lease is running out, through its claim (see the module doc)."""
        give_up = time.monotonic() + 2 * CLAIM_GRACE
        while True:
            try:
                claim = self._claim(held.dirfd)
            except LockError:
                # No claim can be made (a full disk, an I/O error). While our lease
                # runs nobody else may remove this instance: take it apart without
                # one rather than leave a live lock that everyone waits for.
                if time.time() >= held.owner.expires_at - CLAIM_GRACE:
                    raise
                claim = ""
                break
            if claim is not None:
                break
            if self._lost(held):
                log.warning("lock %s was lost before release (lease expired)", self.path)
                return
            if time.monotonic() > give_up:  # pragma: no cover - needs a stalled breaker
                log.warning("lock %s: could not release, a claim is stuck", self.path)
                return
            time.sleep(0.001)
        if self._lost(held):
            if claim:
                drop_claim(held.dirfd, claim)
            log.warning("lock %s was lost before release (lease expired)", self.path)
            return
        # We hold the claim of our own instance: nobody else can remove it now,
        # so it can be taken apart in place (an observer sees "being created").
        try:
            os.unlink(OWNER_FILE, dir_fd=held.dirfd)
            if claim:
                os.unlink(claim, dir_fd=held.dirfd)
            os.rmdir(self.path)
        except OSError:
            # Something unexpected inside (a heartbeat's temp file, a nested claim):
            # move the whole instance aside in one step, then delete it.
            try:
                aside = move_aside(self.path, "released")
            except FileNotFoundError:
                return
            except OSError as e:
                raise self._os_error(e, "release") from e
            remove_instance(aside, held.dirfd)

    def _refresh(self, held: Held) -> None:
        """Push our lease forward (heartbeat thread)."""
        with held.mutex:
            if not held.lost:
                self._refresh_locked(held)

    def _refresh_locked(self, held: Held) -> None:
        owner = dataclasses.replace(held.owner, expires_at=time.time() + self.lease)
        try:
            write_owner(held.dirfd, owner)
        except OSError as e:
            log.warning("lock %s: could not refresh the lease (%s)", self.path, e)
            held.next_refresh = time.monotonic() + min(1.0, self.lease / 10)
            return
        # Write first, then look, then believe: a breaker that found our lease expired
        # may be between its re-check and its rename (spec/: checking before writing
        # lets a holder renew a lease on a lock that is being removed).
        try:
            state = self._settle(held.dirfd, held.ino, patience=0.0)
        except OSError as e:
            log.warning("lock %s: could not check the lock after a refresh (%s)", self.path, e)
            state = "claimed"  # undecided: do not believe the new expiry yet
        if state == "moved":
            held.lost = "the lock was broken by another process after our lease ran out"
            log.warning("lock %s: %s", self.path, held.lost)
            return
        if state == "claimed":  # being decided: keep the old expiry, look again soon
            held.next_refresh = time.monotonic() + min(0.1, self.lease / 10)
            return
        held.owner = owner
        held.next_refresh = time.monotonic() + self.lease / 3

    def _os_error(self, e: OSError, what: str) -> LockError:
        hint = {
            errno.EACCES: "permission denied: the lock folder or its parent belongs to "
            "another user or is not writable",
            errno.EPERM: "operation not permitted on the lock folder",
            errno.EROFS: "the file system is read-only",
            errno.ENOSPC: "the disk is full",
        }.get(e.errno or 0, e.strerror or str(e))
        return LockError(self.path, f"cannot {what} the lock directory: {hint}", errno=e.errno)


def _refresh_held(key: str, held: Held) -> None:
    """The heartbeat's way back in: renew the lease of the lock held at ``key``."""
    DirectoryLock(key, lease=held.owner.lease)._refresh(held)


_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS: Final = {
    stat.S_IFREG: "a regular file",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _check_lock_path(path: str | os.PathLike[str]) -> None:
    """Refuse a lock path that names no directory of its own ("", ".", "..", "dir/").

    Such a path means the working directory or a parent: statestore would take a
    folder it did not make for its lock, and, were it ever judged stale, move it.
    """
    given = os.fspath(path)
    if os.path.basename(given) in ("", ".", ".."):
        raise LockError(
            given or "''",
            "a lock path must name the lock directory itself (such as 'state.json.lock'), "
            "not '', '.', '..' or a path that ends in a separator",
            errno=errno.EINVAL,
        )
