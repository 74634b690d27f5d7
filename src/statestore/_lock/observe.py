"""Observe: what is at the lock path, and whether it may be broken.

:func:`observe` looks (``lstat``, then the owner record, never following a
link) and returns an :class:`Observation`; :class:`LockStatus` is its public
face (:meth:`statestore.DirectoryLock.status`, ``statestore lock status``,
``statestore doctor``).

Rules:

* **Only a statestore lock is ever judged.** A symbolic link (to a folder, to
  a file, dangling), a regular file, a FIFO, a socket or a device at the lock
  path, or a directory that holds entries a lock never holds and no usable
  owner record, is a :class:`LockError` naming the path and what is there.
* **A directory without a usable owner record is being created** for
  :data:`CREATE_GRACE` seconds (measured from its mtime, or from when this
  process first saw that instance without one, whichever is older), stale
  after that. A record that does not parse or is out of range counts as none.
* **Stale means provably dead or an expired lease.** A holder this host can
  judge (:mod:`.liveness`) and finds dead is stale at once; one it cannot
  judge (another host, boot or pid namespace) gets :data:`CLOCK_SKEW` beyond
  its lease.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Final, Literal

from .._errors import LockError
from . import registry
from .claim import foreign_entries
from .liveness import holder_alive
from .record import OWNER_FILE, LockOwner, read_owner_at

__all__ = [
    "DIR_FLAGS",
    "LockStatus",
    "Observation",
    "observe",
    "os_error",
    "status_of",
]

#: A lock directory without a readable owner record is "being created" for this long.
CREATE_GRACE: Final = 2.0
#: Extra time granted to holders on other hosts, whose clocks may disagree with ours.
CLOCK_SKEW: Final = 5.0
DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS: Final = {
    stat.S_IFREG: "a regular file",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@dataclass
class Observation:
    """What a look at the lock path saw (``ino`` None: nothing there)."""

    ino: tuple[int, int] | None
    owner: LockOwner | None
    alive: bool | None
    stale: bool
    reason: str


@dataclass(frozen=True)
class LockStatus:
    """What is at a lock's path, as :meth:`DirectoryLock.status` saw it.

    ``state`` is ``"free"`` (nothing there), ``"held"`` (a live holder),
    ``"being created"`` (a directory whose owner record is not there or not
    readable yet, within the creation grace) or ``"stale"`` (may be broken:
    its holder is dead, its lease ran out, or it had no record for too long).
    ``owner`` is the owner record when one could be read; ``alive`` whether its
    process runs (None: cannot be told from here, such as another host);
    ``reason`` says in words what was seen. Something that is not a lock at
    the path is not a status: :meth:`DirectoryLock.status` raises
    :class:`~statestore.LockError` for it.
    """

    path: str
    state: Literal["free", "held", "being created", "stale"]
    reason: str
    owner: LockOwner | None = None
    alive: bool | None = None

    @property
    def stale(self) -> bool:
        """Whether the lock may be broken (:meth:`DirectoryLock.break_lock` without force)."""
        return self.state == "stale"


def status_of(path: str, seen: Observation) -> LockStatus:
    """The public :class:`LockStatus` of an observation of the lock ``path``."""
    if seen.ino is None:
        return LockStatus(path, "free", seen.reason)
    state: Literal["held", "being created", "stale"] = (
        "stale" if seen.stale else "held" if seen.owner is not None else "being created"
    )
    return LockStatus(path, state, seen.reason, seen.owner, seen.alive)


def observe(path: str, key: str) -> Observation:
    """What is at the lock ``path`` (``key``: its canonical form), judged (see the module doc)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Observation(None, None, None, False, "free")
    except OSError as e:
        raise os_error(path, e, "inspect") from e
    if not stat.S_ISDIR(st.st_mode):
        raise not_a_lock(path, st)
    ino = (st.st_dev, st.st_ino)
    now = time.time()
    try:
        owner = LockOwner.from_json(read_owner_at(path))
    except FileNotFoundError:
        _foreign_check(path, ino, None)
        age = max(now - st.st_mtime, registry.state(key).unrecorded_for(ino))
        return Observation(
            ino,
            None,
            None,
            age > CREATE_GRACE,
            f"no owner record for {age:.1f} s (being created, or its creator died)",
        )
    except PermissionError as e:
        raise os_error(path, e, "read the owner record of") from e
    except (OSError, ValueError) as e:
        _foreign_check(path, ino, e)
        try:
            age = now - os.lstat(os.path.join(path, OWNER_FILE)).st_mtime
        except OSError:
            age = now - st.st_mtime
        age = max(age, registry.state(key).unrecorded_for(ino))
        return Observation(ino, None, None, age > CREATE_GRACE, f"unreadable owner record ({e})")
    alive = holder_alive(owner)
    if alive is False:
        return Observation(
            ino,
            owner,
            False,
            True,
            f"holder pid {owner.pid} on {owner.host} is no longer running",
        )
    expiry = owner.expires_at + (CLOCK_SKEW if alive is None else 0.0)
    if now > expiry:
        return Observation(
            ino,
            owner,
            alive,
            True,
            f"lease of pid {owner.pid} on {owner.host} expired {now - owner.expires_at:.1f} s ago",
        )
    return Observation(ino, owner, alive, False, f"held by pid {owner.pid} on {owner.host}")


def not_a_lock(path: str, st: os.stat_result) -> LockError:
    """The error for something at the lock path that is not a directory."""
    what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a directory")
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        gone = "" if os.path.exists(path) else ", which does not exist"
        return LockError(
            path,
            f"the lock path is a symbolic link (to {target!r}{gone}), not a lock "
            "directory; statestore never follows a link there. Remove the link, or "
            "give the lock a path of its own",
            errno=errno.ELOOP,
        )
    return LockError(
        path,
        f"the lock path is {what}, not a directory; statestore did not make it. "
        "Move it away if nothing else uses it, or give the lock a path of its own",
        errno=errno.ENOTDIR,
    )


def _foreign_check(path: str, ino: tuple[int, int], cause: Exception | None) -> None:
    """Raise :class:`LockError` if the directory at the lock path, which has no
    usable owner record, holds entries no lock instance holds: it is not a lock
    (a project folder, the working directory), and must not be broken."""
    try:
        dirfd = os.open(path, DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return  # gone or replaced meanwhile: the next look says by what
    except OSError as e:
        if e.errno == errno.ELOOP:
            return
        raise os_error(path, e, "inspect") from e
    try:
        made = os.fstat(dirfd)
        if (made.st_dev, made.st_ino) != ino:
            return
        foreign = foreign_entries(dirfd)
    except OSError as e:
        raise os_error(path, e, "list") from e
    finally:
        with contextlib.suppress(OSError):  # the descriptor is gone either way
            os.close(dirfd)
    if not foreign:
        return
    shown = ", ".join(repr(n) for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    record = "no owner record" if cause is None else f"no usable owner record ({cause})"
    raise LockError(
        path,
        f"the lock path is a directory that statestore did not make: it holds {shown} "
        f"and {record}. It was left untouched; move it away, or give the lock a "
        "path of its own",
        errno=errno.EEXIST,
    )


def os_error(path: str, e: OSError, what: str) -> LockError:
    """The :class:`LockError` for a system call on the lock ``path`` that failed."""
    hint = {
        errno.EACCES: "permission denied: the lock folder or its parent belongs to "
        "another user or is not writable",
        errno.EPERM: "operation not permitted on the lock folder",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
    }.get(e.errno or 0, e.strerror or str(e))
    return LockError(path, f"cannot {what} the lock directory: {hint}", errno=e.errno)
