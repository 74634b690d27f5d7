"""statestore: typed, crash-safe JSON state files that many processes can update at once.

>>> from pydantic import BaseModel
>>> from statestore import StateStore
>>> class Counter(BaseModel):
...     count: int = 0
>>> store = StateStore(Counter, "counter.json", default=Counter)  # doctest: +SKIP
>>> store.update(lambda s: Counter(count=s.count + 1))  # doctest: +SKIP
Counter(count=1)
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._document import Snapshot, WrittenBy
from ._errors import (
    ConflictError,
    CrossDeviceError,
    DurabilityError,
    LockCompromisedError,
    LockError,
    LockPermissionError,
    LockTimeout,
    MigrationError,
    NestedTransactionError,
    SchemaVersionError,
    StateCorruptError,
    StateMissingError,
    StateNotFoundError,
    StateReadError,
    StateStoreError,
    StateValidationError,
    StateWriteError,
    WaitAbandoned,
)
from ._folder import FolderSnapshot, FolderTransaction, StateFolder
from ._history import HistoryEntry
from ._lock import AcquiredLock, DirectoryLock, LockOwner, LockStatus
from ._migrate import MigrationReport
from ._store import ChangeHandle, StateStore, Watch

if _TYPE_CHECKING:
    from ._async import AsyncStateStore, AsyncWatch
    from ._async_folder import AsyncFolderTransaction, AsyncStateFolder
    from ._lock import AsyncAcquiredLock, AsyncDirectoryLock

# The asyncio API is imported on first use, so that a program that never uses
# it does not pay for importing asyncio at start-up.
_LAZY = {
    "AsyncStateStore": "._async",
    "AsyncWatch": "._async",
    "AsyncFolderTransaction": "._async_folder",
    "AsyncStateFolder": "._async_folder",
    "AsyncAcquiredLock": "._lock",
    "AsyncDirectoryLock": "._lock",
}


def __getattr__(name: str) -> _Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "AcquiredLock",
    "AsyncAcquiredLock",
    "AsyncDirectoryLock",
    "AsyncFolderTransaction",
    "AsyncStateFolder",
    "AsyncStateStore",
    "AsyncWatch",
    "ChangeHandle",
    "ConflictError",
    "CrossDeviceError",
    "DirectoryLock",
    "DurabilityError",
    "FolderSnapshot",
    "FolderTransaction",
    "HistoryEntry",
    "LockCompromisedError",
    "LockError",
    "LockOwner",
    "LockPermissionError",
    "LockStatus",
    "LockTimeout",
    "MigrationError",
    "MigrationReport",
    "NestedTransactionError",
    "SchemaVersionError",
    "Snapshot",
    "StateCorruptError",
    "StateFolder",
    "StateMissingError",
    "StateNotFoundError",
    "StateReadError",
    "StateStore",
    "StateStoreError",
    "StateValidationError",
    "StateWriteError",
    "WaitAbandoned",
    "Watch",
    "WrittenBy",
]
