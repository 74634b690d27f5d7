"""The errors statestore raises.

Every error carries the path it is about (``error.path``) and names it in
``str(error)``, says what a person can do about it, subclasses the builtin it
resembles (so ``except TimeoutError`` or ``except OSError`` keep working), and
survives pickling (so it crosses process pools intact)::

    StateStoreError
    ├── LockTimeout                 (TimeoutError)   the lock stayed busy
    ├── LockCompromisedError        (RuntimeError)   our lock was broken while held
    ├── LockError                   (OSError)        the lock folder is unusable
    │   └── LockPermissionError     (PermissionError) EACCES / EPERM on the lock
    ├── StateNotFoundError          (FileNotFoundError)
    ├── StateReadError              (OSError)        the file cannot be read
    ├── StateCorruptError           (ValueError)     not JSON / not a JSON object
    ├── StateValidationError        (ValueError)     JSON that the model rejects
    ├── StateWriteError             (OSError)        the save failed, old file intact
    │   ├── CrossDeviceError                         EXDEV / EBUSY on rename
    │   └── DurabilityError                          renamed, but the folder fsync failed
    ├── SchemaVersionError          (ValueError)     file newer than the code, bad chain
    ├── MigrationError              (ValueError)     a migration step failed
    └── NestedTransactionError      (RuntimeError)   update() inside transaction()
"""

from __future__ import annotations

import errno as _errno
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CrossDeviceError",
    "DurabilityError",
    "LockCompromisedError",
    "LockError",
    "LockPermissionError",
    "LockTimeout",
    "MigrationError",
    "NestedTransactionError",
    "SchemaVersionError",
    "StateCorruptError",
    "StateNotFoundError",
    "StateReadError",
    "StateStoreError",
    "StateValidationError",
    "StateWriteError",
]


class StateStoreError(Exception):
    """Base class of every error statestore raises."""

    def __init__(self, path: str | os.PathLike[str], message: str = "") -> None:
        self.path = os.fspath(path)
        self.message = message
        super().__init__(self.path, message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.message else self.path

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial(type(self), **self._pickle_kwargs()), ())

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {"path": self.path, "message": self.message}


class _OSErrorMixin(StateStoreError, OSError):
    """A StateStoreError that is also an OSError with a meaningful ``errno``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        errno: int | None = None,
    ) -> None:
        StateStoreError.__init__(self, path, message)
        # OSError's own attributes, so `except OSError as e: e.errno` works.
        self.errno = errno
        self.strerror = os.strerror(errno) if errno is not None else None
        self.filename = self.path

    def __str__(self) -> str:
        return StateStoreError.__str__(self)

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {**super()._pickle_kwargs(), "errno": self.errno}


class LockTimeout(StateStoreError, TimeoutError):
    """The lock could not be acquired before the timeout.

    ``holder`` is the owner record of the process that held it when we gave up
    (or None when it could not be read); ``alive`` says whether that process
    looked alive.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        timeout: float = 0.0,
        holder: Mapping[str, Any] | None = None,
        alive: bool | None = None,
    ) -> None:
        self.timeout = timeout
        self.holder = dict(holder) if holder is not None else None
        self.alive = alive
        super().__init__(path, message or self._describe())

    @property
    def lock_file(self) -> str:
        """The lock's path (filelock's name for :attr:`path`)."""
        return self.path

    def _describe(self) -> str:
        text = f"could not acquire the lock within {self.timeout:g} s"
        if self.holder is None:
            return text + " (the holder could not be identified)"
        h = self.holder
        age = h.get("age")
        age_text = f"for {age:.1f} s" if isinstance(age, (int, float)) else "for an unknown time"
        state = {True: "alive", False: "not alive", None: "of unknown liveness"}[self.alive]
        return (
            f"{text}: held by pid {h.get('pid')} on host {h.get('host')!r} {age_text} "
            f"(holder looks {state}); if that process is stuck, stop it, or run "
            f"'statestore lock status' on this path"
        )

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {
            **super()._pickle_kwargs(),
            "timeout": self.timeout,
            "holder": self.holder,
            "alive": self.alive,
        }


