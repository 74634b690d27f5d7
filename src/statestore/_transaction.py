"""The transaction core: one load, modify and save of one document, in an open session.

:class:`StateStore` drives it on the caller's thread; :class:`AsyncStateStore`
drives the same steps from the event loop, each blocking step on a worker
thread. Neither knows which storage it has: a session (``backends``) holds the
document's lock and reads and writes bytes; :class:`~statestore._document.Document`
knows the format. The steps:

* :meth:`Transaction.begin` reads the document under the lock, migrates it in
  memory and validates it: the model the caller changes.
* :meth:`Transaction.commit` dumps the (validated) model, proves the exact
  bytes load back, keeps a backup when the file was at an older version, and
  publishes them through the session; a state that serialises to the bytes
  already there is not written again.
* :meth:`Transaction.abort` writes nothing.

Revisions and history (``docs/revisions.md``). Every commit's bytes carry the
commit stamp (``_document.py``), its counter one above the document found
under the lock. ``save(state, expect=revision)`` compares ``expect`` with the
revision of the bytes read under the lock, before anything is written, and
raises :class:`ConflictError` naming both when they differ. With a history
(``history=N``), each commit records its new bytes, and first the bytes it
replaces when the history does not hold them yet (a hand edit, or the state
before the history was turned on), both under the same lock, so versions are
recorded in commit order; ``restore(revision)`` commits the old bytes again,
validated and migrated, as a new revision.

A transaction is used once: ``commit`` or ``abort`` after ``begin``, then
nothing. Nothing is written unless ``commit`` is called; an exception anywhere
before it (in the caller's code, in a migration, in validation) leaves the
document as it was.

Nesting. A locked operation inside another one on the same document (or the
same lock) in the same thread would wait for itself, then overwrite the outer
result: :func:`entered` refuses it at once with :class:`NestedTransactionError`.
The async store checks the same per task; its steps that run user code on a
worker thread enter that thread too, so a blocking call there is refused
rather than left waiting until the timeout.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Generic

from ._document import Document, Loaded, ModelT, read_stamp, revision_of
from ._errors import ConflictError, NestedTransactionError, StateNotFoundError
from ._history import HistoryKeeper
from ._lock import DirectoryLock
from ._migrate import MigrationReport
from .backends import Session

__all__ = ["Transaction", "entered", "inside", "lock_identity", "lock_key"]

# (thread, key) pairs inside a locked operation, across every store object in the
# process: update() on a second store object for the same file would otherwise
# commit, then be overwritten by the outer transaction's commit.
_active: set[tuple[int, str]] = set()
_active_lock = threading.Lock()


def _forget_transactions_after_fork() -> None:
    """A forked child is inside none of its parent's transactions (it holds no lock)."""
    global _active_lock
    _active_lock = threading.Lock()
    _active.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_transactions_after_fork)


@contextmanager
def entered(
    keys: Iterable[str],
    location: str,
    what: str,
    *,
    lock: Callable[[], str | None] | None = None,
) -> Iterator[None]:
    """Mark this thread as inside a locked operation on ``keys`` for the block.

    Raises :class:`NestedTransactionError` at once if it already is inside one
    on any of them, or (``lock``: gives the lock this operation takes) if
    that lock is held for this thread's work by a holder it cannot reenter (an
    async operation marks its lock so, with :func:`lock_key`). The marks are
    removed however the block ends, from whatever thread ends it.
    """
    ident = threading.get_ident()
    marks = {(ident, k) for k in keys}
    with _active_lock:
        nested = bool(marks & _active)
        if not nested and lock is not None and any(t == ident for t, _ in _active):
            # Only asked when this thread is inside something: it may cost a look at
            # the file system (a file's lock, or its state folder's).
            held = lock()
            nested = held is not None and (ident, lock_key(held)) in _active
        if nested:
            raise NestedTransactionError(
                location,
                f"{what} called inside a transaction on the same file or lock; the outer "
                "transaction would overwrite its result, or wait for itself. Change the "
                "state yielded by the transaction instead",
            )
        _active.update(marks)
    try:
        yield
    finally:
        with _active_lock:
            _active.difference_update(marks)


def inside() -> bool:
    """Whether this thread is inside a locked operation (of any document)."""
    ident = threading.get_ident()
    with _active_lock:
        return any(t == ident for t, _ in _active)


def lock_identity(lock: DirectoryLock | None) -> str | None:
    """A lock's path with its folder resolved: equal for every spelling of one lock."""
    return None if lock is None else _resolved(lock.path)


