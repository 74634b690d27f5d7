"""The careful hand-rolled design: ``filelock.FileLock`` + temp file + fsync + ``os.replace``
+ fsync of the folder, with pydantic validation on every read and a dump on every write."""

from __future__ import annotations

import os
from typing import Any

from bench_common import fsync_dir, read_bytes
from filelock import FileLock
from pydantic import BaseModel

LOCK_TIMEOUT_S = 120.0


class FilelockContender:
    def __init__(self, path: str, model: type[BaseModel]) -> None:
        self.path = path
        self.model = model
        self.directory = os.path.dirname(os.path.abspath(path))
        self.lock = FileLock(
            path + ".lock", timeout=LOCK_TIMEOUT_S
        )  # filelock.Timeout is a TimeoutError

    def _write(self, doc: BaseModel) -> None:
        tmp = self.path + ".tmp"  # fixed name: only the lock holder writes it
        with open(tmp, "wb") as f:
            f.write(doc.model_dump_json().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.directory)

    def create(self, doc: BaseModel) -> None:
        with self.lock:
            self._write(doc)

    def update_increment(self, on_enter: Any = None) -> None:
        with self.lock:
            state: Any = self.model.model_validate_json(read_bytes(self.path))
            if on_enter is not None:
                on_enter()
            state.counter += 1
            self._write(state)

    def read(self) -> Any:
        return self.model.model_validate_json(read_bytes(self.path))

    def close(self) -> None:
        pass


def make(path: str, model: type[BaseModel]) -> FilelockContender:
    return FilelockContender(path, model)
