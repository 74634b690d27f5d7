"""The file system backend: a JSON file, a directory lock, atomic renames."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .._atomic import read_bytes, sweep_temp_files, write_atomic
from .._lock import DirectoryLock

__all__ = ["FileSession", "FileStorage"]


class FileSession:
    """The locked half of :class:`FileStorage`."""

    def __init__(self, storage: FileStorage) -> None:
        self._storage = storage

    def read(self) -> bytes | None:
        return read_bytes(self._storage.path)

    def write(self, data: bytes) -> None:
        s = self._storage
        write_atomic(s.path, data, durable=s.durable, before_replace=s.lock.verify)

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
        self.lock.acquire(timeout)
        try:
            if not self._swept:
                # Once per store and process: temp files of writers that died.
                sweep_temp_files(self.path)
                self._swept = True
            yield FileSession(self)
        finally:
            self.lock.release()
