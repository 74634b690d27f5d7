"""StateFolder: several documents in one folder, one lock, committed together or not at all.

The rules (``docs/folders.md`` tells the whole story, ``_folder_journal.py``
holds the file format and the commit protocol):

* **Declared on disk.** Building a :class:`StateFolder` creates the folder (if
  missing) and its marker ``.statestore-folder.json``, which names the folder's
  lock. Every :class:`StateStore` of a file directly in a declared folder takes
  the folder's lock, whoever built it (``backends.file``), and so do the
  command line's ``lock``, ``doctor`` and ``migrate``.
* **One lock, one commit.** :meth:`StateFolder.transaction` takes the folder's
  lock once; ``tx[store]`` loads a document on first use (migrating it in
  memory, checking the newer-file guard); on normal exit every document that
  changed is proved to load back and then committed as one group through the
  journal. After a crash at any instant every document of the group is old or
  every one is new; the next holder of the lock completes an unfinished group.
  When the block raises, nothing is written.
* **Single saves are in order too.** A store's own ``save``/``update`` in a
  declared folder commits through the same journal (a group of one), so
  :meth:`StateFolder.read` sees every commit in order.
* **Lock-free snapshots.** :meth:`StateFolder.read` returns the documents as
  of one moment between commits, without the lock (a seqlock over the
  journal): never one document from before a group and another from after it.
* **A folder or a typed error.** ``StateFolder(path)`` creates a missing
  folder; a path that is a file (or a link to one), under a file, or in a
  folder this user may not write is a :class:`StateWriteError` naming it, and
  nothing is changed. A link to a folder is that folder.
* **No nesting.** A store's locked call on a document of the folder inside a
  folder transaction of the same thread raises :class:`NestedTransactionError`
  (its commit would be overwritten by the group's); so does ``tx[store]``
  inside that store's own transaction on the same thread (the group's commit
  would be overwritten by the outer one's). A folder transaction inside a
  store's transaction that touches only other documents is allowed: each
  commits its own documents.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from ._errors import StateStoreError, StateWriteError, write_error
from ._folder_journal import (
    DEFAULT_LOCK,
    MARKER,
    Marker,
    declare,
    group_commit,
    is_lock_name,
    read_consistent,
    read_marker,
    recover,
)
from ._lock import DEFAULT_LEASE, AcquiredLock, DirectoryLock
from ._migrate import Migrations
from ._store import StateStore
from ._transaction import Transaction, entered, lock_identity, lock_key
from .backends.file import FileSession, FileStorage

__all__ = ["FolderSnapshot", "FolderTransaction", "GroupTransaction", "StateFolder"]

M = TypeVar("M", bound=BaseModel)


class StateFolder:
    """A folder of state documents that share one lock and commit together.

    >>> folder = StateFolder("planning")  # doctest: +SKIP
    >>> roadmap = folder.store(Roadmap, "roadmap.json", default=Roadmap)  # doctest: +SKIP
    >>> progress = folder.store(Progress, "progress.json", default=Progress)  # doctest: +SKIP
    >>> with folder.transaction() as tx:  # doctest: +SKIP
    ...     task = tx[roadmap].tasks.pop(0)
    ...     tx[progress].doing.append(task)

    ``timeout`` is how long a locked operation waits for the folder's lock;
    ``lease`` the lock's lease; ``durable=False`` skips the fsyncs (a power
    loss may then lose recent commits, never tear one).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        lease: float = DEFAULT_LEASE,
        durable: bool = True,
        lock: str | None = None,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.timeout = timeout
        self.durable = durable
        _make_folder(self.path)
        self.marker: Marker = _declare_and_drain(
            self.path, DEFAULT_LOCK if lock is None else lock, timeout, lease
        )
        #: The folder's lock: hold it to keep every document of the folder still.
        self.lock = DirectoryLock(self.marker.lock_path, timeout=timeout, lease=lease)
        self._real = os.path.realpath(self.path)
        self._stores: dict[str, StateStore[Any]] = {}

    def __repr__(self) -> str:
        return f"StateFolder({self.path!r})"

    @classmethod
    def of(cls, path: str | os.PathLike[str], *, timeout: float = 10.0) -> StateFolder:
        """The folder already declared at ``path`` (a typed error if it is not one)."""
        return cls(path, timeout=timeout, lock=read_marker(os.fspath(path)).lock)

    def store(
        self,
        model: type[M],
        name: str,
        *,
        default: M | Callable[[], M] | None = None,
        version: int = 1,
        migrations: Migrations | None = None,
        schema_ref: str | None = None,
        read_attempts: int = 3,
        read_delay: float = 0.05,
        max_size: int | None = None,
        missing_wait: float | None = None,
        history: int | None = None,
    ) -> StateStore[M]:
        """A store of the document ``name`` (a plain file name) of this folder.

        An ordinary :class:`StateStore` in every way; its locked operations take
        the folder's lock, and its commits go through the folder's journal.
        """
        if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
            raise ValueError(
                f"{name!r}: a folder's document is named by a plain file name, without "
                "a folder (make another StateFolder for a subfolder)"
            )
        storage = FileStorage(
            os.path.join(self.path, name),
            self.lock,
            timeout=self.timeout,
            durable=self.durable,
            **_file_options(max_size, missing_wait),
        )
        made = StateStore(
            model,
            storage,
            default=default,
            version=version,
            migrations=migrations,
            schema_ref=schema_ref,
            read_attempts=read_attempts,
            read_delay=read_delay,
            history=history,
        )
        self._stores[name] = made
        return made

    @property
    def stores(self) -> tuple[StateStore[Any], ...]:
        """The stores made with :meth:`store`, one per document (the latest), by name."""
        return tuple(self._stores[n] for n in sorted(self._stores))

    @contextmanager
    def transaction(self) -> Iterator[FolderTransaction]:
        """``with folder.transaction() as tx:`` change several documents, commit them together.

        ``tx[store]`` is the loaded, mutable model of that store's document
        (loaded on first use, under the folder's lock). On normal exit every
        changed document is committed as one group; if the block raises,
        nothing is written.
        """
        with self._held("transaction()") as held:
            tx = FolderTransaction(self, held)
            try:
                yield tx
            except BaseException:
                tx.abort()
                raise
            tx.commit()

    def read(self, *stores: StateStore[Any]) -> FolderSnapshot:
        """The documents of ``stores`` as of one moment, without the lock.

        Each is validated (and migrated in memory) as :meth:`StateStore.load`
        does; a missing one is its store's default. Never mixes a document
        from before a group commit with one from after it.
        """
        names = {self._name_of(s): s for s in stores}
        raw = read_consistent(self.path, list(names))
        states: dict[str, Any] = {}
        for name, store in names.items():
            data = raw[name]
            doc = store.document
            states[name] = doc.make_default() if data is None else doc.parse(data).model
        return FolderSnapshot(self, states)

    def begin(self, held: AcquiredLock) -> FolderTransaction:
        """A transaction under ``held``, the folder's lock as this caller holds it
        (for the async face; ``transaction()`` takes the lock itself)."""
        recover(self.path)  # a group a crashed holder left is completed first
        return FolderTransaction(self, held)

    def recover(self) -> bool:
        """Complete an unfinished group commit (after a crash), under the lock;
        whether there was one. Every locked operation does this first anyway."""
        with self._held("recover()"):
            return recover(self.path) is not None

    # ---------------------------------------------------------------- internals

    @contextmanager
    def _held(self, what: str) -> Iterator[AcquiredLock]:
        lock = lock_identity(self.lock)
        assert lock is not None
        # Marked as a lock held for this thread's documents: a store's locked call on
        # one of them inside the block is refused, not committed and then overwritten.
        with entered((lock_key(lock),), self.path, f"a store's locked call inside {what}"):
            held = self.lock.acquire(self.timeout)
            try:
                recover(self.path)  # a group a crashed holder left is completed first
                yield held
            finally:
                held.release()

    def _name_of(self, store: StateStore[Any]) -> str:
        storage = store.storage
        if not isinstance(storage, FileStorage):
            raise StateStoreError(
                store.location, f"is not a document of the state folder {self.path}"
            )
        real = os.path.realpath(storage.path)
        if os.path.dirname(real) != self._real:
            raise StateStoreError(
                store.location,
                f"is not a document of the state folder {self.path} (a folder's "
                "documents are the files directly in it)",
            )
        return os.path.basename(real)


