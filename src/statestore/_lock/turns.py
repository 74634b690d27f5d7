"""Turns: which thread or task of this process holds a path, and how long a waiter waits.

Threads of one process never compete on the file system: the first takes the
path's turn (:class:`~.registry.PathState`) and the directory
(:func:`~.create.acquire_dir`); the others wait for the turn in memory,
first come first served, and it is handed on at release.

Rules:

* **Reentrancy is per thread**: a thread whose hold has levels takes one more
  without waiting; each level is released on its own, the directory goes with
  the last (:func:`release_hold`).
* **Waiting ends cleanly, however it ends.** A timeout, ``cancel_check()``
  returning true or raising, a ``KeyboardInterrupt`` or any other exception
  while queued removes the waiter from the queue (a turn already handed to
  it is passed on). From the moment a thread is given the path's turn until
  it holds the directory, one handler gives the turn back, so no interrupt in
  between can strand it.
* **Waits are sliced** (:data:`MAX_WAIT_SLICE`), so no timeout, ``inf``
  included, can overflow a system call; a timeout that is NaN is a
  ``ValueError``, a negative one or ``inf`` waits forever, and an int too
  large for a float is infinite, not an ``OverflowError``.
* **Sweeping and the heartbeat start with the first hold**: leftovers of
  dead releasers beside the lock are swept once per path per process, and the
  process's heartbeat is made sure to run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Final

from .._errors import LockTimeout, WaitAbandoned
from . import registry
from .claim import sweep_aside
from .create import GIVE_UP_POLL, acquire_dir
from .lease import refresh_held
from .release import release_dir

__all__ = ["release_hold", "take_turn", "to_seconds", "wait_time"]

log = logging.getLogger("statestore")

#: The longest single wait on a condition: threading refuses timeouts past an OS limit
#: (``timeout=inf`` would overflow), so long waits are cut into slices.
MAX_WAIT_SLICE: Final = 60.0


def wait_time(timeout: float | None, default: float, blocking: bool = True) -> float:
    """Seconds to wait: ``timeout`` (``default`` when None); negative or ``inf``: forever."""
    if not blocking:
        return 0.0
    seconds = to_seconds(default if timeout is None else timeout)
    if math.isnan(seconds):
        raise ValueError("timeout must be a number of seconds (negative: wait forever), not NaN")
    return math.inf if seconds < 0 else seconds + 0.0  # + 0.0: no "-0 s" in messages


def to_seconds(value: float) -> float:
    """``value`` as a float; an int too large for one (``10**400``) is +-inf, not an
    ``OverflowError``."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def take_turn(
    path: str,
    key: str,
    lease: float,
    st: registry.PathState,
    wait: float,
    gave_up: Callable[[], bool] | None,
    thread: int | None,
    task: object,
) -> registry.Hold:
    """Take one level of the lock at ``path``: this process's turn, then the directory.

    Reentrant for ``thread`` (None: for nobody); the new hold is ``task``'s.
    """
    deadline = time.monotonic() + wait
    mine: registry.Hold | None = None
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
                and hold.pid == registry.PID
            ):
                hold.count += 1
                return hold
            mine = registry.Hold(thread, task)
            # Other threads of this process wait here, not on the file system.
            if hold is None and not st.waiting:
                st.hold = mine
            else:
                st.waiting.append(mine)
                log.debug("waiting for lock %s: another thread of this process holds it", path)
                try:
                    while st.hold is not mine:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            held = st.held
                            raise LockTimeout(
                                path,
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
                                raise WaitAbandoned(path, timeout=wait)
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
        held = acquire_dir(path, key, lease, deadline, wait, st.queue, gave_up)
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
        registry.mark_held(st, True)
        if registry.first_sweep(key):
            sweep_aside(path)
        registry.heartbeat(refresh_held).start(held.next_refresh)
    except BaseException:
        # Interrupted here: give back what we took (the directory is ours either way).
        with st.cond:
            st.held, mine.count = held, 1
        release_hold(path, lease, st, mine)
        raise
    log.debug("acquired lock %s", path)
    return mine


def release_hold(path: str, lease: float, st: registry.PathState, hold: registry.Hold) -> None:
    """Release one level of ``hold``; the directory goes with the last level."""
    with st.cond:
        if st.hold is not hold or hold.count == 0 or hold.pid != registry.PID:
            return  # not ours (any more): a forked child, or released already
        hold.count -= 1
        if hold.count:
            return
        held, st.held = st.held, None
    registry.mark_held(st, False)
    try:
        if held is not None:
            release_dir(path, lease, held, st.queue)
    finally:
        st.pass_turn()
    log.debug("released lock %s", path)
