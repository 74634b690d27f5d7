"""Create: taking a free lock, and waiting for one that is not.

:func:`acquire_dir` waits (an immediate first try, then backoff with full
jitter against a deadline, woken by the host's hand-off queue in
:mod:`.handoff`); each :func:`try_once` is ``mkdir(L)``, then, for the winner,
:func:`publish`, or, for a loser, a look (:mod:`.observe`) and a break of a
stale instance (:mod:`.release`).

Rules:

* **The record goes into the directory we made, then we settle.** The winner
  of ``mkdir`` opens ``L`` (``O_NOFOLLOW | O_DIRECTORY``) and writes its owner
  record with ``O_EXCL`` through that descriptor, so it can never land in
  somebody else's lock (a record already there means it is not our
  directory). Only then does it :func:`settle`: no live claim in the
  instance and ``L`` still that instance, or it backs off. Without the settle
  a creator stalled past the creation grace and its breaker both hold the
  lock (``spec/``).
* **Settle looks at the claims first, then at the path**: a breaker claims
  before it renames, so "no claim, then still ours at L" leaves it no gap.
* **A creator that cannot publish takes its directory apart** (by inode,
  ``rmdir`` of an empty directory only) so nobody waits out the grace for it:
  a file-system error, and an interruption anywhere between ``mkdir`` and the
  settled record (``KeyboardInterrupt``, ``SystemExit``) alike.
* **Who we are is read before mkdir**, not between mkdir and the record.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Final

from .._errors import LockTimeout, WaitAbandoned
from .claim import CLAIM_GRACE, live_claim, move_aside, remove_instance
from .handoff import WaitQueue
from .liveness import identity
from .observe import DIR_FLAGS, Observation, observe, os_error
from .record import OWNER_FILE, new_owner
from .registry import Held
from .release import break_stale

__all__ = ["GIVE_UP_POLL", "acquire_dir", "settle"]

log = logging.getLogger("statestore")

#: Polling bounds (seconds): full jitter between 0 and min(cap, base * 2**attempt).
BACKOFF_BASE: Final = 0.002
BACKOFF_CAP: Final = 0.1
#: A waiter that has not reached the head of the local queue after this long polls anyway,
#: so a stuck waiter ahead of it cannot hold everyone up.
QUEUE_PATIENCE: Final = 1.0
#: How often a waiter that may be abandoned (see ``DirectoryLock._acquire``) asks.
GIVE_UP_POLL: Final = 0.2


def acquire_dir(
    path: str,
    key: str,
    lease: float,
    deadline: float,
    timeout: float,
    queue: WaitQueue,
    gave_up: Callable[[], bool] | None = None,
) -> Held:
    """Wait until we hold the lock directory ``path``, or raise :class:`LockTimeout`."""
    started = time.monotonic()
    seen: Observation | None = None
    # Who we are (read from /proc once per process, milliseconds in a fresh one)
    # before mkdir, not between mkdir and the owner record: a process killed in
    # that window leaves a lock that others must wait out the creation grace for.
    identity()
    # An immediate first try, unless others on this host are already queued.
    if not queue.has_waiters():
        got = try_once(path, key, lease)
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
                got = try_once(path, key, lease)
                if isinstance(got, Held):
                    return got
                seen = got or seen
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(
                    path,
                    timeout=timeout,
                    holder=seen.owner.describe() if seen and seen.owner else None,
                    alive=seen.alive if seen else None,
                )
            if gave_up is not None and gave_up():
                raise WaitAbandoned(path)
            delay = min(remaining, random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
            attempt += 1
            if seen is not None and attempt in (1, 8):
                log.debug(
                    "waiting for lock %s (%s)",
                    path,
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


def try_once(path: str, key: str, lease: float) -> Held | Observation | None:
    """One attempt: the lock, or what stands in the way (None: try again now)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        seen = observe(path, key)
        if seen.stale and seen.ino is not None:
            break_stale(path, key, lease, seen)
            return None
        return seen
    except FileNotFoundError:
        # The state folder does not exist yet: statestore creates it on first save.
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise os_error(path, e, "create the folder for") from e
        return None
    except OSError as e:
        raise os_error(path, e, "create") from e
    return publish(path, lease)


