"""Lease: the heartbeat's refresh, and the check before a commit.

The process's heartbeat thread (:mod:`.registry`) calls :func:`refresh_held`
for each held lock a third of the way through its lease; the store calls
:meth:`~statestore.DirectoryLock.verify` (here :func:`verify_held`) right
before its commit rename.

Rules:

* **Write first, then look, then believe.** A refresh writes the new expiry
  (:func:`~.record.write_owner`), then settles (:func:`~.create.settle`): only
  when no claim is in the instance and the path still holds it is the new
  expiry ours. A breaker that found the lease expired may be between its
  re-check and its rename; checking before writing would renew a lease on a
  lock that is being removed (``spec/``). An undecided claim keeps the old
  expiry and looks again soon; a moved instance marks the lock lost.
* **A holder that stopped finds out before it writes.** :func:`verify_held`
  fails (:class:`LockCompromisedError`, "nothing was written") when the lock
  was marked lost, when the lease has run out by our own clock, when the
  record at the path no longer carries our token, or when a claim in our
  instance is still undecided after the claim grace. A read error proves
  nothing either way and fails too.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from .._errors import LockCompromisedError
from .claim import CLAIM_GRACE
from .create import settle
from .record import read_owner_at, write_owner
from .registry import Held

__all__ = ["refresh_held", "verify_held"]

log = logging.getLogger("statestore")


def refresh(path: str, lease: float, held: Held) -> None:
    """Push our lease forward (heartbeat thread)."""
    with held.mutex:
        if not held.lost:
            _refresh_locked(path, lease, held)


def _refresh_locked(path: str, lease: float, held: Held) -> None:
    owner = dataclasses.replace(held.owner, expires_at=time.time() + lease)
    try:
        write_owner(held.dirfd, owner)
    except OSError as e:
        log.warning("lock %s: could not refresh the lease (%s)", path, e)
        held.next_refresh = time.monotonic() + min(1.0, lease / 10)
        return
    # Write first, then look, then believe: a breaker that found our lease expired
    # may be between its re-check and its rename (spec/: checking before writing
    # lets a holder renew a lease on a lock that is being removed).
    try:
        state = settle(path, held.dirfd, held.ino, patience=0.0)
    except OSError as e:
        log.warning("lock %s: could not check the lock after a refresh (%s)", path, e)
        state = "claimed"  # undecided: do not believe the new expiry yet
    if state == "moved":
        held.lost = "the lock was broken by another process after our lease ran out"
        log.warning("lock %s: %s", path, held.lost)
        return
    if state == "claimed":  # being decided: keep the old expiry, look again soon
        held.next_refresh = time.monotonic() + min(0.1, lease / 10)
        return
    held.owner = owner
    held.next_refresh = time.monotonic() + lease / 3


def verify_held(path: str, held: Held) -> None:
    """Raise :class:`LockCompromisedError` unless ``held`` is still the lock at ``path``."""
    if held.lost:
        raise LockCompromisedError(path, held.lost)
    now = time.time()
    if now >= held.owner.expires_at:
        raise LockCompromisedError(
            path,
            f"our lease ran out {now - held.owner.expires_at:.1f} s ago (the process was "
            "suspended or too slow to refresh it), so another process may hold the "
            "lock now; nothing was written. Retry the operation, or raise 'lease'",
        )
    try:
        try:
            ours = held.token_mark in read_owner_at(path)
        except FileNotFoundError:
            ours = False
        # A claim in our lock is a breaker that will back off (our lease is live)
        # or one that judged it stale: wait for it to decide rather than fail now.
        state = settle(path, held.dirfd, held.ino, patience=CLAIM_GRACE) if ours else ""
    except OSError as e:
        raise LockCompromisedError(
            path,
            f"could not confirm that the lock is still ours ({e.strerror or e}); "
            "nothing was written",
        ) from e
    if not ours:
        raise LockCompromisedError(
            path,
            "the lock was broken by another process after our lease ran out; "
            "nothing was written. Retry the operation, or raise 'lease'",
        )
    if state != "ours":
        raise LockCompromisedError(
            path, "another process is breaking this lock; nothing was written"
        )


def refresh_held(key: str, held: Held) -> None:
    """The heartbeat's way back in: renew the lease of the lock held at ``key``."""
    refresh(key, held.owner.lease, held)
