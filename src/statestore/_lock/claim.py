"""Taking a lock instance apart: claims, moving aside, removal.

Only the holder of an instance's *claim* may remove that instance (a stale
one, or its own at release near lease expiry). A claim is a symbolic link
inside the instance (``claim``, ``claim.2``, ...) whose target names its maker,
made and undone through the instance's directory descriptor, so it guards that
instance and no other, wherever it has moved. Removal is a rename aside to a
unique name (one atomic step that frees the lock path), then deletion.
``docs/lock-model.md`` and ``spec/`` explain why each step is needed.

What may be removed (the rule for every deletion in the lock):

* **Only what the library made, proven, never by name alone.** A lock instance
  holds nothing but its owner record (``owner.json``, a regular file), the
  heartbeat's temporary records (``owner.json.<8 hex>.tmp``) and claims
  (``claim``, ``claim.<n>``, symbolic links). An instance is taken apart by
  those names and types, each one unlinked through the instance's directory
  descriptor, and then ``rmdir``-ed: an ``rmdir`` removes only an empty
  directory and never follows a symbolic link. There is no recursive delete:
  an instance holding anything else is left where it is, with a warning.
* **Never through a symbolic link in the last component.** Instances are
  opened with ``O_NOFOLLOW | O_DIRECTORY``, their entries examined with
  ``lstat`` and removed with ``dir_fd``-relative calls, so a link planted
  under a name the lock uses redirects nothing.
* **The sweep of moved-aside instances** (``<lock>.<12 hex>.broken`` or
  ``.released``, left by a process killed between its rename and its delete)
  removes an entry only when it is a real directory (not a symbolic link),
  holds only the names above with their types, and its owner record, if any,
  is one this library wrote; anything else under such a name is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import time
from typing import Final

from .liveness import claim_maker_alive, claim_tag
from .record import OWNER_FILE, RECORD_HEAD

__all__ = [
    "CLAIM_GRACE",
    "drop_claim",
    "foreign_entries",
    "live_claim",
    "move_aside",
    "remove_instance",
    "remove_leftover",
    "sweep_aside",
    "take_claim",
]

log = logging.getLogger("statestore")

CLAIM: Final = "claim"
#: A claim is held for a few system calls; one older than this was abandoned by a crash.
CLAIM_GRACE: Final = 2.0

_CLAIM_RE: Final = re.compile(r"claim(?:\.[0-9]{1,9})?")
_TEMP_RE: Final = re.compile(re.escape(OWNER_FILE) + r"\.[0-9a-f]{8}\.tmp")
_ASIDE_RE: Final = re.compile(r"\.([0-9a-f]{12})\.(?:broken|released)")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):  # the descriptor is gone either way
        os.close(fd)


def _made_here(name: str, dirfd: int) -> bool:
    """Whether ``name`` in the instance behind ``dirfd`` is an entry the lock makes,
    of the type it makes (a regular file for records, a symbolic link for claims)."""
    if _CLAIM_RE.fullmatch(name):
        want = stat.S_ISLNK
    elif name == OWNER_FILE or _TEMP_RE.fullmatch(name):
        want = stat.S_ISREG
    else:
        return False
    try:
        return want(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return True  # gone meanwhile (a heartbeat's rename, a claim undone)


def foreign_entries(dirfd: int) -> list[str]:
    """Entries of the directory behind ``dirfd`` that no lock instance holds."""
    return sorted(n for n in os.listdir(dirfd) if not _made_here(n, dirfd))


def _is_record(dirfd: int) -> bool:
    """Whether the instance's owner record is one this library wrote (or began to)."""
    try:
        fd = os.open(
            OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd
        )
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, len(RECORD_HEAD))
    except OSError:
        return False
    finally:
        _close(fd)
    # A record cut short by a crash is still ours: the start of what we write.
    return RECORD_HEAD.startswith(head)


def take_apart(dirfd: int, *, proof: bool = False) -> list[str]:
    """Unlink the entries of the instance behind ``dirfd`` (see the module doc).

    Returns the entries that are not the lock's own and removes nothing when
    there are any. With ``proof``, an owner record this library did not write
    counts as foreign too (for instances found by name only, in the sweep).
    """
    names = os.listdir(dirfd)
    foreign = sorted(n for n in names if not _made_here(n, dirfd))
    if not foreign and proof and OWNER_FILE in names and not _is_record(dirfd):
        foreign = [OWNER_FILE]
    if foreign:
        return foreign
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)
    return []


def remove_instance(aside: str, dirfd: int) -> None:
    """Delete our instance, moved aside to ``aside``, through its descriptor ``dirfd``.

    The usual instance holds only its owner record: unlink it, then ``rmdir``
    (the same two calls as a path-based delete). Anything else inside is taken
    apart by name; an instance holding entries the lock did not make is left,
    with a warning, for a person to look at.
    """
    try:
        # Any failure of the quick way (something else inside, an I/O error, the
        # name no longer leading to our instance) leaves the thorough way below.
        with contextlib.suppress(OSError):
            os.unlink(OWNER_FILE, dir_fd=dirfd)
        with contextlib.suppress(OSError):
            os.rmdir(aside)  # only an empty directory, never through a symbolic link
            return
        foreign = take_apart(dirfd)
        if foreign:
            log.warning(
                "lock directory %s holds entries statestore did not make (%s): left in place",
                aside,
                ", ".join(foreign[:5]),
            )
            return
        os.rmdir(aside)
    except OSError as e:
        log.warning("could not delete the released lock directory %s (%s)", aside, e)


