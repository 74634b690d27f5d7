"""Where a store's bytes live.

A :class:`~statestore.StateStore` does its load, migrate, validate and save
logic on bytes; a *storage* backend only keeps them. The interface is small on
purpose: a lock-free read of the current bytes, and a locked session in which
the store reads and writes. The file system (:class:`FileStorage`) is the
default; other backends (PostgreSQL) implement the same two protocols.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from .file import FileStorage

__all__ = ["FileStorage", "Session", "Storage"]


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

    def session(self, timeout: float) -> AbstractContextManager[Session]:
        """Exclusive access, waiting at most ``timeout`` seconds for it."""
