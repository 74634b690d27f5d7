"""The contenders: every implementation of "increment a counter in a validated JSON document".

Each contender lives in its own module and exposes ``make(path, model, **options)``,
returning an object with:

- ``create(doc)``: write the initial state (called once, by the harness, before timing);
- ``update_increment(on_enter=None)``: one locked read-modify-write that adds 1 to
  ``counter``. ``on_enter`` (if given) is called at the start of the mutation, i.e. once
  the lock is held and the current state has been read and validated, so the harness can
  measure how long a caller waited to get there. A lock that cannot be acquired raises
  ``TimeoutError`` (or a subclass);
- ``read()``: a lock-free read that returns a validated model instance;
- ``close()``.

``path`` is the state file; a contender may keep sibling files next to it (lock files,
a SQLite database). Every contender gets a directory of its own.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel


class Contender(Protocol):
    def create(self, doc: BaseModel) -> None: ...

    def update_increment(self, on_enter: Any = None) -> None: ...

    def read(self) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Spec:
    key: str
    module: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, Spec] = {
    s.key: s
    for s in [
        Spec("statestore-durable", "statestore_adapter", "statestore durable", {"durable": True}),
        Spec(
            "statestore-nondurable",
            "statestore_adapter",
            "statestore non-durable",
            {"durable": False},
        ),
        Spec("statestore-sqlite", "statestore_sqlite", "statestore SqliteStorage (WAL, FULL)"),
        Spec("filelock-fsync", "filelock_baseline", "filelock + fsync (hand-rolled)"),
        Spec("mkdir-backoff", "mkdir_backoff", "mkdir lock + backoff, no fsync"),
        Spec("sqlite-full", "sqlite_wal", "sqlite WAL sync=FULL", {"synchronous": "FULL"}),
        Spec("sqlite-normal", "sqlite_wal", "sqlite WAL sync=NORMAL", {"synchronous": "NORMAL"}),
        Spec("tinydb", "tinydb_nolock", "TinyDB (no lock)"),
        Spec("raw-floor", "raw_floor", "raw floor (syscalls only)"),
        Spec("naive-write", "naive_write", "naive write in place (no lock, no rename)"),
    ]
}


class Unavailable(Exception):
    """The contender cannot run here (its library is missing or broken)."""


def spec(key: str) -> Spec:
    try:
        return SPECS[key]
    except KeyError:
        raise SystemExit(f"unknown contender {key!r}; known: {', '.join(SPECS)}") from None


def make(key: str, path: str, model: type[BaseModel]) -> Contender:
    """Build contender ``key`` on state file ``path``; raise Unavailable if it cannot load."""
    s = spec(key)
    try:
        module = importlib.import_module(f"contenders.{s.module}")
    except ImportError as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
    return module.make(path, model, **s.options)  # type: ignore[no-any-return]
