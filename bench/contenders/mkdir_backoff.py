"""The common hand-rolled design: an ``os.mkdir`` lock retried with exponential backoff and
jitter, and a pid-named temp file renamed into place without any fsync.

Backoff: up to ATTEMPTS mkdir attempts; after failed attempt i (0-based) it sleeps
``BASE_S * 2**i + uniform(0, BASE_S)`` seconds. When all attempts fail the update gives up
with ``TimeoutError`` (a timeout, not a crash)."""

from __future__ import annotations

import os
import random
import time
from typing import Any

from bench_common import read_bytes
from pydantic import BaseModel

BASE_S = 0.100
ATTEMPTS = 10


class MkdirBackoffContender:
    def __init__(self, path: str, model: type[BaseModel]) -> None:
        self.path = path
        self.model = model
        self.lockdir = path + ".lock"

    def _acquire(self) -> None:
        for attempt in range(ATTEMPTS):
            try:
                os.mkdir(self.lockdir)
                return
            except FileExistsError:
                if attempt == ATTEMPTS - 1:
                    break
                time.sleep(BASE_S * 2**attempt + random.uniform(0, BASE_S))
        raise TimeoutError(f"lock {self.lockdir} still busy after {ATTEMPTS} attempts")

    def _release(self) -> None:
        os.rmdir(self.lockdir)

    def _write(self, doc: BaseModel) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(doc.model_dump_json().encode())
        os.replace(tmp, self.path)

    def create(self, doc: BaseModel) -> None:
        self._write(doc)

    def update_increment(self, on_enter: Any = None) -> None:
        self._acquire()
        try:
            state: Any = self.model.model_validate_json(read_bytes(self.path))
            if on_enter is not None:
                on_enter()
            state.counter += 1
            self._write(state)
        finally:
            self._release()

    def read(self) -> Any:
        return self.model.model_validate_json(read_bytes(self.path))

    def close(self) -> None:
        pass


def make(path: str, model: type[BaseModel]) -> MkdirBackoffContender:
    return MkdirBackoffContender(path, model)
