"""StateStore: a typed JSON document that many processes update without losing a write.

The public face only. What a save writes and how a document is read is the
format's (``_document.py``); the load, modify and save under the lock is the
transaction core's (``_transaction.py``), which :class:`AsyncStateStore` drives
too; where the bytes live, and the lock, are the storage's (``backends``). The
model shapes a store refuses are in ``_shapes.py``.

Revisions, watching and history (``docs/revisions.md``, ``docs/watching.md``):
:meth:`StateStore.read` gives a :class:`Snapshot` (state, revision, who wrote
it); ``save(state, expect=revision)`` is a compare-and-swap under the lock.
:meth:`StateStore.watch` yields a snapshot for each new revision: it wakes on
the watcher its storage gives (``storage.watcher()``: a file's inotify or stat
poll, PostgreSQL's LISTEN and slow poll), re-reads, and hands out a state
only when the revision differs from the last one it reported, so a burst of
commits gives the newest, and a wake-up without a change gives nothing. A
document that does not read or validate is an error event: the typed error is
raised from ``next()``, the iterator stays usable, and the same bad bytes are
not reported twice. ``history=N`` keeps the last N committed versions
through the keeper the storage gives (``storage.history(N)``; files:
``_history.py``), recorded under the lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic

from ._atomic import DEFAULT_MAX_SIZE
from ._combine import UpdateGroup
from ._document import Document, Loaded, ModelT, Snapshot, WrittenBy, revision_of
from ._errors import StateStoreError
from ._history import HistoryEntry, HistoryKeeper
from ._lock import DirectoryLock
from ._migrate import MigrationReport, Migrations
from ._schema import Draft, document_schema
from ._transaction import Transaction, entered, lock_identity
from .backends import Storage, complete
from .backends.file import MISSING_WAIT, FileStorage

if TYPE_CHECKING:
    from ._watch import Watcher

__all__ = ["ChangeHandle", "ModelT", "StateStore", "Watch"]

log = logging.getLogger("statestore")


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
        history: int | None = None,
    ) -> None:
        from ._shapes import check_model  # pydantic's secret and root types: on first use

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
        if history is not None:
            if isinstance(history, bool) or not isinstance(history, int) or history < 1:
                raise ValueError(f"history must be a number of versions >= 1, not {history!r}")
            if not callable(getattr(storage, "history", None)):
                raise TypeError(
                    "history= applies to storages that keep versions (file stores, "
                    f"PostgresStorage); {type(self._given).__name__} has no history()"
                )
        #: How many committed versions are kept (``history=N``), or None.
        self.history_size: int | None = history
        self._shared: Loaded[ModelT] | None = None  # the last load(shared=True)
        # Updates of this store's threads, committed together (``_combine.py``).
        self._group: UpdateGroup[ModelT] = UpdateGroup(
            self._doc,
            storage.session,
            lambda: entered(
                (storage.identity,),
                storage.location,
                "update()",
                lock=lambda: lock_identity(storage.lock),
            ),
            history,
            _timeout_of(weakref.ref(self)),
            lambda: storage.lock.path if storage.lock is not None else storage.location,
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
            history=self.history_size,
        )

    def load(self, *, shared: bool = False) -> ModelT:
        """Read, migrate in memory and validate the state, without taking the lock.

        ``shared=True``: when the file's bytes are, every one of them, the bytes
        of the last shared load, that load's model is returned again, not
        parsed anew (a byte comparison instead of a validation: for a 1 MB
        document tens of times faster). The model is then **shared** by every
        ``load(shared=True)`` of this store until the file changes: treat it as
        read-only. A change made to it is seen by the next shared load (and is
        not saved); to change the state use :meth:`update`, or
        ``load(shared=True).model_copy(deep=True)``. A plain ``load()`` always
        returns a model of its own.

        Missing file: the default, or :class:`StateNotFoundError`; but when something
        says the file existed (a copy quarantined by ``statestore doctor``, an
        editor's ``<name>~`` backup while it saves), :class:`StateMissingError`
        instead, after waiting up to ``missing_wait`` for an editor's new file
        (``docs/store.md``). Only a regular file of at most ``max_size`` bytes is
        read (:class:`StateReadError` otherwise). A file that does not parse is
        read again (``read_attempts`` times, ``read_delay`` apart) in case a writer
        that does not rename atomically is halfway through.
        """
        if not shared:
            return self._doc.load(self._storage.read).model
        return self._load_shared().model

    def _load_shared(self) -> Loaded[ModelT]:
        known = self._shared
        loaded = self._doc.load(self._storage.read, known)
        if loaded is not known and loaded.raw is not None:
            self._shared = loaded  # the default is made anew each time: it is cheap
        return loaded

    def read(self, *, shared: bool = False) -> Snapshot[ModelT]:
        """:meth:`load` with the document's revision and who committed it.

        ``snapshot.revision`` changes on every commit and every edit by hand;
        pass it to ``save(state, expect=snapshot.revision)``. ``written_by`` is
        None for a document changed by hand (or written by an older version)
        and for the default (revision ``"0"``). ``shared``: as for :meth:`load`
        (the snapshot's ``state`` is shared, read-only).
        """
        loaded = self._load_shared() if shared else self._doc.load(self._storage.read)
        return Snapshot(loaded.model, loaded.revision, loaded.written_by)

    def save(self, state: ModelT, *, expect: str | None = None) -> None:
        """Validate ``state`` and write it, under the lock.

        A file that exists but cannot be read (corrupt, invalid, or written by
        a newer version) is not overwritten: the error says so. ``expect``: a
        revision (from :meth:`read`); the save commits only if the document
        read under the lock is still at it, else raises :class:`ConflictError`
        and writes nothing (``"0"``: only if there is no document yet).
        """
        self._doc.check_type(state, "save()")
        if expect is not None and not isinstance(expect, str):
            raise TypeError(f"expect= takes a revision string, not {type(expect).__name__}")
        with self._begin("save()") as txn:
            txn.save(state, expect)

    def history(self) -> list[HistoryEntry]:
        """The kept versions, newest first (``history=N``): each one's ``revision``,
        ``time`` (seconds since the epoch), ``written_by`` and ``size``."""
        keeper = self._keeper()
        return [e._replace(written_by=WrittenBy.from_stamp(e.written_by)) for e in keeper.entries()]

    def restore(self, revision: str) -> ModelT:
        """Make the kept version ``revision`` current again, as a new commit under
        the lock (validated; migrated if it is of an older schema version).
        Returns the state committed."""
        self._keeper()
        with self._begin("restore()") as txn:
            return txn.restore(revision)

    def version_bytes(self, revision: str) -> bytes:
        """The exact bytes of a kept version (``history=N``)."""
        return self._keeper().read(revision)

    def watch(self, timeout: float | None = None) -> Watch[ModelT]:
        """An iterator of a :class:`Snapshot` for each new revision of the document.

        Any process's commit and a hand edit count; a burst gives the newest
        revision. ``timeout``: stop (``StopIteration``) after that many seconds
        without a change; None waits for ever. A document that does not read or
        validate raises its typed error from ``next()`` (the iterator stays
        usable: iterate again for the next change). ``close()`` (or the
        ``with`` block) stops it, from any thread. Any storage with a
        ``watcher()``: files (inotify or a stat poll), PostgreSQL (``LISTEN``
        and a slow poll of the row).
        """
        return Watch(self, timeout)

    def on_change(
        self,
        fn: Callable[[Snapshot[ModelT]], object],
        *,
        on_error: Callable[[StateStoreError], object] | None = None,
    ) -> ChangeHandle:
        """Call ``fn(snapshot)`` on a background thread for each new revision.

        A document that does not read or validate calls ``on_error(error)``
        (without it: logged on the ``statestore`` logger); an exception from
        ``fn`` is logged and watching goes on. ``handle.stop()`` ends it.
        """
        return ChangeHandle(self.watch(), fn, on_error)

    def _keeper(self) -> HistoryKeeper:
        if self.history_size is None:
            raise TypeError(f"{self.location}: the store keeps no history; give it history=N")
        keeper: HistoryKeeper = self._storage.history(self.history_size)  # type: ignore[attr-defined]
        return keeper

    def update(self, fn: Callable[[ModelT], ModelT | None]) -> ModelT:
        """Load, apply ``fn``, validate and save, all under the lock; return what was saved.

        ``fn`` returns a new model, or None after changing the one it was given.
        If it raises, nothing is written and the exception propagates.
        """
        return self._group.update(fn)

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
            yield Transaction(self._doc, session, self.history_size)


def _timeout_of(ref: weakref.ref[StateStore[Any]]) -> Callable[[], float]:
    """The store's timeout as it is when asked, without a reference to the store: a
    store is freed as soon as it is let go (with its storage's connections), not at
    the collector's next pass."""

    def timeout() -> float:
        store = ref()
        return store.timeout if store is not None else 0.0

    return timeout


class Watch(Generic[ModelT]):
    """What :meth:`StateStore.watch` returns: iterate for snapshots; ``close()``."""

    def __init__(
        self, store: StateStore[ModelT], timeout: float | None, *, start: bool = True
    ) -> None:
        make = getattr(store._storage, "watcher", None)
        if not callable(make):
            raise TypeError(
                f"{store.location}: watch() applies to storages that can watch (file "
                f"stores, PostgresStorage); {type(store.storage).__name__} has no watcher()"
            )
        self._store = store
        self.timeout = timeout
        self._make: Callable[[], Watcher] = make
        self._watcher: Watcher | None = None
        self._closed = False
        self.last: str | None = None
        if start:
            self.start()

    def start(self) -> None:
        """Begin watching (``watch()`` does; the async store on a worker thread when
        the storage's watcher waits on a server). Changes from here on are seen."""
        if self._watcher is not None or self._closed:
            return
        # The watcher first, then the revision it starts from: a change in between
        # is seen (as a wake-up) rather than lost.
        watcher = self._make()
        self.last = self._revision_now()
        self._watcher = watcher
        if self._closed:  # closed by another thread meanwhile
            watcher.close()

    @property
    def watcher(self) -> Watcher | None:
        """What this watch waits on (the storage's ``watcher()``), once started."""
        return self._watcher

    def _revision_now(self) -> str | None:
        try:
            return revision_of(self._store._storage.read())
        except StateStoreError:
            return None

    def __iter__(self) -> Watch[ModelT]:
        return self

    def __next__(self) -> Snapshot[ModelT]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if self._watcher is None:
                self.start()
            watcher = self._watcher
            if watcher is None or watcher.closed or not watcher.wait(left):
                raise StopIteration
            snapshot = self.check()
            if snapshot is not None:
                return snapshot

    def check(self) -> Snapshot[ModelT] | None:
        """Read the document now: a snapshot if its revision is new, else None;
        the typed error (once per bad revision) if it does not read or validate."""
        store = self._store
        try:
            raw = store._storage.read()
        except StateStoreError:
            self.last = None
            raise
        revision = revision_of(raw)
        if revision == self.last:
            return None
        self.last = revision
        if raw is None:
            return Snapshot(store._doc.make_default(), revision, None)
        # Parsed once: a writer that does not rename atomically, seen halfway, is an
        # error event now and its finished file the next snapshot.
        loaded = store._doc.parse(raw)
        return Snapshot(loaded.model, revision, loaded.written_by)

    @property
    def closed(self) -> bool:
        return self._closed or (self._watcher is not None and self._watcher.closed)

    def close(self) -> None:
        """Stop watching; a ``next()`` blocked in another thread ends (StopIteration)."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()

    def __enter__(self) -> Watch[ModelT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChangeHandle:
    """What :meth:`StateStore.on_change` returns: ``stop()`` ends the watching thread."""

    def __init__(
        self,
        watch: Watch[Any],
        fn: Callable[[Any], object],
        on_error: Callable[[StateStoreError], object] | None,
    ) -> None:
        self._watch = watch
        self._fn = fn
        self._on_error = on_error
        self._thread = threading.Thread(
            target=self._run, name=f"statestore-watch {watch._store.location}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        watch = self._watch
        while not watch.closed:
            try:
                for snapshot in watch:
                    try:
                        self._fn(snapshot)
                    except Exception:
                        log.exception("on_change(): %r raised", self._fn)
                return
            except StateStoreError as e:
                if watch.closed:
                    return
                if self._on_error is None:
                    log.warning("on_change(): %s", e)
                else:
                    try:
                        self._on_error(e)
                    except Exception:
                        log.exception("on_change(): on_error %r raised", self._on_error)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop watching; waits for the thread (unless called from ``fn`` itself)."""
        self._watch.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
