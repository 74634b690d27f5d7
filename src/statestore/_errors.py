"""The errors statestore raises.

Every error carries the path it is about (``error.path``) and names it in
``str(error)``, says what a person can do about it, subclasses the builtin it
resembles (so ``except TimeoutError`` or ``except OSError`` keep working), and
survives pickling (so it crosses process pools intact)::

    StateStoreError
    ├── LockTimeout                 (TimeoutError)   the lock stayed busy
    │   └── WaitAbandoned                            cancel_check() ended the wait
    ├── LockCompromisedError        (RuntimeError)   our lock was broken while held
    ├── LockError                   (OSError)        the lock folder is unusable
    │   └── LockPermissionError     (PermissionError) EACCES / EPERM on the lock
    ├── StateNotFoundError          (FileNotFoundError)
    ├── StateReadError              (OSError)        the file cannot be read
    │   └── StateMissingError                        missing, but it existed: no default
    ├── StateCorruptError           (ValueError)     not JSON / not a JSON object
    ├── StateValidationError        (ValueError)     JSON that the model rejects
    ├── StateWriteError             (OSError)        the save failed, old file intact
    │   └── CrossDeviceError                         EXDEV / EBUSY on rename
    ├── DurabilityError             (OSError)        published, durability (or commit) unknown
    ├── SchemaVersionError          (ValueError)     file newer than the code, bad chain
    ├── MigrationError              (ValueError)     a migration step failed
    ├── NestedTransactionError      (RuntimeError)   update() inside transaction()
    └── ConflictError               (RuntimeError)   save(expect=) found another revision

A ``StateWriteError`` means nothing was saved: retrying the same ``update(fn)``
applies ``fn`` once. An error raised after the new document was published is
never one: ``DurabilityError`` is its sibling, not its subclass.

An error about a document a person can edit says where and what next:
``StateCorruptError`` and ``StateValidationError`` carry ``line`` and ``column``
(1-based, in characters; for a validation error, of the first error's field,
and ``positions`` has one per error), print them as ``path:line:column`` and
per field, and end with a next step (``hint``). These are the positions the
command line shows: it reads them from the error, never recomputes them.

The public classes show as ``statestore.<Name>`` (tracebacks, ``repr`` of the
class, pickles), the name they are imported by, not this private module's.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = [
    "CORRUPT_HINT",
    "ConflictError",
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
    "StateMissingError",
    "StateNotFoundError",
    "StateReadError",
    "StateStoreError",
    "StateValidationError",
    "StateWriteError",
    "WaitAbandoned",
    "write_error",
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
    """The state file exists but cannot be read (not a regular file, too large, no
    permission, I/O error)."""


class StateMissingError(StateReadError):
    """The state file is missing, but something says it existed (a quarantined copy,
    an editor's backup): the store does not start over from its default.

    Not a :class:`StateNotFoundError` (nor a ``FileNotFoundError``), so that code
    which falls back to a fresh state on "not found" does not reset it either.
    """


class StateCorruptError(StateStoreError, ValueError):
    """The file is not a JSON object. It is left untouched.

    ``line`` and ``column`` (1-based) say where, when known; ``hint`` is the next
    step, shown at the end of ``str(error)``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        line: int | None = None,
        column: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.line = line
        self.column = column
        self.hint = hint
        super().__init__(path, message)

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        text = f"{where}: {self.message}"
        return f"{text}; {self.hint}" if self.hint else text

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {
            **super()._pickle_kwargs(),
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
        }


#: The next step after a stored document could not be parsed.
CORRUPT_HINT: Final = "edit it to fix this, or put back a copy, then load it again"
#: The next step after a stored document failed validation.
VALIDATION_HINT: Final = (
    "fix those fields in the document, or, if the model changed on purpose, give the "
    "store a new version and a migration; the document was left untouched"
)


class StateValidationError(StateStoreError, ValueError):
    """The document does not fit the model. ``errors`` is pydantic's error list.

    Given the document's text (``source``), each error is located in it:
    ``positions[i]`` is the 1-based (line, column) of ``errors[i]``'s field (for a
    missing field, of the object that lacks it), or None; ``line`` and ``column``
    are the first error's. ``hint``, the next step, ends ``str(error)``; for a
    stored document it defaults to :data:`VALIDATION_HINT`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        errors: Sequence[Mapping[str, Any]] = (),
        source: bytes | str | None = None,
        positions: Sequence[tuple[int, int] | None] | None = None,
        hint: str | None = None,
    ) -> None:
        self.errors = [dict(e) for e in errors]
        if positions is None:
            positions = _locate(source, self.errors) if source is not None else ()
        self.positions: list[tuple[int, int] | None] = [
            None if p is None else (int(p[0]), int(p[1])) for p in positions
        ]
        first = next((p for p in self.positions if p is not None), None)
        self.line = None if first is None else first[0]
        self.column = None if first is None else first[1]
        self.hint = VALIDATION_HINT if hint is None and source is not None else hint
        super().__init__(path, message or self._describe())

    def __str__(self) -> str:
        text = StateStoreError.__str__(self)
        return f"{text}\n{self.hint}" if self.hint else text

    def _describe(self) -> str:
        lines = [f"{len(self.errors)} validation error(s) against the model:"]
        for i, e in enumerate(self.errors[:10]):
            loc = ".".join(str(p) for p in e.get("loc", ())) or "(document)"
            at = self.positions[i] if i < len(self.positions) else None
            where = f" (line {at[0]}, column {at[1]})" if at is not None else ""
            lines.append(f"  {loc}{where}: {e.get('msg')}")
        if len(self.errors) > 10:
            lines.append(f"  ... and {len(self.errors) - 10} more")
        return "\n".join(lines)

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {
            **super()._pickle_kwargs(),
            "errors": self.errors,
            "positions": self.positions,
            "hint": self.hint,
        }


class StateWriteError(_OSErrorMixin):
    """Saving failed before the new content was published; the old file is intact."""


class CrossDeviceError(StateWriteError):
    """The atomic rename was refused because source and target are on different mounts.

    ``EXDEV`` (the folder is a mount point boundary) or ``EBUSY`` (the state
    file itself is bind-mounted, as with a single file mounted into a container).
    """


class DurabilityError(_OSErrorMixin):
    """The new content is in place, but syncing the folder failed.

    The save is visible to other processes; whether it would survive a power
    loss is unknown. The file is consistent either way (old or new, never mixed).
    A server-side storage raises it when the answer to a commit was lost and the
    outcome could not be found out: the document is whole, old or new.

    Not a :class:`StateWriteError`, which promises that nothing was saved: the
    change this save carried has been applied, so running the same ``update(fn)``
    again would apply ``fn`` a second time. Load the state to see it, and sync
    or check the disk before relying on it surviving a power loss.
    """


class SchemaVersionError(StateStoreError, ValueError):
    """The file's schema version cannot be handled by this code, or the chain is wrong."""


class MigrationError(StateStoreError, ValueError):
    """A migration step raised, returned something not a dict, or made an invalid document."""


class NestedTransactionError(StateStoreError, RuntimeError):
    """update() or transaction() called inside a transaction of the same store."""


class ConflictError(StateStoreError, RuntimeError):
    """``save(state, expect=revision)`` found the document at another revision:
    someone committed meanwhile; nothing was written."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str = "",
        *,
        expected: str = "",
        found: str = "",
    ) -> None:
        self.expected = expected
        self.found = found
        super().__init__(
            path,
            message
            or (
                f"the document is at revision {found}, not at {expected} as save(expect=) "
                "required: it was changed since it was read (by another program, or by "
                "hand); nothing was written. Read it again (store.read()), apply the "
                "change to what is there now, and save with the new revision"
            ),
        )

    def _pickle_kwargs(self) -> dict[str, Any]:
        return {**super()._pickle_kwargs(), "expected": self.expected, "found": self.found}


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


# ------------------------------------------------------------------ positions

_WS: Final = re.compile(r"[ \t\n\r]*")
_DECODER: Final = json.JSONDecoder()


def _offsets(text: str) -> dict[tuple[Any, ...], int]:
    """Offset of every value in a JSON text, by path (members: the offset of their key)."""
    found: dict[tuple[Any, ...], int] = {}

    def ws(i: int) -> int:
        m = _WS.match(text, i)
        return m.end() if m else i

    def value(i: int, path: tuple[Any, ...]) -> int:
        i = ws(i)
        found.setdefault(path, i)
        if text[i] in "{[":
            close, n = ("}" if text[i] == "{" else "]"), 0
            i = ws(i + 1)
            while text[i] != close:
                if close == "}":
                    key, j = _DECODER.raw_decode(text, i)
                    member = (*path, key)
                    found[member] = i
                    i = value(ws(j) + 1, member)  # past the ':'
                else:
                    i = value(i, (*path, n))
                n += 1
                i = ws(i)
                if text[i] == ",":
                    i = ws(i + 1)
            return i + 1
        end: int = _DECODER.raw_decode(text, i)[1]  # a string, number, true, false or null
        return end

    # Positions are a courtesy: report what was found.
    with contextlib.suppress(ValueError, IndexError, RecursionError):
        value(0, ())
    return found


def _locate(
    source: bytes | str, errors: Sequence[Mapping[str, Any]]
) -> list[tuple[int, int] | None]:
    """The (line, column) in ``source`` of each error's field: its longest path in the text."""
    if isinstance(source, bytes):
        source = source.decode("utf-8", "replace")
    text = source.removeprefix("\ufeff")
    offsets = _offsets(text)
    located: list[tuple[int, int] | None] = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        # The longest prefix of the error's path that is in the text: a missing field
        # points at its object; union member names are not in the text.
        at = next((loc[:n] for n in range(len(loc), -1, -1) if loc[:n] in offsets), None)
        if at is None:
            located.append(None)
            continue
        before = text[: offsets[at]]
        located.append((before.count("\n") + 1, len(before) - before.rfind("\n")))
    return located


class WaitAbandoned(LockTimeout):
    """The waiter gave up before it got the lock: its ``cancel_check()`` returned true.

    A :class:`LockTimeout`, as in filelock, so ``except LockTimeout`` covers both
    ways of not getting the lock.
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
        super().__init__(
            path,
            message or "stopped waiting for the lock: cancel_check() returned true",
            timeout=timeout,
            holder=holder,
            alive=alive,
        )


# Shown as ``statestore.<Name>``, the name they are imported by. Pickles name the
# class by its module too, and ``statestore`` exports each of them (a test holds it).
for _cls in list(globals().values()):
    public = not getattr(_cls, "__name__", "_").startswith("_")
    if public and isinstance(_cls, type) and issubclass(_cls, StateStoreError):
        _cls.__module__ = "statestore"
del _cls, public
