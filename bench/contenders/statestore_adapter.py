"""statestore itself, through its public API only (``StateStore.update`` / ``StateStore.load``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from statestore import StateStore


class StateStoreContender:
    def __init__(self, path: str, model: type[BaseModel], durable: bool) -> None:
        self.model = model
        self.store: Any = StateStore(model, path, default=model(), durable=durable)

    def create(self, doc: BaseModel) -> None:
        self.store.update(lambda _current: doc.model_copy(deep=True))

    def update_increment(self, on_enter: Any = None) -> None:
        def bump(state: Any) -> None:
            if on_enter is not None:
                on_enter()
            state.counter += 1

        self.store.update(bump)

    def read(self) -> Any:
        return self.store.load()

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if callable(close):
            close()


def make(path: str, model: type[BaseModel], durable: bool = True) -> StateStoreContender:
    return StateStoreContender(path, model, durable)
