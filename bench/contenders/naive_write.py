"""The naive design, for the readers scenario: ``Path.write_text(model.model_dump_json())``,
with no lock, no temp file and no rename. ``write_text`` opens with "w", which truncates the
file before writing, so a reader can see an empty or half-written document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_common import read_bytes
from pydantic import BaseModel


class NaiveWriteContender:
    def __init__(self, path: str, model: type[BaseModel]) -> None:
        self.path = path
        self.model = model

    def _write(self, doc: BaseModel) -> None:
        Path(self.path).write_text(doc.model_dump_json())

    def create(self, doc: BaseModel) -> None:
        self._write(doc)

    def update_increment(self, on_enter: Any = None) -> None:
        state: Any = self.model.model_validate_json(read_bytes(self.path))
        if on_enter is not None:
            on_enter()
        state.counter += 1
        self._write(state)

    def read(self) -> Any:
        return self.model.model_validate_json(read_bytes(self.path))

    def close(self) -> None:
        pass


def make(path: str, model: type[BaseModel]) -> NaiveWriteContender:
    return NaiveWriteContender(path, model)