def _declare_and_drain(path: str, lock: str, timeout: float, lease: float) -> Marker:
    """Declare the folder; when this call publishes the marker, drain the documents' locks.

    Before the marker, a document's store takes the document's own lock
    (``<name>.lock``); after it, the folder's. A session that took its own lock
    before the marker appeared may still be writing, under a lock the folder's
    writers do not take: so the marker is published while the folder's lock is
    held, and every document lock in the folder is then acquired and released
    once (each such session has ended) before the folder's writers may start. A
    session that takes its own lock after the marker appeared sees the marker
    once it holds it and takes the folder's lock instead (``backends.file``).
    """
    if os.path.lexists(os.path.join(path, MARKER)):
        return declare(path, lock=lock)  # declared already: checked, nothing to drain
    if not is_lock_name(lock):
        return declare(path, lock=lock)  # which raises the typed error for the name
    held = DirectoryLock(os.path.join(path, lock), timeout=timeout, lease=lease).acquire(timeout)
    try:
        marker = declare(path, lock=lock)
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name == marker.lock or not name.endswith(".lock") or os.path.islink(full):
                continue
            if os.path.isdir(full):  # a document's own lock, held or left by a writer
                own = DirectoryLock(full, timeout=timeout, lease=lease)
                own.acquire(timeout).release()
    finally:
        held.release()
    return marker