def publish(path: str, lease: float) -> Held | None:
    """Write our owner record into the directory we just created.

    Interrupted anywhere before it returns (``KeyboardInterrupt``, ``SystemExit``,
    an error of another kind than the file system's), it takes apart what it
    made, as when it cannot publish, and lets the exception go on.
    """
    made: list[int] = []  # the directory's descriptor while it is ours to take apart
    recorded: list[bool] = []  # whether our record is in it
    try:
        return _publish(path, lease, made, recorded)
    except BaseException as e:
        if made or not recorded:  # (not after it was settled as someone else's)
            _abandon(path, made[0] if made else None, bool(recorded), e)
        raise


def _publish(path: str, lease: float, made: list[int], recorded: list[bool]) -> Held | None:
    try:
        dirfd = os.open(path, DIR_FLAGS)
        made.append(dirfd)
    except (FileNotFoundError, NotADirectoryError):
        return None  # replaced meanwhile: the next look says by what
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise os_error(path, e, "open") from e
    try:
        fd_stat = os.fstat(dirfd)
        owner = new_owner(lease)
        # O_EXCL: a record already there means this is not the directory we made.
        # A reader that catches the record half-written treats it as a lock
        # "being created", so no temp file and rename are needed here.
        fd = os.open(
            OWNER_FILE,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o644,
            dir_fd=dirfd,
        )
        recorded.append(True)
        try:
            os.write(fd, owner.to_json())
        finally:
            os.close(fd)
        ino = (fd_stat.st_dev, fd_stat.st_ino)
    except FileExistsError:
        made.clear()
        os.close(dirfd)
        return None
    except OSError as e:
        raise os_error(path, e, "write the owner record of") from e
    held = Held(owner=owner, dirfd=dirfd, ino=ino)
    # Only now, with the record written, is it safe to look: a breaker that judged
    # our record-less directory stale may be between its re-check and its rename.
    # Its claim is in our directory until it decides (spec/: without this check,
    # a creator stalled past the grace and its breaker both hold the lock).
    try:
        state = settle(path, dirfd, ino, patience=2 * CLAIM_GRACE)
    except OSError as e:
        raise os_error(path, e, "inspect") from e
    if state == "claimed":
        # A claim stuck in the lock we just made: its maker died in the claim's
        # window. The lock is ours alone to take apart (our record is in it).
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == ino:
                remove_instance(move_aside(path, "released"), dirfd)
    if state != "ours":
        made.clear()  # not ours to take apart: moved aside, or being broken
        with contextlib.suppress(OSError):
            os.close(dirfd)
        return None
    held.next_refresh = time.monotonic() + lease / 3
    made.clear()  # published and settled: from here on the lock is held
    return held


def settle(path: str, dirfd: int, ino: tuple[int, int], patience: float) -> str:
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
            st = os.lstat(path)
        except FileNotFoundError:
            return "moved"
        if (st.st_dev, st.st_ino) != ino:
            return "moved"
        if not claimed:
            return "ours"
        if time.monotonic() >= give_up:
            return "claimed"
        time.sleep(0.001)


def _abandon(path: str, dirfd: int | None, recorded: bool, cause: BaseException) -> None:
    """Take apart the directory we made but could not publish, so nobody waits for it."""
    log.warning("lock %s: could not publish the owner record (%s)", path, cause)
    with contextlib.suppress(OSError):
        if dirfd is not None:
            try:
                made = os.fstat(dirfd)
                if recorded:
                    os.unlink(OWNER_FILE, dir_fd=dirfd)
                now = os.lstat(path)
                if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
                    return
            finally:
                with contextlib.suppress(OSError):
                    os.close(dirfd)
        os.rmdir(path)  # only an empty directory: never somebody's published lock
