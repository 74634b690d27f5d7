"""Paths: what a lock path may name, its canonical key, and the lock of a state file.

Rules:

* **A lock path names the lock directory itself**: ``""``, ``"."``, ``".."``
  or a path that ends in a separator means the working directory or a
  parent, a folder statestore did not make; it is a :class:`LockError`
  (:func:`check_lock_path`), so such a folder is never taken or moved.
* **One key per lock directory in a process**: :func:`canonical` resolves the
  folder's symbolic links (not the last component, which the lock never
  follows), so every lock object on one directory shares its per-path state.
* **A state file's lock is beside its real path**: :func:`real_path` resolves
  every link of the file, strictly, so a link that cannot be read is a
  :class:`LockError` rather than the name of another lock.
"""

from __future__ import annotations

import errno
import os

from .._errors import LockError

__all__ = ["canonical", "check_lock_path", "real_path"]


def canonical(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def real_path(file: str) -> str:
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


def check_lock_path(path: str | os.PathLike[str]) -> None:
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