@functools.lru_cache(maxsize=256)
def _resolved(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(os.path.realpath(folder), name)


def lock_key(lock: str) -> str:
    """The mark of a lock held by a holder that is not reentrant for the marked thread."""
    return "lock:" + lock


class Transaction(Generic[ModelT]):
    """One load-modify-save of ``document`` through ``session`` (whose lock is held)."""

    def __init__(
        self, document: Document[ModelT], session: Session, history: int | None = None
    ) -> None:
        self.document = document
        self.session = session
        #: Versions kept (``history=N``), or None: no history.
        self.history = history
        self._loaded: Loaded[ModelT] | None = None
        self._done = False

    @property
    def loaded(self) -> Loaded[ModelT]:
        """The document as :meth:`begin` found it."""
        if self._loaded is None:
            raise RuntimeError("begin() the transaction first")
        return self._loaded

    def begin(self, *, missing_ok: bool = False, shed: bool = False) -> ModelT:
        """Read and validate the document under the lock; return the model to change.

        ``missing_ok``: a missing document without a default begins as None
        internally (a save needs nothing to protect) instead of raising
        :class:`StateNotFoundError`; :meth:`commit` then needs a state.
        ``shed``: for an update, which replaces the model: a large file's bytes
        are let go for a digest (``Loaded.shed_raw``).
        """
        if self._loaded is not None or self._done:
            raise RuntimeError("a transaction begins once")
        doc = self.document
        try:
            self._loaded = doc.load(self.session.read)
        except StateNotFoundError:
            if not missing_ok:
                raise
            self._loaded = Loaded(None, None, doc.version, None)  # type: ignore[arg-type]
        if shed and self.history is None:  # a history records the bytes replaced
            self._loaded.shed_raw(doc.version)
        return self._loaded.model

    def commit(self, state: ModelT | None = None) -> ModelT:
        """Validate and publish ``state`` (default: the model :meth:`begin` returned).

        Returns the model the published bytes load as (what ``load()`` gives next).
        """
        loaded = self.loaded
        if self._done:
            raise RuntimeError("the transaction has already ended")
        self._done = True
        doc = self.document
        if state is None:
            state = loaded.model
        doc.check_type(state, "the transaction's state is")
        return self._publish(doc.frame(doc.dump(state), loaded.schema, after=loaded), loaded)

    def publish(self, data: bytes, checked: ModelT) -> ModelT:
        """Commit bytes already framed after :attr:`loaded` and proved to load as
        ``checked`` (a group of updates, each one checked as it ran)."""
        if self._done:
            raise RuntimeError("the transaction has already ended")
        self._done = True
        return self._publish(data, self.loaded, checked)

    def _publish(
        self, data: bytes, loaded: Loaded[ModelT], checked: ModelT | None = None
    ) -> ModelT:
        """Prove ``data`` loads back, write it (unless it holds what the file holds),
        and record it in the history, all in this session (under the lock)."""
        session = self.session
        checked, changed = self.document.prepare(session, data, loaded, checked)
        if changed:
            keeper = self._history()
            if keeper is not None and loaded.raw:
                newest = keeper.newest()
                if newest is None or newest.revision != loaded.revision:
                    keeper.record(loaded.raw, loaded.revision, loaded.stamp()[1])
            session.write(data)
            if keeper is not None:
                counter, stamp = read_stamp(data)
                keeper.record(data, revision_of(data, counter), stamp)
        return checked

    def _history(self) -> HistoryKeeper | None:
        # The session's keeper: it records under the session's lock (and, in a
        # database, in the commit's own transaction).
        if self.history is None:
            return None
        make = getattr(self.session, "history", None)
        if not callable(make):
            raise TypeError(
                f"{self.document.location}: history= needs a session that keeps versions "
                f"({type(self.session).__name__} has no history())"
            )
        keeper: HistoryKeeper = make(self.history)
        return keeper

    def check_expected(self, expect: str) -> None:
        """Raise :class:`ConflictError` unless the document read under the lock is at
        revision ``expect``."""
        found = self.loaded.revision
        if found != expect:
            raise ConflictError(self.document.location, expected=expect, found=found)

    def restore(self, revision: str) -> ModelT:
        """``store.restore(revision)``: the bytes the history holds for ``revision``,
        validated (and migrated from an older schema version), committed anew."""
        keeper = self._history()
        if keeper is None:
            raise TypeError(f"{self.document.location}: restore() needs a store with history=N")
        self.begin(missing_ok=True)
        old = keeper.read(revision)
        state = self.document.parse(old).model
        return self.commit(state)

    def abort(self) -> None:
        """End without writing anything."""
        self._done = True
        self._loaded = None

    # The operations of a store, written once for the sync and async faces.

    def save(self, state: ModelT, expect: str | None = None) -> None:
        """``store.save(state)``: a file that cannot be read is not overwritten.
        ``expect``: commit only if the document is at that revision."""
        self.document.check_type(state, "save()")
        self.begin(missing_ok=True)
        if expect is not None:
            self.check_expected(expect)
        self.commit(state)

    def update(
        self, fn: Callable[[ModelT], ModelT | None], *, go_on: Callable[[], None] | None = None
    ) -> ModelT:
        """``store.update(fn)``. ``go_on`` is called after ``fn``, before the commit:
        it raises to end without writing (the async store's cancellation)."""
        result = fn(self.begin(shed=True))
        if go_on is not None:
            go_on()
        return self.finish(fn, result)

    def finish(self, fn: object, result: ModelT | None) -> ModelT:
        """Commit what an update function gave: a new model, or None (changed in place)."""
        doc = self.document
        loaded = self.loaded
        if result is not None:
            loaded.model = result
        del result
        doc.check_type(loaded.model, f"update(): {getattr(fn, '__qualname__', 'fn')} returned")
        self._done = True
        data = doc.frame(doc.dump(loaded.model), loaded.schema, after=loaded)
        # Let a large model go before the copy that checks it is built: a parsed
        # model takes several times its JSON size.
        loaded.model = None  # type: ignore[assignment]
        return self._publish(data, loaded)

    def migrate(self, *, dry_run: bool = False) -> MigrationReport:
        """``store.migrate()``: upgrade the file, keeping a backup of the old version."""
        doc = self.document
        location = doc.location
        self.begin(missing_ok=True)
        loaded = self.loaded
        if loaded.raw is None:  # the default does not count
            self.abort()
            raise StateNotFoundError(location, "there is no state file to migrate")
        found, to = loaded.version, doc.version
        steps = tuple(range(found, to))
        if not steps:
            self.abort()
            return MigrationReport(location, found, to, dry_run=dry_run)
        where = self.session.backup_location(f"v{found}")
        if dry_run:
            self.abort()
            return MigrationReport(location, found, to, steps, where, False, True)
        self.commit()  # keeps the backup first
        return MigrationReport(location, found, to, steps, where, True)