def _make_folder(path: str) -> None:
    """Create the folder (and its parents) if missing; a typed error when it cannot be one."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if isinstance(e, StateStoreError):
            raise
        if os.path.lexists(path) and not os.path.isdir(path):
            raise StateWriteError(
                path,
                "is not a folder (it is a file, or a link to one): a StateFolder is a "
                "folder of documents. Give the folder's path (nothing was changed)",
                errno=errno.ENOTDIR,
            ) from e
        if e.errno == errno.ENOTDIR:
            raise StateWriteError(
                path,
                "cannot be a folder: a part of its path is a file, not a folder. Give the "
                "path of a folder (nothing was changed)",
                errno=e.errno,
            ) from e
        raise write_error(path, e, "create the state folder") from e


def _file_options(max_size: int | None, missing_wait: float | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if max_size is not None:
        options["max_size"] = max_size
    if missing_wait is not None:
        options["missing_wait"] = missing_wait
    return options


class GroupTransaction:
    """What every folder's transaction shares (files here, rows in
    ``backends.postgres``): ``tx[store]`` loads a document of the folder once, on
    first use, through the folder's own :meth:`_begin_document`; :meth:`staged`
    proves every changed document before the folder writes them as one group."""

    def __init__(self, folder: Any) -> None:
        self._folder = folder
        self._open: dict[str, tuple[StateStore[Any], Transaction[Any]]] = {}
        self._ended = False

    @overload
    def __getitem__(self, store: StateStore[M]) -> M: ...
    @overload
    def __getitem__(self, store: Any) -> Any: ...

    def __getitem__(self, store: Any) -> Any:
        if self._ended:
            raise RuntimeError("the folder transaction has ended")
        if not isinstance(store, StateStore):
            raise TypeError(f"tx[...] takes a StateStore of the folder, not {type(store).__name__}")
        name = self._folder._name_of(store)
        found = self._open.get(name)
        if found is not None:
            if found[0] is not store and found[0].model is not store.model:
                raise StateStoreError(
                    store.location,
                    "is already open in this transaction through another store with "
                    f"another model ({found[0].model.__name__}); use one store per document",
                )
            return found[1].loaded.model
        txn = self._begin_document(store)
        self._open[name] = (store, txn)
        return txn.loaded.model

    def _begin_document(self, store: StateStore[Any]) -> Transaction[Any]:
        """The document's transaction, begun in the folder's held group."""
        raise NotImplementedError

    def is_loaded(self, store: StateStore[Any]) -> bool:
        """Whether ``store``'s document was loaded into this transaction."""
        return self._folder._name_of(store) in self._open

    def staged(self) -> list[tuple[str, Transaction[Any], bytes]]:
        """(name, its transaction, new bytes) of every changed document, in name
        order, each proved to load back (and an older version's backup kept)."""
        if self._ended:
            raise RuntimeError("the folder transaction has ended")
        self._ended = True
        changed = []
        for name in sorted(self._open):
            store, txn = self._open[name]
            data = store.document.stage(txn.session, txn.loaded.model, txn.loaded)
            if data is not None:
                changed.append((name, txn, data))
        return changed


class FolderTransaction(GroupTransaction):
    """The documents of one :meth:`StateFolder.transaction`: ``tx[store]``."""

    def __init__(self, folder: StateFolder, held: AcquiredLock) -> None:
        super().__init__(folder)
        self._held = held

    def _begin_document(self, store: StateStore[Any]) -> Transaction[Any]:
        storage = store.storage
        assert isinstance(storage, FileStorage)
        # Inside a store's own transaction on this document (on this thread), the
        # group's commit would be overwritten by the outer one's: refused.
        with entered((storage.identity,), store.location, "a folder transaction's tx[store]"):
            pass
        session = FileSession(storage, self._held, None)  # reads only; the group writes
        txn: Transaction[Any] = Transaction(store.document, session)
        txn.begin()
        return txn

    def abort(self) -> None:
        """End without writing (what a block that raises does)."""
        self._ended = True
        for _, txn in self._open.values():
            txn.abort()

    def commit(self) -> None:
        """Commit every changed document as one group (what the end of the block does)."""
        changes = {name: data for name, _, data in self.staged()}
        if changes:
            group_commit(
                self._folder.path,
                changes,
                durable=self._folder.durable,
                verify=self._held.verify,
            )


class FolderSnapshot:
    """Documents read together by :meth:`StateFolder.read`: ``snapshot[store]``."""

    #: What looking a store up raises when it is not one of the folder's documents.
    _not_read: tuple[type[Exception], ...] = (KeyError, StateStoreError)

    def __init__(self, folder: Any, states: dict[str, Any]) -> None:
        self._folder = folder
        self._states = states

    @overload
    def __getitem__(self, store: StateStore[M]) -> M: ...
    @overload
    def __getitem__(self, store: Any) -> Any: ...

    def __getitem__(self, store: Any) -> Any:
        sync = getattr(store, "sync", store)  # an AsyncStateStore reads as its store
        try:
            return self._states[self._folder._name_of(sync)]
        except self._not_read:
            raise KeyError(f"{store!r} was not read into this snapshot") from None
