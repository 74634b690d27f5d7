"""AsyncStateFolder: the asyncio face of StateFolder, with the same rules.

The folder's lock is taken the way :class:`AsyncStateStore` takes a file's
(tasks of one loop in turn, a try on the loop, a thread only while another
process holds it); loading a document and the group commit run on worker
threads; the block runs on the loop. A task cancelled inside the block writes
nothing; one cancelled during the commit finishes it first. A locked call of
one of the folder's stores inside the block, in the same task, raises
:class:`NestedTransactionError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from ._async import AsyncStateStore, inside, run_step
from ._errors import NestedTransactionError
from ._folder import FolderSnapshot, FolderTransaction, StateFolder
from ._lock import DEFAULT_LEASE, AsyncDirectoryLock
from ._migrate import Migrations
from ._store import StateStore
from ._transaction import lock_identity, lock_key

__all__ = ["AsyncFolderTransaction", "AsyncStateFolder"]

M = TypeVar("M", bound=BaseModel)


class AsyncStateFolder:
    """The asyncio face of :class:`StateFolder`: the same folder, lock and journal.

    >>> folder = AsyncStateFolder("planning")  # doctest: +SKIP
    >>> roadmap = folder.store(Roadmap, "roadmap.json", default=Roadmap)  # doctest: +SKIP
    >>> async with folder.transaction() as tx:  # doctest: +SKIP
    ...     (await tx.load(roadmap)).tasks.append("ship")
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        lease: float = DEFAULT_LEASE,
        durable: bool = True,
    ) -> None:
        #: The underlying :class:`StateFolder` (blocking: not for the event loop).
        self.sync = StateFolder(path, timeout=timeout, lease=lease, durable=durable)

    def __repr__(self) -> str:
        return f"AsyncStateFolder({self.sync.path!r})"

    @property
    def path(self) -> str:
        return self.sync.path

    def store(
        self,
        model: type[M],
        name: str,
        *,
        default: M | Callable[[], M] | None = None,
        version: int = 1,
        migrations: Migrations | None = None,
        schema_ref: str | None = None,
    ) -> AsyncStateStore[M]:
        """An :class:`AsyncStateStore` of the document ``name`` (see :meth:`StateFolder.store`)."""
        return AsyncStateStore.from_store(
            self.sync.store(
                model,
                name,
                default=default,
                version=version,
                migrations=migrations,
                schema_ref=schema_ref,
            )
        )

    async def read(self, *stores: AsyncStateStore[Any] | StateStore[Any]) -> FolderSnapshot:
        """A consistent snapshot without the lock (see :meth:`StateFolder.read`);
        takes the folder's async stores or their sync stores, as ``tx.load`` does."""
        syncs = [s.sync if isinstance(s, AsyncStateStore) else s for s in stores]
        return await run_step(lambda: self.sync.read(*syncs))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncFolderTransaction]:
        """``async with folder.transaction() as tx:``; ``await tx.load(store)``; one
        group commit on normal exit, nothing written if the block raises."""
        folder = self.sync
        key = lock_key(lock_identity(folder.lock) or folder.lock.path)
        if key in inside.get():
            raise NestedTransactionError(
                folder.path,
                "transaction() called inside a transaction of the same folder, in the "
                "same task: it would wait for the lock the outer one holds",
            )
        level = await AsyncDirectoryLock.over(folder.lock).acquire(folder.timeout)
        token = inside.set(inside.get() | {key})
        try:
            tx = await run_step(lambda: folder.begin(level.handle))
            try:
                yield AsyncFolderTransaction(tx)
            except BaseException:
                tx.abort()
                raise
            await run_step(tx.commit)
        finally:
            inside.reset(token)
            await level.release()


class AsyncFolderTransaction:
    """The documents of one :meth:`AsyncStateFolder.transaction`."""

    def __init__(self, tx: FolderTransaction) -> None:
        self._tx = tx

    @overload
    async def load(self, store: AsyncStateStore[M]) -> M: ...
    @overload
    async def load(self, store: Any) -> Any: ...

    async def load(self, store: Any) -> Any:
        """The loaded, mutable model of ``store``'s document (read on first use)."""
        sync = store.sync if isinstance(store, AsyncStateStore) else store
        return await run_step(lambda: self._tx[sync])

    @overload
    def __getitem__(self, store: AsyncStateStore[M]) -> M: ...
    @overload
    def __getitem__(self, store: Any) -> Any: ...

    def __getitem__(self, store: Any) -> Any:
        """A document already loaded with :meth:`load` (no I/O on the loop)."""
        sync = store.sync if isinstance(store, AsyncStateStore) else store
        if not self._tx.is_loaded(sync):
            raise KeyError(f"{store!r}: await tx.load(store) first (it reads the file)")
        return self._tx[sync]
