"""A cross-process lock made of a directory, that recovers from crashed holders.

Protocol (``docs/locking.md`` has the full story, ``spec/`` a checked model),
step by step, with the file of this package that implements each:

* **Acquire** (``create.py``): ``mkdir(L)``. The winner writes its owner
  record into the directory *it* created (through a directory file
  descriptor, so a write can never land in somebody else's lock, and with
  ``O_EXCL``) and then settles: no live claim in it, and ``L`` still that
  directory. Waiting is an immediate first try, then backoff with full jitter
  against a deadline; waiters on one host are woken in order by the hand-off
  queue (``handoff.py``), while ``mkdir`` stays the source of truth.
* **Observe** (``observe.py``): what is at ``L`` is looked at with ``lstat``
  and its owner record read without following links; the result is free,
  held, being created (no usable record yet, within the creation grace) or
  stale. :class:`LockStatus` is the public view of it.
* **Stale locks** (``observe.py``, ``liveness.py``): a holder that is provably
  dead or whose lease has expired may be broken. Only evidence that cannot
  collide proves a holder dead: its record carries our boot id and our pid
  namespace, and its pid is gone or now belongs to a process with another
  start time. The same host name with another boot id, another pid namespace,
  or a ``/proc`` that hides the pid (``hidepid``) prove nothing: the lease
  decides, with an allowance for clock skew.
* **Break** (``release.py``, ``claim.py``): a breaker first takes the
  instance's *claim* (a symbolic link ``L/claim`` naming its maker, made
  through a descriptor of the instance, so it guards that instance and no
  other), re-checks that ``L`` is still the stale instance it inspected, and
  only then renames ``L`` aside in one atomic step. Two breakers cannot both
  win, and a fresh lock taken meanwhile is never removed. ``rmdir`` then
  ``mkdir`` would let both in (proper-lockfile#121).
* **Release** (``release.py``): by token, never a blind ``rmdir``. While the
  lease has time left nobody else may remove the instance, so it is renamed
  aside at once; near the end of the lease the release goes through the
  claim, like a break.
* **Lease** (``lease.py``, heartbeat thread in ``registry.py``): the holder's
  heartbeat pushes the expiry in its owner record forward, writing first and
  settling before it believes the new expiry; a holder that stops (SIGSTOP, a
  sleeping laptop) loses the lock once the lease has run out, and finds out at
  :meth:`DirectoryLock.verify`, which the store calls right before its commit
  rename.
* **Only a statestore lock is ever touched** (``observe.py``, ``claim.py``,
  ``paths.py``). The lock path must name the lock directory itself (not
  ``""``, ``"."``, ``".."`` or a path ending in a separator). Whatever is at
  the lock path is looked at with ``lstat`` and opened with
  ``O_NOFOLLOW | O_DIRECTORY``: a symbolic link (to a folder, to a file,
  dangling), a regular file, a FIFO, a socket or a device there, or a
  directory that holds entries a lock never holds and no usable owner record,
  is a :class:`LockError` naming the path and what is there, at once, and is
  left as it is. An empty directory without an owner record is a lock being
  created; only after the creation grace is it stale. A lock is taken apart by
  its known entries and ``rmdir`` (``claim.py``), never by a recursive delete.
* **Bad records are garbage** (``record.py``, ``liveness.py``). An owner
  record or claim with a field of the wrong type or out of range is unusable,
  judged by its age like a record that does not parse; no such value reaches
  a system call. So a lock never writes one: a ``lease`` that is not a finite
  number in ``(0, MAX_LEASE]`` is a ``ValueError`` when the lock is built.
* **In-process turns and per-path state** (``turns.py``, ``registry.py``):
  threads of one process wait for a path's turn in memory, first come first
  served; a held lock is a handle, not a thread; a forked child holds none of
  its parent's locks. The public API (``api.py``) states its own rules in
  :class:`DirectoryLock`'s docstring.
* **asyncio** (``aio.py``): a loop's tasks take turns in memory; the task
  whose turn it is tries once on the loop, and a thread waits only while
  another process holds the lock.

Layout rule: this package's files import each other, and nothing outside it
imports them: every other module of statestore takes what it needs from
``statestore._lock`` (the names below), never from ``statestore._lock.<file>``.
Only tests may reach a file's internal names directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import WaitAbandoned
from .api import DEFAULT_LEASE, MAX_LEASE, AcquiredLock, DirectoryLock
from .claim import remove_leftover
from .liveness import identity, process_alive
from .observe import LockStatus
from .record import FORMAT, FORMAT_VERSION, LIMITS, LockOwner
from .turns import wait_time

if TYPE_CHECKING:
    from .aio import AsyncAcquiredLock, AsyncDirectoryLock, consume, turn_gate

_ASYNC = frozenset({"AsyncAcquiredLock", "AsyncDirectoryLock", "consume", "turn_gate"})


def __getattr__(name: str) -> Any:
    # The asyncio half is imported on first use: importing asyncio costs a
    # program that never uses it tens of milliseconds at start-up.
    if name in _ASYNC:
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_LEASE",
    "FORMAT",
    "FORMAT_VERSION",
    "LIMITS",
    "MAX_LEASE",
    "AcquiredLock",
    "AsyncAcquiredLock",
    "AsyncDirectoryLock",
    "DirectoryLock",
    "LockOwner",
    "LockStatus",
    "WaitAbandoned",
    "consume",
    "identity",
    "process_alive",
    "remove_leftover",
    "turn_gate",
    "wait_time",
]
