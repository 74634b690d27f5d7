"""TinyDB with its default ``JSONStorage`` and no lock, as most users run it. The document is
validated with pydantic inside TinyDB's update callback. TinyDB rewrites the file in place
(seek 0, write, fsync, truncate), so concurrent writers lose updates and readers can see a
half-written file: that is what this contender is here to show."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from tinydb import TinyDB

DOC_ID = 1


class TinyDBContender:
    def __init__(self, path: str, model: type[BaseModel]) -> None:
        self.model = model
        self.db = TinyDB(path)
        self.table = self.db.table("_default")

    def create(self, doc: BaseModel) -> None:
        self.table.truncate()
        doc_id = self.table.insert(doc.model_dump())
        assert doc_id == DOC_ID, doc_id

    def update_increment(self, on_enter: Any = None) -> None:
        model = self.model

        def transform(stored: dict[str, Any]) -> None:
            state: Any = model.model_validate(stored)
            if on_enter is not None:
                on_enter()
            state.counter += 1
            stored.update(state.model_dump())

        self.table.update(transform, doc_ids=[DOC_ID])

    def read(self) -> Any:
        stored = self.table.get(doc_id=DOC_ID)
        if stored is None:
            raise LookupError("document missing")
        return self.model.model_validate(dict(stored))

    def close(self) -> None:
        self.db.close()


def make(path: str, model: type[BaseModel]) -> TinyDBContender:
    return TinyDBContender(path, model)
