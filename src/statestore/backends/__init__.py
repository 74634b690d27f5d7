"""Where a store's bytes live.

A :class:`~statestore.StateStore` does its load, migrate, validate and save
logic on bytes; a *storage* backend only keeps them. The interface is small on
purpose: a lock-free read of the current bytes, and a locked session in which
the store reads and writes. The file system (:class:`FileStorage`) is the
default; other backends (PostgreSQL, SQLite) implement the same two protocols.

The store asks its storage for everything that differs between backends: the
lock (a file storage builds the directory lock beside its file), durability,
the identities used to detect nesting, and a session for sync and async code;
it never asks which backend it has.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol, cast, runtime_checkable

from .._lock import DirectoryLock
from .file import FileStorage

__all__ = ["FileStorage", "Session", "Storage", "complete"]


@runtime_checkable
class Session(Protocol):
    """Exclusive access to one document, for one load-modify-save."""

    def read(self) -> bytes | None:
        """The current bytes, or None when there is no document yet."""

    def write(self, data: bytes) -> None:
        """Publish ``data`` atomically; raise LockCompromisedError if exclusivity was lost."""

    def backup(self, label: str, data: bytes) -> str:
        """Keep ``data`` under ``label`` unless a backup with that label exists; return where."""

    def backup_location(self, label: str) -> str:
        """Where :meth:`backup` keeps (or would keep) the backup called ``label``."""


@runtime_checkable
class Storage(Protocol):
    """Keeps the bytes of one document."""

    @property
    def location(self) -> str:
        """A path or URL naming the document, for messages."""

    def read(self) -> bytes | None:
        """The current bytes without taking the lock, or None when there are none."""

    def exists(self) -> bool:
        """Whether a document is stored."""

    @property
    def durable(self) -> bool:
        """Whether a committed write survives a power loss (fsync, synchronous commit)."""

    @property
    def identity(self) -> str:
        """The document's identity: equal for two storages of one document.

        A locked operation inside another one on the same identity, in one thread
        or task, is refused as nested instead of waiting for itself or
        overwriting the inner result.
        """

    @property
    def lock(self) -> DirectoryLock | None:
        """A lock object a program can hold across calls, if the storage has one."""

    def session(self, timeout: float) -> AbstractContextManager[Session]:
        """Exclusive access, waiting at most ``timeout`` seconds for it."""

    def async_session(self, timeout: float) -> AbstractAsyncContextManager[Session]:
        """:meth:`session` for asyncio: waiting never blocks the event loop, and a
        cancelled wait leaves nothing held. The session's methods block (the async
        store calls them on worker threads)."""


class _Defaults:
    """A storage written to the first, smaller protocol (``location``, ``read``,
    ``exists``, ``session``), with the members added since given their defaults:
    durable, its location as its identity, no lock object, and an async session
    whose blocking steps run on worker threads."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.location: str = storage.location
        self.durable: bool = bool(getattr(storage, "durable", True))
        self.identity: str = getattr(storage, "identity", storage.location)
        lock = getattr(storage, "lock", None)  # only a lock object of ours counts
        self.lock: DirectoryLock | None = lock if isinstance(lock, DirectoryLock) else None

    def read(self) -> bytes | None:
        data: bytes | None = self._storage.read()
        return data

    def exists(self) -> bool:
        return bool(self._storage.exists())

    def session(self, timeout: float) -> AbstractContextManager[Session]:
        cm: AbstractContextManager[Session] = self._storage.session(timeout)
        return cm

    def async_session(self, timeout: float) -> AbstractAsyncContextManager[Session]:
        found = getattr(self._storage, "async_session", None)
        if found is not None:
            cm: AbstractAsyncContextManager[Session] = found(timeout)
            return cm
        from .._async import threaded_session  # asyncio only for programs that use it

        return threaded_session(self.session, self.identity, self.location, timeout)


def complete(storage: Any) -> Storage:
    """``storage`` itself when it has every member of :class:`Storage`, else it with
    the defaults of the members it lacks (see ``_Defaults``)."""
    if all(hasattr(storage, m) for m in ("durable", "identity", "lock", "async_session")):
        return cast(Storage, storage)
    return _Defaults(storage)
