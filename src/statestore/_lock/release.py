"""Break and release: removing a lock instance from the lock path, through its claim.

A stale instance (:mod:`.observe`) is broken by :func:`break_stale`; the
holder gives its own up with :func:`release_dir`. Both end with a rename aside
and a removal by known entries (:mod:`.claim`).

Rules:

* **A breaker claims, re-checks, then renames.** It opens the instance it
  judged stale, checks by inode that the descriptor is that instance, takes
  its claim (through the descriptor: the claim guards that instance and no
  other), looks again (:func:`~.observe.observe`) and only when the path still
  holds the same instance with the same owner token, still stale (or
  ``force``), renames it aside in one step. Two breakers cannot both win, and
  a fresh lock taken meanwhile is never removed; ``rmdir`` then ``mkdir``
  would let both in (proper-lockfile#121).
* **Release is by token, never a blind rmdir.** While our lease has more than
  the claim grace to run nobody else may remove our instance: check the token
  (the record still holds ours) and rename aside at once (the fast release).
  Near the end of the lease the release goes through the claim, like a break.
  A release that finds the lock already lost leaves the path alone.
* **A waiter is woken before the tidying**: the next holder's hand-off
  (:mod:`.handoff`) is on the critical path, deleting the moved copy is not.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from .._errors import LockError
from .claim import CLAIM_GRACE, drop_claim, move_aside, remove_instance, take_claim
from .handoff import WaitQueue
from .observe import DIR_FLAGS, Observation, observe, os_error
from .record import OWNER_FILE, read_owner_at
from .registry import Held

__all__ = ["break_stale", "release_dir"]

log = logging.getLogger("statestore")


def _claim(path: str, dirfd: int, lease: float) -> str | None:
    """Take the claim of the instance behind ``dirfd`` (None: another process has it)."""
    try:
        return take_claim(dirfd, lease)
    except OSError as e:
        raise os_error(path, e, "claim") from e


def break_stale(
    path: str, key: str, lease: float, seen: Observation, *, force: bool = False
) -> bool:
    """Break the instance ``seen`` judged stale (see the module doc); False when it changed."""
    try:
        dirfd = os.open(path, DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:
            return False  # replaced by a symbolic link: the next look reports it
        raise os_error(path, e, "open") from e
    try:
        try:
            st = os.fstat(dirfd)
        except OSError as e:
            raise os_error(path, e, "inspect") from e
        if (st.st_dev, st.st_ino) != seen.ino:
            return False  # not the instance we judged stale
        claim = _claim(path, dirfd, lease)
        if claim is None:
            return False
        try:
            now = observe(path, key)
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
            aside = move_aside(path, "broken")
        except BaseException as e:
            drop_claim(dirfd, claim)
            if isinstance(e, OSError) and not isinstance(e, LockError):
                raise os_error(path, e, "break") from e
            raise
        log.warning("broke stale lock %s: %s", path, seen.reason)
        # Through the descriptor of the instance we claimed: whatever has been put
        # at the aside name meanwhile, only that instance's own entries go.
        remove_instance(aside, dirfd)
    finally:
        with contextlib.suppress(OSError):  # the descriptor is gone either way
            os.close(dirfd)
    return True


def _lost(path: str, held: Held) -> bool:
    """For release: whether the instance at ``path`` is no longer ours.

    A read error proves nothing: while our lease runs nobody may break the lock,
    and a release that gives up leaves a live lock that everyone waits for.
    """
    try:
        return held.token_mark not in read_owner_at(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return time.time() >= held.owner.expires_at - CLAIM_GRACE


def release_dir(path: str, lease: float, held: Held, queue: WaitQueue) -> None:
    """Give up the instance we hold at ``path`` (the last level was released)."""
    aside: str | None = None
    try:
        if time.time() < held.owner.expires_at - CLAIM_GRACE:
            aside = _release_fast(path, held)
        else:
            _release_claimed(path, lease, held)
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


def _release_fast(path: str, held: Held) -> str | None:
    """Release a lock whose lease still has a while to run; returns the moved-aside copy.

    While our lease runs, no other process may remove our instance (only a dead
    holder's lock, or one whose lease expired, is broken; ``force`` aside), so
    no claim is needed: check the token, then move the instance away from the
    lock path in one step. The path is free from that instant, even if we are
    killed before the copy is deleted (the next acquirer sweeps it).
    """
    if _lost(path, held):
        log.warning("lock %s was lost before release (lease expired)", path)
        return None
    try:
        aside = move_aside(path, "released")
    except FileNotFoundError:
        return None
    except OSError as e:
        # The rename needs a new directory entry (a full disk refuses it); taking
        # the instance apart in place needs none. Still ours alone, as above.
        try:
            os.unlink(OWNER_FILE, dir_fd=held.dirfd)
            os.rmdir(path)
        except OSError:
            raise os_error(path, e, "release") from e
        return None
    return aside


def _release_claimed(path: str, lease: float, held: Held) -> None:
    """Release a lock whose lease is running out, through its claim (see the module doc)."""
    give_up = time.monotonic() + 2 * CLAIM_GRACE
    while True:
        try:
            claim = _claim(path, held.dirfd, lease)
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
        if _lost(path, held):
            log.warning("lock %s was lost before release (lease expired)", path)
            return
        if time.monotonic() > give_up:  # pragma: no cover - needs a stalled breaker
            log.warning("lock %s: could not release, a claim is stuck", path)
            return
        time.sleep(0.001)
    if _lost(path, held):
        if claim:
            drop_claim(held.dirfd, claim)
        log.warning("lock %s was lost before release (lease expired)", path)
        return
    # We hold the claim of our own instance: nobody else can remove it now,
    # so it can be taken apart in place (an observer sees "being created").
    try:
        os.unlink(OWNER_FILE, dir_fd=held.dirfd)
        if claim:
            os.unlink(claim, dir_fd=held.dirfd)
        os.rmdir(path)
    except OSError:
        # Something unexpected inside (a heartbeat's temp file, a nested claim):
        # move the whole instance aside in one step, then delete it.
        try:
            aside = move_aside(path, "released")
        except FileNotFoundError:
            return
        except OSError as e:
            raise os_error(path, e, "release") from e
        remove_instance(aside, held.dirfd)