class LockCompromisedError(StateStoreError, RuntimeError):
    """The lock we held was broken by another process (our lease expired).

    Raised right before a commit, instead of writing: nothing was saved.
    """


class LockError(_OSErrorMixin):
    """The lock folder could not be created, read or removed (permissions, read-only disk).

    Built with ``errno`` EACCES or EPERM it is a :class:`LockPermissionError`,
    which is also a :class:`PermissionError` (as ``OSError(EACCES, ...)`` is).
    """

    def __new__(
        cls,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        errno: int | None = None,
    ) -> LockError:
        if cls is LockError and errno in (_errno.EACCES, _errno.EPERM):
            cls = LockPermissionError
        return super().__new__(cls, path, message)


class LockPermissionError(LockError, PermissionError):
    """A :class:`LockError` for want of permission: ``except PermissionError`` catches it."""


class StateNotFoundError(StateStoreError, FileNotFoundError):
    """The state file does not exist and the store has no default."""


class StateReadError(_OSErrorMixin):
    """The state file exists but cannot be read (a folder, no permission, I/O error)."""


class StateCorruptError(StateStoreError, ValueError):
    """The file is not a JSON object. It is left untouched."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.line = line
        self.column = column
        super().__init__(path, message)

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return f"{where}: {self.message}"

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {**super()._pickle_kwargs(), "line": self.line, "column": self.column}


class StateValidationError(StateStoreError, ValueError):
    """The document does not fit the model. ``errors`` is pydantic's error list."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        errors: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.errors = [dict(e) for e in errors]
        super().__init__(path, message or self._describe())

    def _describe(self) -> str:
        lines = [f"{len(self.errors)} validation error(s) against the model:"]
        for e in self.errors[:10]:
            loc = ".".join(str(p) for p in e.get("loc", ())) or "(document)"
            lines.append(f"  {loc}: {e.get('msg')}")
        if len(self.errors) > 10:
            lines.append(f"  ... and {len(self.errors) - 10} more")
        return "\n".join(lines)

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {**super()._pickle_kwargs(), "errors": self.errors}


class StateWriteError(_OSErrorMixin):
    """Saving failed before the new content was published; the old file is intact."""


class CrossDeviceError(StateWriteError):
    """The atomic rename was refused because source and target are on different mounts.

    ``EXDEV`` (the folder is a mount point boundary) or ``EBUSY`` (the state
    file itself is bind-mounted, as with a single file mounted into a container).
    """


class DurabilityError(StateWriteError):
    """The new content is in place, but syncing the folder failed.

    The save is visible to other processes; whether it would survive a power
    loss is unknown. The file is consistent either way (old or new, never mixed).
    """


class SchemaVersionError(StateStoreError, ValueError):
    """The file's schema version cannot be handled by this code, or the chain is wrong."""


class MigrationError(StateStoreError, ValueError):
    """A migration step raised, returned something that is not a dict, or produced an invalid document."""


class NestedTransactionError(StateStoreError, RuntimeError):
    """update() or transaction() called inside a transaction of the same store."""


def write_error(path: str | os.PathLike[str], exc: OSError, what: str) -> StateWriteError:
    """Wrap an OSError from the write path in the most specific typed error."""
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code in (_errno.EXDEV, _errno.EBUSY):
        return CrossDeviceError(
            path,
            f"cannot replace the file atomically ({reason}): the temporary file and the "
            "target are on different mounts, or the target is itself a mount point "
            "(a single file bind-mounted into a container); mount the whole folder "
            "instead of the file. Nothing was written.",
            errno=code,
        )
    hints = {
        _errno.ENOSPC: "the disk is full; free space and try again",
        _errno.EDQUOT: "the disk quota is exhausted; free space and try again",
        _errno.EACCES: "permission denied; check the folder's owner and mode",
        _errno.EPERM: "operation not permitted; check the folder's owner and mode",
        _errno.EROFS: "the file system is read-only",
        _errno.EIO: "an I/O error from the disk; check the device",
    }
    hint = hints.get(code or 0, reason)
    return StateWriteError(
        path, f"could not save ({what}: {reason}); {hint}. The old file is unchanged.", errno=code
    )
