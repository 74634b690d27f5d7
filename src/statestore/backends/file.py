"""The file system backend: a JSON file, a directory lock, atomic renames."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .._atomic import read_bytes, sweep_temp_files, write_atomic
from .._lock import AcquiredLock, DirectoryLock

__all__ = ["FileSession", "FileStorage"]


class FileSession:
    """The locked half of :class:`FileStorage`.

    It reads and writes the file its lock was taken for (for the store's own
    lock: the state file as resolved when the lock was taken, so a symlink
    switched meanwhile cannot send the write to a file this lock does not guard).
    """

    def __init__(self, storage: FileStorage, held: AcquiredLock) -> None:
        self._storage = storage
        self._held = held
        self.path = held.file or storage.path

    def read(self) -> bytes | None:
        return read_bytes(self.path)

    def write(self, data: bytes) -> None:
        s = self._storage
        write_atomic(self.path, data, durable=s.durable, before_replace=self._held.verify)

    def backup_location(self, label: str) -> str:
        return f"{self._storage.path}.{label}.bak"

    def backup(self, label: str, data: bytes) -> str:
        target = self.backup_location(label)
        # A backup keeps the first original of that version: never overwrite it.
        if not os.path.lexists(target):
            # With the state file's mode: a private state must not get a public backup.
            write_atomic(target, data, durable=self._storage.durable, mode_of=self._storage.path)
        return target


class FileStorage:
    """A state file at ``path``, guarded by ``lock``."""

    def __init__(self, path: str, lock: DirectoryLock, *, durable: bool = True) -> None:
        self.path = path
        self.lock = lock
        self.durable = durable
        self._swept = False

    @property
    def location(self) -> str:
        return self.path

    def read(self) -> bytes | None:
        return read_bytes(self.path)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    @contextmanager
    def session(self, timeout: float) -> Iterator[FileSession]:
        # The handle, not the thread, holds the lock: a session left on another
        # thread (a transaction ended by a thread pool) still releases it.
        held = self.lock.acquire(timeout)
        try:
            if not self._swept:
                # Once per store and process: temp files of writers that died.
                sweep_temp_files(self.path)
                self._swept = True
            yield FileSession(self, held)
        finally:
            held.release()
