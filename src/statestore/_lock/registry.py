"""Per-process state of lock paths, and the heartbeat that renews held leases.

Every :class:`~statestore.DirectoryLock` object on one path shares one
:class:`PathState` (whose turn it is in this process, the reentrancy count, the
waiting threads, the host's wait queue). One daemon thread per process pushes
the lease of every held lock forward.

Rules:

* **Per-path state lives only while something uses it.** The registry holds
  each :class:`PathState` weakly: lock objects, waiters and held locks keep it
  alive (a held lock through :data:`_held`, which is also all the heartbeat
  scans), and it is freed with the last of them. A long-lived process that
  touches many files keeps memory for the ones in use, not for every path
  it ever locked.
* **A turn belongs to a :class:`Hold`, not to a thread.** The thread that took
  it may nest (reentrancy is per thread), but releasing goes through the hold,
  from any thread: a transaction entered on one thread and left on another
  releases its lock.
* **A forked child holds nothing.** After ``fork()`` every live
  :class:`PathState` is reset in place (lock objects keep pointing at it),
  the parent's holds stay behind with the parent's pid, and the heartbeat
  thread, which did not come along, is started afresh when needed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .handoff import WaitQueue
from .record import LockOwner

__all__ = [
    "PID",
    "Held",
    "Hold",
    "PathState",
    "first_sweep",
    "heartbeat",
    "mark_held",
    "sizes",
    "state",
]

log = logging.getLogger("statestore")

#: Sightings of an unrecorded lock further apart than this do not add up to its age.
SIGHTING_GAP: Final = 0.5
#: Paths whose leftovers were swept in this process, remembered up to this many.
SWEPT_MEMORY: Final = 4096


@dataclass
class Held:
    """The directory lock as held by this process."""

    owner: LockOwner
    dirfd: int
    ino: tuple[int, int]
    lost: str | None = None
    next_refresh: float = 0.0
    # Serialises the heartbeat's writes through ``dirfd`` with the release that closes it.
    mutex: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def token_mark(self) -> bytes:
        """How our token appears in our owner record (no parsing on the hot path)."""
        return f'"token": "{self.owner.token}"'.encode()


#: This process's id (``os.getpid()`` is a system call; reset in a forked child).
PID = os.getpid()


class Hold:
    """One turn at a path in this process: who took it, and how many levels are held.

    ``thread`` is the thread that may nest (acquire again without waiting), or
    None for a hold that no thread owns (the asyncio lock's); ``task`` the
    asyncio task holding it, if any.
    """

    __slots__ = ("count", "pid", "task", "thread")

    def __init__(self, thread: int | None, task: object = None) -> None:
        self.thread = thread
        self.task = task
        self.count = 0
        self.pid = PID


#: ``refresh(key, held)``: renew the lease of the lock at ``key``.
Refresh = Callable[[str, "Held"], None]


class PathState:
    """Per-process state of one lock path, shared by every DirectoryLock on it."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._reset()

    def _reset(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        #: Whose turn it is (a waiter that was handed the turn, or the holder).
        self.hold: Hold | None = None
        # Waiting holds, first come first served: a release hands the turn to the
        # oldest directly, so a thread that loops on update() cannot take the lock
        # back before the others wake up.
        self.waiting: collections.deque[Hold] = collections.deque()
        self.held: Held | None = None
        self.queue = WaitQueue(self.key)
        # When this process first saw a lock instance without a valid owner record.
        # A directory's mtime cannot tell: every claim made and undone inside it
        # (by any waiter) moves the mtime forward.
        # Only continuous sightings count: a gap restarts the clock, so an inode
        # reused by a new lock directory is not taken for the old one.
        self.first_seen: dict[tuple[int, int], tuple[float, float]] = {}

    def pass_turn_locked(self) -> None:
        """Give the turn to the oldest waiting hold, or free it (``cond`` held)."""
        self.hold = self.waiting.popleft() if self.waiting else None
        self.cond.notify_all()

    def pass_turn(self) -> None:
        with self.cond:
            self.pass_turn_locked()

    def unrecorded_for(self, ino: tuple[int, int]) -> float:
        """Seconds this process has kept seeing ``ino`` without a valid owner record."""
        now = time.monotonic()
        first, last = self.first_seen.get(ino, (now, now))
        if now - last > SIGHTING_GAP:
            first = now
        if len(self.first_seen) > 64:
            self.first_seen.clear()
        self.first_seen[ino] = (first, now)
        return now - first


_registry: weakref.WeakValueDictionary[str, PathState] = weakref.WeakValueDictionary()
#: The paths whose lock this process holds: kept alive, and refreshed by the heartbeat.
_held: dict[str, PathState] = {}
_registry_lock = threading.Lock()
_swept: set[str] = set()


def state(key: str) -> PathState:
    """The state of the lock path ``key`` (alive while the caller keeps a reference)."""
    with _registry_lock:
        st = _registry.get(key)
        if st is None:
            st = _registry[key] = PathState(key)
        return st


def mark_held(st: PathState, held: bool) -> None:
    """Keep ``st`` alive (and renewed by the heartbeat) while its lock is held.

    Only the holder of a path's turn calls this for that path, so the single
    dict operations (atomic under the GIL) need no lock of their own.
    """
    if held:
        _held[st.key] = st
    elif _held.get(st.key) is st:
        del _held[st.key]


def first_sweep(key: str) -> bool:
    """True once per path (per process, within :data:`SWEPT_MEMORY` paths)."""
    if key in _swept:  # the common case, without the lock
        return False
    with _registry_lock:
        if key in _swept:
            return False
        if len(_swept) >= SWEPT_MEMORY:
            _swept.clear()
        _swept.add(key)
        return True


def sizes() -> tuple[int, int]:
    """(paths with state, paths held): what this process keeps (for tests and debugging)."""
    with _registry_lock:
        return len(_registry), len(_held)


class Heartbeat:
    """One daemon thread per process that refreshes the leases of held locks."""

    def __init__(self, refresh: Refresh) -> None:
        self.refresh = refresh
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._next_beat = 0.0  # monotonic time of the thread's next look

    def start(self, due: float) -> None:
        """Make sure a lock whose lease is due for refresh at ``due`` gets it."""
        if self._thread is None or not self._thread.is_alive():
            self._next_beat = due
            self._thread = threading.Thread(
                target=self._run, name="statestore-heartbeat", daemon=True
            )
            self._thread.start()
        elif due < self._next_beat:
            # Only when it would otherwise look too late: waking the thread on every
            # acquire would cost a thread switch per update.
            self._wake.set()

    def _run(self) -> None:
        while True:
            try:
                delay = self._beat()
            except Exception:  # the heartbeat must never take the process down
                log.exception("statestore heartbeat failed")
                delay = 1.0
            self._next_beat = time.monotonic() + delay
            self._wake.wait(delay)
            self._wake.clear()

    def _beat(self) -> float:
        now = time.monotonic()
        delay = 10.0
        with _registry_lock:
            items = list(_held.items())
        for key, st in items:
            held = st.held
            if held is None:
                continue
            if now >= held.next_refresh:
                self.refresh(key, held)
            delay = min(delay, max(0.01, held.next_refresh - time.monotonic()))
        return delay


_heartbeat: Heartbeat | None = None


def heartbeat(refresh: Refresh) -> Heartbeat:
    """The process's heartbeat, which calls ``refresh(key, held)`` when a lease is due."""
    global _heartbeat
    if _heartbeat is None:
        _heartbeat = Heartbeat(refresh)
    return _heartbeat


def _after_fork_in_child() -> None:
    """The child of a fork holds none of its parent's locks."""
    global _registry_lock, _heartbeat, PID
    PID = os.getpid()
    _registry_lock = threading.Lock()
    for st in list(_registry.values()):
        if st.held is not None:
            with contextlib.suppress(OSError):
                os.close(st.held.dirfd)
        # In place: lock objects in the child keep pointing at their path's state.
        st._reset()
    _held.clear()
    _heartbeat = None  # the parent's thread did not come along


with contextlib.suppress(AttributeError):
    os.register_at_fork(after_in_child=_after_fork_in_child)