def claims(dirfd: int) -> list[str]:
    """The claims in a lock instance, in the order they were taken."""
    names = [n for n in os.listdir(dirfd) if _CLAIM_RE.fullmatch(n)]
    return sorted(names, key=lambda n: 1 if n == CLAIM else int(n.rpartition(".")[2]))


def live_claim(dirfd: int) -> bool:
    """Whether some process that may still be running holds a claim in the instance."""
    for name in claims(dirfd):
        try:
            tag = os.readlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            continue  # not a symbolic link: not a claim
        if claim_maker_alive(tag) is not False:
            return True
    return False


def sweep_aside(path: str) -> None:
    """Delete instances of the lock at ``path`` renamed aside by a process that died
    before deleting them (its kill landed between the rename and the removal).

    Only entries proven to be lock instances go (see the module doc). Aside names
    are unique and nobody reads them: deleting one that its renamer is deleting
    at the same time is harmless (both ignore what is already gone).
    """
    folder, name = os.path.split(path)
    try:
        folder_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        names = os.listdir(folder_fd)
        for entry in names:
            if entry.startswith(name) and _ASIDE_RE.fullmatch(entry, len(name)):
                _sweep_one(folder_fd, entry)
    except OSError:
        pass
    finally:
        _close(folder_fd)


def _sweep_one(folder_fd: int, entry: str) -> None:
    try:
        _remove_aside(folder_fd, entry)
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            log.warning("%s: %s", entry, e.strerror)


def _remove_aside(folder_fd: int, entry: str) -> None:
    """Delete the moved-aside instance ``entry`` of the folder behind ``folder_fd``.

    Raises OSError, and removes nothing, unless it is proven to be a lock instance
    (``ENOTEMPTY`` when it holds what the lock never holds).
    """
    # O_NOFOLLOW | O_DIRECTORY: a symbolic link or anything but a real directory
    # planted under an aside name fails here, and is left alone.
    dirfd = os.open(entry, _DIR_FLAGS | os.O_NONBLOCK, dir_fd=folder_fd)
    try:
        foreign = take_apart(dirfd, proof=True)
        if foreign:
            raise OSError(
                errno.ENOTEMPTY,
                "looks like a lock directory set aside, but holds entries statestore did "
                f"not make ({', '.join(foreign[:5])}): left in place",
            )
        made = os.fstat(dirfd)
        now = os.stat(entry, dir_fd=folder_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
            raise OSError(errno.ESTALE, "replaced while it was being removed")
        os.rmdir(entry, dir_fd=folder_fd)
    finally:
        _close(dirfd)


def remove_leftover(path: str) -> None:
    """Delete the moved-aside lock instance at ``path`` (``statestore doctor --fix``).

    Raises OSError, removing nothing, unless it is a real directory (not a symbolic
    link) that holds only what a lock instance holds (see the module doc).
    """
    folder, entry = os.path.split(os.path.abspath(path))
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_aside(folder_fd, entry)
    finally:
        _close(folder_fd)


def take_claim(dirfd: int, lease: float) -> str | None:
    """Take the removal claim of the lock instance behind ``dirfd``.

    A claim is a symbolic link whose target names its maker, so it is made
    with its identity in one atomic step. Returns the claim's name, or None
    when someone else holds it (or the instance is being deleted). Working
    through the instance's descriptor keeps claim and undo on that instance,
    wherever it has moved. Raises OSError when the claim cannot be made at all.
    """
    index = 1
    while True:
        name = CLAIM if index == 1 else f"{CLAIM}.{index}"
        try:
            os.symlink(claim_tag(), name, dir_fd=dirfd)
            return name
        except FileExistsError:
            pass
        except (FileNotFoundError, NotADirectoryError):
            return None  # the instance is being deleted
        # Any other error propagates: the caller names the lock in its message.
        try:
            os.stat(f"{CLAIM}.{index + 1}", dir_fd=dirfd, follow_symlinks=False)
            index += 1  # a later claim took this one over: look at that one
            continue
        except FileNotFoundError:
            pass
        except OSError:
            return None
        try:
            tag = os.readlink(name, dir_fd=dirfd)
            made = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # undone meanwhile: try this one again
        except OSError as e:
            if e.errno == errno.EINVAL:
                index += 1  # not a symbolic link, so nobody's claim: the next one
                continue
            return None
        alive = claim_maker_alive(tag)
        # Take over only the claim of a process that is provably dead (spec/: taking
        # over by age lets a breaker that merely stalled move the next holder's
        # lock), or, for a maker on another host, one older than a lease.
        stale = time.time() - made > max(lease, CLAIM_GRACE)
        if alive is False or (alive is None and stale):
            index += 1  # one further, which again only one process can do
            continue
        return None


def drop_claim(dirfd: int, claim: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(claim, dir_fd=dirfd)


def move_aside(path: str, kind: str) -> str:
    """Rename the instance at ``path`` to a unique name beside it, in one step.

    The name is ``<path>.<12 hex>.<kind>``, which :func:`sweep_aside` recognises
    when the process that moved it dies before deleting it.
    """
    aside = f"{path}.{secrets.token_hex(6)}.{kind}"
    os.rename(path, aside)
    return aside
