"""StateStore: a typed JSON document that many processes update without losing a write.

The public face only. What a save writes and how a document is read is the
format's (``_document.py``); the load, modify and save under the lock is the
transaction core's (``_transaction.py``), which :class:`AsyncStateStore` drives
too; where the bytes live, and the lock, are the storage's (``backends``). The
model shapes a store refuses are in ``_shapes.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic

from ._atomic import DEFAULT_MAX_SIZE
from ._document import Document, ModelT
from ._lock import DirectoryLock
from ._migrate import MigrationReport, Migrations
from ._schema import Draft, document_schema
from ._shapes import check_model
from ._transaction import Transaction, entered, lock_identity
from .backends import Storage, complete
from .backends.file import MISSING_WAIT, FileStorage

__all__ = ["ModelT", "StateStore"]


class StateStore(Generic[ModelT]):
    """A JSON state file validated by a pydantic model, safe to update from many processes.

    >>> class Counter(BaseModel):  # doctest: +SKIP
    ...     count: int = 0
    >>> store = StateStore(Counter, "state.json", default=Counter)  # doctest: +SKIP
    >>> store.update(lambda s: s.model_copy(update={"count": s.count + 1}))  # doctest: +SKIP
    Counter(count=1)

    Reading (:meth:`load`) takes no lock; :meth:`save`, :meth:`update` and
    :meth:`transaction` run under the store's lock and publish each save with an
    atomic rename, so readers always see a whole, valid document.
    """

    def __init__(
        self,
        model: type[ModelT],
        path: str | os.PathLike[str] | Storage,
        *,
        default: ModelT | Callable[[], ModelT] | None = None,
        lock: DirectoryLock | str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        durable: bool | None = None,
        version: int = 1,
        migrations: Migrations | None = None,
        schema_ref: str | None = None,
        read_attempts: int = 3,
        read_delay: float = 0.05,
        max_size: int | None = None,
        missing_wait: float | None = None,
    ) -> None:
        check_model(model)
        if isinstance(path, (str, os.PathLike)):
            storage: Storage = FileStorage(
                path,
                lock,
                timeout=timeout,
                durable=True if durable is None else durable,
                max_size=DEFAULT_MAX_SIZE if max_size is None else max_size,
                missing_wait=MISSING_WAIT if missing_wait is None else missing_wait,
            )
        else:
            if max_size is not None or missing_wait is not None:
                raise TypeError("max_size= and missing_wait= apply to file stores only")
            if lock is not None:
                raise TypeError("lock= applies to file stores only; this storage locks itself")
            if durable is not None:
                # Silently ignoring it would leave a store less durable than asked, or
                # slower than asked, with nothing to show for it.
                raise TypeError(
                    "durable= applies to file stores only; set it on the storage, for "
                    f"example {type(path).__name__}(..., durable=False)"
                )
            storage = complete(path)
        self._given: Storage = storage if isinstance(path, (str, os.PathLike)) else path
        self._storage = storage
        self.model = model
        self.timeout = timeout
        #: The storage's lock, for a program that holds it across calls (file
        #: stores: the directory lock beside the file), or None.
        self.lock: DirectoryLock | None = storage.lock
        #: Whether saves are fsynced (file stores), or as the storage makes them.
        self.durable = storage.durable
        self._doc: Document[ModelT] = Document(
            model,
            storage.location,
            default=default,
            version=version,
            migrations=migrations,
            schema_ref=schema_ref,
            read_attempts=read_attempts,
            read_delay=read_delay,
        )

    @property
    def schema_ref(self) -> str | None:
        """The ``"$schema"`` value the store writes (None: keep the file's)."""
        return self._doc.schema_ref

    @property
    def document(self) -> Document[ModelT]:
        """The document format this store reads and writes (``_document.Document``)."""
        return self._doc

    @property
    def default(self) -> ModelT | Callable[[], ModelT] | None:
        """The default (an instance or a factory) a missing document loads as, or None."""
        return self._doc.default

    @property
    def migrations(self) -> Migrations:
        """The migration steps, by the version each one upgrades from."""
        return self._doc.migrator.steps

    def __repr__(self) -> str:
        return f"StateStore({self.model.__name__}, {self._storage.location!r})"

    # ------------------------------------------------------------------ public

    @property
    def path(self) -> Path:
        """The state file. A store over another storage has no file: see :attr:`location`."""
        if not isinstance(self._storage, FileStorage):
            raise TypeError(
                f"{self._storage.location}: this store keeps its document in "
                f"{type(self._storage).__name__}, not in a file; use store.location"
            )
        return Path(self._storage.path)

    @property
    def location(self) -> str:
        """Where the document lives, as messages name it: the state file's path, or
        the storage's own name for it (a URL for PostgreSQL)."""
        return self._storage.location

    @property
    def version(self) -> int:
        """The schema version this store reads and writes."""
        return self._doc.version

    @property
    def storage(self) -> Storage:
        """Where the document lives (the storage given, or the file storage built)."""
        return self._given

    def exists(self) -> bool:
        """Whether the state file exists (the default does not count)."""
        return self._storage.exists()

    @property
    def has_default(self) -> bool:
        """Whether a missing document loads as the default (else :class:`StateNotFoundError`)."""
        return self._doc.default is not None

    def with_path(self, path: str | os.PathLike[str]) -> StateStore[ModelT]:
        """The same store (model, default, version, migrations, options) over another file.

        Its lock is the one beside the new file. Only for stores of files: a
        store over another storage raises :class:`TypeError`.
        """
        storage = self._storage
        if not isinstance(storage, FileStorage):
            raise TypeError(f"{self.location}: with_path() applies to stores of files only")
        return StateStore(
            self.model,
            path,
            default=self._doc.default,
            timeout=self.timeout,
            durable=self.durable,
            version=self.version,
            migrations=self._doc.migrator.steps,
            schema_ref=self.schema_ref,
            read_attempts=self._doc.read_attempts,
            read_delay=self._doc.read_delay,
            max_size=storage.max_size,
            missing_wait=storage.missing_wait,
        )

    def load(self) -> ModelT:
        """Read, migrate in memory and validate the state, without taking the lock.

        Missing file: the default, or :class:`StateNotFoundError`; but when something
        says the file existed (a copy quarantined by ``statestore doctor``, an
        editor's ``<name>~`` backup while it saves), :class:`StateMissingError`
        instead, after waiting up to ``missing_wait`` for an editor's new file
        (``docs/store.md``). Only a regular file of at most ``max_size`` bytes is
        read (:class:`StateReadError` otherwise). A file that does not parse is
        read again (``read_attempts`` times, ``read_delay`` apart) in case a writer
        that does not rename atomically is halfway through.
        """
        return self._doc.load(self._storage.read).model

    def save(self, state: ModelT) -> None:
        """Validate ``state`` and write it, under the lock.

        A file that exists but cannot be read (corrupt, invalid, or written by
        a newer version) is not overwritten: the error says so.
        """
        self._doc.check_type(state, "save()")
        with self._begin("save()") as txn:
            txn.save(state)

    def update(self, fn: Callable[[ModelT], ModelT | None]) -> ModelT:
        """Load, apply ``fn``, validate and save, all under the lock; return what was saved.

        ``fn`` returns a new model, or None after changing the one it was given.
        If it raises, nothing is written and the exception propagates.
        """
        with self._begin("update()") as txn:
            return txn.update(fn)

    @contextmanager
    def transaction(self) -> Iterator[ModelT]:
        """``with store.transaction() as state:`` load under the lock; saved on normal exit.

        An exception inside the block discards the changes and writes nothing.
        """
        with self._begin("transaction()") as txn:
            state = txn.begin()
            try:
                yield state
            except BaseException:
                txn.abort()
                raise
            txn.commit(state)

    def migrate(self, *, dry_run: bool = False) -> MigrationReport:
        """Upgrade the file to this store's version, under the lock, keeping a backup."""
        with self._begin("migrate()") as txn:
            return txn.migrate(dry_run=dry_run)

    def json_schema(
        self, draft: Draft = "2020-12", *, schema_id: str | None = None
    ) -> dict[str, Any]:
        """The JSON Schema of the document as stored (``docs/schema.md``).

        The model's schema plus the ``"schema_version"`` and ``"$schema"`` keys the
        file carries, with ``"$schema"`` (the dialect: ``"2020-12"`` or ``"07"``) and
        ``"$id"`` at the top. ``$id`` is ``schema_id``, else ``schema_ref`` when that
        is an absolute URI, else ``urn:statestore:model:<module>.<qualname>:v<version>``.
        The dict is in canonical order: ``json.dumps(schema, indent=2)`` is stable.
        """
        return document_schema(
            self.model, self.version, draft=draft, schema_id=schema_id, schema_ref=self.schema_ref
        )

    # ---------------------------------------------------------------- internals

    @contextmanager
    def _begin(self, what: str) -> Iterator[Transaction[ModelT]]:
        """A transaction in a session of the storage (its lock held), on this thread."""
        storage = self._storage
        # The document, and the lock only as held by an async operation: the file
        # lock is reentrant per thread, so two sync stores that share one lock may
        # nest (each commits its own file).
        with (
            entered(
                (storage.identity,),
                storage.location,
                what,
                lock=lambda: lock_identity(storage.lock),
            ),
            storage.session(self.timeout) as session,
        ):
            yield Transaction(self._doc, session)
