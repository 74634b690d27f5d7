"""The floor: the system calls of one durable update and nothing else. No lock, no JSON
parsing, no validation on the update path: the counter sits at a fixed byte offset as a
right-aligned, space-padded number (still valid JSON), so an update is read, a byte splice,
write temp, fsync, rename, fsync folder. ``read()`` validates, so readers can be compared."""

from __future__ import annotations

import os
from typing import Any

from bench_common import read_bytes
from pydantic import BaseModel

PREFIX = b'{"counter":'
WIDTH = 20
START = len(PREFIX)
END = START + WIDTH


class RawFloorContender:
    def __init__(self, path: str, model: type[BaseModel]) -> None:
        self.path = path
        self.tmp = path + ".tmp"
        self.model = model
        self.dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)

    def _write(self, data: bytes) -> None:
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.tmp, self.path)
        os.fsync(self.dir_fd)

    def create(self, doc: BaseModel) -> None:
        body = doc.model_dump_json(exclude={"counter"}).encode()
        counter = str(doc.counter).rjust(WIDTH).encode()  # type: ignore[attr-defined]
        sep = b"," if body != b"{}" else b""
        self._write(PREFIX + counter + sep + body[1:])

    def update_increment(self, on_enter: Any = None) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.read(fd, os.fstat(fd).st_size + 1)
        finally:
            os.close(fd)
        if on_enter is not None:
            on_enter()
        value = int(data[START:END]) + 1
        self._write(data[:START] + str(value).rjust(WIDTH).encode() + data[END:])

    def read(self) -> Any:
        return self.model.model_validate_json(read_bytes(self.path))

    def close(self) -> None:
        os.close(self.dir_fd)


def make(path: str, model: type[BaseModel]) -> RawFloorContender:
    return RawFloorContender(path, model)
