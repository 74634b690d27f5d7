"""statestore: typed, crash-safe JSON state files that many processes can update at once.

>>> from pydantic import BaseModel
>>> from statestore import StateStore
>>> class Counter(BaseModel):
...     count: int = 0
>>> store = StateStore(Counter, "counter.json", default=Counter)  # doctest: +SKIP
>>> store.update(lambda s: Counter(count=s.count + 1))  # doctest: +SKIP
Counter(count=1)
"""

from ._async import AsyncStateStore, AsyncWatch
from ._async_folder import AsyncFolderTransaction, AsyncStateFolder
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
from ._lock import (
    AcquiredLock,
    AsyncAcquiredLock,
    AsyncDirectoryLock,
    DirectoryLock,
    LockOwner,
    LockStatus,
)
from ._migrate import MigrationReport
from ._store import ChangeHandle, StateStore, Watch

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
