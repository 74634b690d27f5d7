"""Per-process state of lock paths, and the heartbeat that renews held leases.

Every :class:`~statestore.DirectoryLock` object on one path shares one
:class:`PathState` (the holding thread, the reentrancy count, the waiting
threads, the host's wait queue). One daemon thread per process pushes the
lease of every held lock forward; a forked child starts with none of this.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ._handoff import WaitQueue
from ._owner import LockOwner

__all__ = ["Held", "Heartbeat", "PathState", "heartbeat", "state"]

log = logging.getLogger("statestore")

#: Sightings of an unrecorded lock further apart than this do not add up to its age.
SIGHTING_GAP: Final = 0.5


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


#: ``refresh(key, held)``: renew the lease of the lock at ``key``.
Refresh = Callable[[str, "Held"], None]


class PathState:
    """Per-process state of one lock path, shared by every DirectoryLock on it."""

    def __init__(self, key: str) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.thread: int | None = None
        # Threads waiting for their turn, first come first served: a release hands
        # the turn to the oldest directly, so a thread that loops on update() cannot
        # take the lock back before the others wake up.
        self.waiting: collections.deque[int] = collections.deque()
        self.count = 0
        self.held: Held | None = None
        self.queue = WaitQueue(key)
        self.swept = False  # leftovers of dead processes removed (once per process)
        # When this process first saw a lock instance without a valid owner record.
        # A directory's mtime cannot tell: every claim made and undone inside it
        # (by any waiter) moves the mtime forward.
        # Only continuous sightings count: a gap restarts the clock, so an inode
        # reused by a new lock directory is not taken for the old one.
        self.first_seen: dict[tuple[int, int], tuple[float, float]] = {}

    def pass_turn(self) -> None:
        """Give the turn to the oldest waiting thread, or free it."""
        with self.cond:
            self.thread = self.waiting.popleft() if self.waiting else None
            self.cond.notify_all()

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


_registry: dict[str, PathState] = {}


_registry_lock = threading.Lock()


def state(key: str) -> PathState:
    with _registry_lock:
        st = _registry.get(key)
        if st is None:
            st = _registry[key] = PathState(key)
        return st


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
            items = list(_registry.items())
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
    global _registry, _registry_lock, _heartbeat
    for st in _registry.values():
        if st.held is not None:
            with contextlib.suppress(OSError):
                os.close(st.held.dirfd)
    _registry = {}
    _registry_lock = threading.Lock()
    _heartbeat = None  # the parent's thread did not come along


with contextlib.suppress(AttributeError):
    os.register_at_fork(after_in_child=_after_fork_in_child)
