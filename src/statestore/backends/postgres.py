"""The PostgreSQL backend: one row per document, a server-side lock per key.

State shared by processes on several machines lives in one table::

    from statestore import StateStore
    from statestore.backends.postgres import PostgresStorage

    store = StateStore(Jobs, PostgresStorage("postgresql://app@db/app", key="jobs"), default=Jobs)

A session is one transaction that holds ``pg_advisory_xact_lock`` on a 64-bit
hash of (table, key): exclusive across every machine, released by the server
at commit, at rollback, and when the connection drops (so a killed holder never
blocks the next one). ``docs/postgres.md`` has the set-up and the semantics.

One row, one lock: the lock is keyed by the row's identity as the server
resolves it, never by a name as spelled. The table is its OID, looked up by the
server in the locking statement itself with the rules its queries use
(``schema=None`` through the search path, ``schema="public"``, any case of a
quoted name), so every storage that reaches one row takes one lock, and a table
dropped and created again is looked up afresh. The key is compared as the
column compares it, which is byte for byte only for ``text``/``varchar`` with a
deterministic collation: a table whose key column compares otherwise (citext,
a case-insensitive collation, ``char(n)``), a view, a foreign table, a
partition or a table in an inheritance tree (rows that another name also
reaches) is refused.

State folders (:class:`PostgresFolder`, the twin of ``StateFolder``): the rules.

* **A namespace is a key's prefix.** The documents of the folder ``namespace``
  are the rows keyed ``<namespace>/<name>`` (``name`` without ``/``) of its
  table. Every key that holds a ``/`` belongs to the namespace before its last
  one, so no declaration is needed and none can be missed or raced: a plain
  ``PostgresStorage(..., key="planning/roadmap")`` made anywhere is a
  document of the folder ``"planning"`` of its table.
* **One lock per namespace, taken by everyone.** The namespace's advisory lock
  is keyed by (table OID, namespace), like a row's but from an input no row's
  key gives. A folder transaction takes it exclusively; every session of a
  document of the namespace (the folder's stores and plain ones alike) takes
  it shared, before its own key's lock (always in that order, one timeout for
  both). So a folder transaction and a store's locked call on one of its
  documents exclude each other, while stores of two documents of a namespace
  still run side by side.
* **One group, one SQL transaction.** ``transaction()`` holds the lock in one
  READ COMMITTED transaction; ``tx[store]`` reads the row in it on first use
  (migrating in memory, the newer-version guard checked, through the store's
  own format: ``Document``, ``Transaction``); at the end every changed row,
  and the backup of each migrated one, is written in it, in key order, and it
  commits: all of them or none, whatever fails or is killed. A block that
  raises rolls it back. There is no unfinished group to recover.
* **One statement, one snapshot.** ``read()`` is a single ``SELECT`` of the
  rows, without a lock: a statement sees one snapshot, in which a folder
  transaction is either committed entirely or not at all.
* **No nesting.** In one thread, a store's locked call on a document of a
  namespace inside that namespace's folder transaction, or a folder
  transaction inside one (or inside a session of one of its documents), would
  wait for itself: :class:`NestedTransactionError` at once.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from types import TracebackType
from typing import Any, Final, TypeVar

from pydantic import BaseModel

try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
    from psycopg.rows import TupleRow
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "statestore.backends.postgres needs psycopg 3: pip install 'statestore[postgres]'"
    ) from e

from .._errors import (
    DurabilityError,
    LockCompromisedError,
    LockError,
    LockTimeout,
    NestedTransactionError,
    StateReadError,
    StateStoreError,
    StateWriteError,
)
from .._folder import FolderSnapshot, GroupTransaction
from .._migrate import Migrations
from .._store import StateStore
from .._transaction import Transaction

__all__ = [
    "PostgresFolder",
    "PostgresFolderSnapshot",
    "PostgresFolderTransaction",
    "PostgresSession",
    "PostgresStorage",
]

M = TypeVar("M", bound=BaseModel)

_Conn = psycopg.Connection[TupleRow]

DEFAULT_TABLE: Final = "statestore_documents"
#: Seconds to wait for a server to answer a connection attempt, unless the conninfo says.
DEFAULT_CONNECT_TIMEOUT: Final = 10
#: How long to wait for the server to finish ending a dropped session's transaction.
_STATUS_WAIT: Final = 5.0
#: PostgreSQL silently truncates longer identifiers, which would merge two names.
_MAX_IDENTIFIER: Final = 63

# Connections that a forked child inherited from its parent. They share the parent's
# sockets: closing one would end the parent's session on the server (libpq sends a
# Terminate message), and letting one be collected warns. Kept, unused, for good.
_inherited: list[_Conn] = []
_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


# Which namespaces this process's threads are inside: (thread, namespace location) of
# each open folder transaction, and the number of open store sessions per (thread,
# namespace). A store's session waiting for the folder transaction its own thread holds
# (or the reverse) would wait for itself until its timeout: refused at once instead.
_marks_lock = threading.Lock()
_folder_marks: set[tuple[int, str]] = set()
_store_marks: dict[tuple[int, str], int] = {}


def _forget_parent_connections() -> None:
    global _marks_lock
    for pool in list(_pools):
        pool.after_fork()
    _marks_lock = threading.Lock()
    _folder_marks.clear()  # a forked child is inside none of its parent's transactions
    _store_marks.clear()


os.register_at_fork(after_in_child=_forget_parent_connections)


class _Pool:
    """Idle connections of one storage, shared by the threads of one process."""

    def __init__(self, connect: Callable[[], _Conn], max_idle: int) -> None:
        self._connect = connect
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        _pools.add(self)

    def after_fork(self) -> None:
        # Runs in the child, single-threaded, right after fork.
        _inherited.extend(self._idle)
        self._idle = []
        self._lock = threading.Lock()

    def take(self) -> tuple[_Conn, bool]:
        """A connection, and whether it was reused (it may have gone stale while idle)."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn, True
        return self._connect(), False

    def give(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
            conn.close()
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _reason(e: psycopg.Error) -> str:
    # The server's one-line message, without the query excerpt that str(e) appends.
    text = (e.diag.message_primary or str(e)).strip()
    text = text.replace("\n\t", " ").replace("\n", " ") or type(e).__name__
    return text.removeprefix("connection failed: ")


def _hint(e: psycopg.Error) -> str:
    code = e.sqlstate or ""
    if isinstance(e, pgerrors.InsufficientPrivilege):
        return (
            "the role lacks a privilege: grant it SELECT, INSERT and UPDATE on the tables "
            "(and CREATE on the schema, or create the tables as docs/postgres.md shows)"
        )
    if isinstance(e, pgerrors.ReadOnlySqlTransaction):
        return "the server accepts no writes (a standby?); connect to the primary"
    if code.startswith("53"):
        return "the server is out of resources (disk, memory or connections)"
    if code.startswith("57P"):
        return "the server ended the connection (it shut down, or the session was terminated)"
    if "password" in str(e) or code.startswith("28"):
        return "check the user name and password"
    if code == "3D000":
        return "the database does not exist"
    if not code or code.startswith("08"):  # no answer from the server, or a lost connection
        return "check that the server is running and reachable and that the conninfo is right"
    return "see the server's log for details"


def _describe(e: psycopg.Error, what: str) -> str:
    return f"{what} failed ({_reason(e)}); {_hint(e)}"


#: The advisory lock key of a row, computed by the server: the first 8 bytes of
#: SHA-256("statestore:<table OID>:<key>") as a signed 64-bit integer. ``{table}``
#: is resolved to the table's OID by the server, as its queries resolve it.
_LOCK_KEY: Final = (
    "('x' || encode(substring(sha256(convert_to("
    "'statestore:' || {table}::regclass::oid::text || ':' || {key}, 'UTF8')) "
    "FROM 1 FOR 8), 'hex'))::bit(64)::bigint"
)
#: The key of the lock that serialises creating a table: the schema the server
#: would create it in (``current_schema()`` for an unqualified name), and the name.
_CREATE_KEY: Final = (
    "('x' || encode(substring(sha256(convert_to("
    "'statestore:create:' || quote_ident(coalesce({schema}, current_schema())) || '.' "
    "|| quote_ident({table}), 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint"
)
#: The advisory lock key of a namespace (a state folder's documents ``<namespace>/<name>``):
#: SHA-256("statestore-folder:<table OID>:<namespace>"), which no row's key can give
#: (a row's input starts "statestore:").
_NAMESPACE_KEY: Final = (
    "('x' || encode(substring(sha256(convert_to("
    "'statestore-folder:' || {table}::regclass::oid::text || ':' || {namespace}, 'UTF8')) "
    "FROM 1 FOR 8), 'hex'))::bit(64)::bigint"
)
#: Key column types whose equality is byte equality (with a deterministic collation).
_KEY_TYPES: Final = ("text", "character varying")


def _lock_key(table_oid: int, key: str) -> int:
    """The advisory lock key of a row, as :data:`_LOCK_KEY` computes it on the server."""
    digest = hashlib.sha256(f"statestore:{table_oid}:{key}".encode()).digest()[:8]
    return int.from_bytes(digest, "big", signed=True)


def _namespace_lock_key(table_oid: int, namespace: str) -> int:
    """The advisory lock key of a namespace, as :data:`_NAMESPACE_KEY` computes it."""
    digest = hashlib.sha256(f"statestore-folder:{table_oid}:{namespace}".encode()).digest()[:8]
    return int.from_bytes(digest, "big", signed=True)


def _namespace_of(key: str) -> str | None:
    """The namespace of a document's key: what comes before its last ``/`` (or None).

    The documents of a :class:`PostgresFolder` are the keys ``<namespace>/<name>``
    (``name`` without ``/``); every session of such a key takes the namespace's
    lock too, so no declaration is needed for a store to find its folder.
    """
    namespace, slash, _ = key.rpartition("/")
    return namespace if slash else None


def _check_name(what: str, name: str) -> None:
    if not name or "\0" in name or len(name.encode()) > _MAX_IDENTIFIER:
        raise ValueError(
            f"{what} must be a non-empty name of at most {_MAX_IDENTIFIER} bytes "
            f"without NUL, not {name!r}"
        )


class PostgresSession:
    """One transaction holding the document's lock: the locked half of :class:`PostgresStorage`."""

    def __init__(self, storage: PostgresStorage, conn: _Conn) -> None:
        self._storage = storage
        self._conn = conn
        self._pid = os.getpid()
        self._xid: str | None = None  # set by the first change: its transaction id

    @property
    def backend_pid(self) -> int:
        """The server process that runs this session (``pg_stat_activity.pid``)."""
        return self._conn.info.backend_pid

    def _usable(self) -> _Conn:
        if os.getpid() != self._pid:
            raise LockCompromisedError(
                self._storage.location,
                "this process was forked inside a session: the lock belongs to the "
                "parent's connection, so the child cannot read or write under it",
            )
        return self._conn

    def read(self) -> bytes | None:
        s = self._storage
        try:
            row = self._usable().execute(s._select, (s.key,)).fetchone()
        except psycopg.Error as e:
            raise StateReadError(s.location, _describe(e, "reading under the lock")) from e
        return None if row is None else bytes(row[0])

    def write(self, data: bytes) -> None:
        s = self._storage
        self._change(s._upsert, (s.key, data), "saving")

    def backup_location(self, label: str) -> str:
        return self._storage.backup_location(label)

    def backup(self, label: str, data: bytes) -> str:
        s = self._storage
        # Inserted only if absent: a backup keeps the first original of that version.
        self._change(s._insert_backup, (s.key, label, data), "keeping a backup")
        return self.backup_location(label)

    def _change(self, query: sql.Composed, params: tuple[Any, ...], what: str) -> None:
        s = self._storage
        try:
            row = self._usable().execute(query, params).fetchone()
        except psycopg.Error as e:
            lost = " The server released the lock with the connection." if self._conn.broken else ""
            raise StateWriteError(
                s.location,
                f"{_describe(e, what)}. Nothing was saved; the stored document is unchanged.{lost}",
            ) from e
        if self._xid is None and row is not None:
            self._xid = str(row[0])

    def _end(self, commit: bool) -> None:
        _end_transaction(self._storage, self._conn, self._xid, self._pid, commit)


def _end_transaction(
    owner: PostgresStorage, conn: _Conn, xid: str | None, pid: int, commit: bool
) -> None:
    """Commit (or roll back) the transaction of a session or a folder transaction.

    ``xid`` is the transaction's id once it changed something (None: nothing to
    keep, so it is rolled back); ``pid`` the process that opened it. Errors
    name ``owner.location``, and what is unchanged (``owner._unchanged``).
    """
    unchanged = owner._unchanged
    if os.getpid() != pid:
        _inherited.append(conn)  # the parent's: never touch it
        if commit:
            raise LockCompromisedError(
                owner.location,
                "this process was forked inside a session: the lock belongs to the "
                "parent's connection, so the child cannot read or write under it",
            )
        return
    if not commit or xid is None:
        # Nothing to keep: a failed rollback or commit loses nothing.
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            conn.close()
        owner._pool.give(conn)
        return
    if conn.info.transaction_status == TransactionStatus.INERROR:
        # A statement failed and its error was caught: COMMIT would only roll back.
        conn.execute("ROLLBACK")
        owner._pool.give(conn)
        raise StateWriteError(
            owner.location,
            "a statement of this session failed, so the transaction was rolled back; "
            f"nothing was saved; {unchanged}",
        )
    try:
        conn.execute("COMMIT")
    except psycopg.Error as e:
        broken = conn.broken
        conn.close()
        # A COMMIT the server answered with an error rolled back. One lost with the
        # connection may or may not have happened: ask the server about the transaction.
        status = owner._xact_status(xid) if broken else "aborted"
        if status == "committed":
            return
        if status == "aborted":
            raise StateWriteError(
                owner.location,
                f"{_describe(e, 'committing')}. The transaction was rolled back: "
                f"nothing was saved; {unchanged}. The lock was "
                "released with it, so run the update again.",
            ) from e
        # Not a StateWriteError, which promises nothing was saved: running the
        # same update again could apply its change twice.
        raise DurabilityError(
            owner.location,
            f"{_describe(e, 'committing')}, and whether the commit happened could not "
            f"be found out. {owner._whole}",
        ) from e
    owner._pool.give(conn)


class PostgresStorage:
    """One document, under ``key``, in a PostgreSQL table shared by every machine.

    ``conninfo`` is a libpq connection string or URI (empty: the ``PG*`` environment
    variables). ``table`` (in ``schema``, else the search path) holds the documents,
    ``backup_table`` (default ``<table>_backups``) the backups migrations keep; both
    are created when missing. ``durable=False`` commits with ``synchronous_commit =
    off`` (a server crash may lose the last saves, never mix them). Up to ``max_idle``
    connections are kept open between uses, shared by the process's threads.

    >>> storage = PostgresStorage("postgresql://app@db.internal/app", key="jobs")
    >>> storage.location
    'postgresql://db.internal:5432/app#statestore_documents/jobs'
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        key: str,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        backup_table: str | None = None,
        durable: bool = True,
        max_idle: int = 2,
    ) -> None:
        if not isinstance(key, str) or not key or "\0" in key:
            raise ValueError(f"key must be a non-empty string without NUL, not {key!r}")
        backup_table = f"{table}_backups" if backup_table is None else backup_table
        for what, name in (("table", table), ("backup_table", backup_table), ("schema", schema)):
            if name is not None:
                _check_name(what, name)
        if max_idle < 0:
            raise ValueError("max_idle must be at least 0")
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error as e:
            raise ValueError(f"not a valid PostgreSQL conninfo: {_reason(e)}") from e
        self.key = key
        self.table = table
        self.schema = schema
        self.backup_table = backup_table
        self.durable = durable
        self._conninfo = conninfo
        self._params = params
        self._base = _base_location(params)
        self._table_id = self._ident(table)
        self._backup_id = self._ident(backup_table)
        self._qualified = self._quoted(table)
        # Resolved by the server at each lock, never hashed from the name as spelled.
        self._lock_key = sql.SQL(_LOCK_KEY).format(
            table=sql.Literal(self._qualified), key=sql.Literal(key)
        )
        self._create_key = sql.SQL(_CREATE_KEY).format(
            schema=sql.Literal(schema), table=sql.Literal(table)
        )
        #: The state folder namespace the document belongs to (its key's part before
        #: the last ``/``), or None. Its sessions take the namespace's lock shared,
        #: which a :class:`PostgresFolder` transaction takes exclusively.
        self.namespace = _namespace_of(key)
        #: The advisory locks a session takes, in this order: (key expression, shared).
        self._session_locks: list[tuple[sql.Composable, bool]] = [(self._lock_key, False)]
        self._namespace_mark: str | None = None
        if self.namespace is not None:
            self._session_locks.insert(0, (self._namespace_key(self.namespace), True))
            self._namespace_mark = self._namespace_location(self.namespace)
        #: What a failed commit leaves unchanged, and what a commit of unknown outcome
        #: leaves, as the messages of its errors say.
        self._unchanged = "the stored document is unchanged"
        self._whole = (
            "The stored document is whole: either the old one or the new "
            "one. load() it to see which before running the update again."
        )
        self._ready = False
        # The pool must not refer back to the storage, or the finalizer (which closes
        # the idle connections when the storage is collected) would keep it alive.
        self._connect = functools.partial(_open, conninfo, params)
        self._pool = _Pool(self._connect, max_idle)
        weakref.finalize(self, self._pool.close)

        t, b = self._table_id, self._backup_id
        self._select = sql.SQL("SELECT convert_to(document, 'UTF8') FROM {} WHERE key = %s").format(
            t
        )
        self._exists = sql.SQL("SELECT EXISTS (SELECT FROM {} WHERE key = %s)").format(t)
        self._upsert = sql.SQL(
            "INSERT INTO {} AS d (key, document, updated_at) "
            "VALUES (%s, convert_from(%s, 'UTF8'), clock_timestamp()) "
            "ON CONFLICT (key) DO UPDATE "
            "SET document = EXCLUDED.document, updated_at = EXCLUDED.updated_at "
            "RETURNING pg_current_xact_id()::text"
        ).format(t)
        self._insert_backup = sql.SQL(
            "WITH ins AS (INSERT INTO {} (key, label, document) "
            "VALUES (%s, %s, convert_from(%s, 'UTF8')) ON CONFLICT (key, label) DO NOTHING) "
            "SELECT pg_current_xact_id()::text"
        ).format(b)
        self._create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "key text PRIMARY KEY, document text NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now()); "
            "CREATE TABLE IF NOT EXISTS {} ("
            "key text NOT NULL, label text NOT NULL, document text NOT NULL, "
            "created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (key, label))"
        ).format(t, b)

    def _namespace_key(self, namespace: str) -> sql.Composed:
        return sql.SQL(_NAMESPACE_KEY).format(
            table=sql.Literal(self._qualified), namespace=sql.Literal(namespace)
        )

    def _namespace_location(self, namespace: str) -> str:
        """``postgresql://host:port/dbname#table/namespace/``: a state folder, for messages."""
        return f"{self._base}#{self._qualified.replace(chr(34), '')}/{namespace}/"

    def _ident(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name) if self.schema else sql.Identifier(name)

    def _quoted(self, name: str) -> str:
        """``"schema"."name"``, as SQL spells it (built here: psycopg 3.1 needs a connection)."""
        parts = (self.schema, name) if self.schema else (name,)
        return ".".join('"' + part.replace('"', '""') + '"' for part in parts)

    # ------------------------------------------------------------------ Storage

    @property
    def location(self) -> str:
        """``postgresql://host:port/dbname#table/key``: no user name, no password."""
        return f"{self._base}#{self._qualified.replace(chr(34), '')}/{self.key}"

    @property
    def identity(self) -> str:
        """The document: server, database, table and key (no user name)."""
        return self.location

    @property
    def lock(self) -> None:
        """No lock object: each session takes the key's advisory lock itself."""
        return None

    def async_session(self, timeout: float) -> AbstractAsyncContextManager[PostgresSession]:
        """:meth:`session` for asyncio: each blocking step on a worker thread."""
        from .._async import threaded_session  # asyncio only for programs that use it

        return threaded_session(self.session, self.identity, self.location, timeout)

    @property
    def lock_id(self) -> int:
        """The advisory lock key (``pg_locks``: ``classid``/``objid`` are its two halves).

        Asked of the server, which resolves the table as a session would: every
        spelling of one table gives one key. :class:`LockError` when the server
        cannot be reached or the table does not exist yet.
        """

        def run(conn: _Conn) -> int:
            found = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (self._qualified,)
            ).fetchone()
            if not (found and found[0]):
                raise LockError(
                    self.location,
                    f"the table {self._qualified} does not exist yet, so it has no lock "
                    "key; the first save creates it",
                )
            return self._resolve_lock_key(conn)

        key: int = self._with_connection(run, LockError, "resolving the lock key")
        return key

    def _resolve_lock_key(self, conn: _Conn) -> int:
        # The session's own lock: the key's (a folder's: its namespace's), taken last.
        row = conn.execute(sql.SQL("SELECT {}").format(self._session_locks[-1][0])).fetchone()
        assert row is not None
        return int(row[0])

    def backup_location(self, label: str) -> str:
        backups = self._quoted(self.backup_table).replace(chr(34), "")
        return f"{self._base}#{backups}/{self.key}@{label}"

    def read(self) -> bytes | None:
        """The committed document, without the lock (one SELECT: always a whole document)."""
        row = self._query(self._select, StateReadError, "reading")
        return None if row is None else bytes(row[0])

    def exists(self) -> bool:
        """Whether a document is stored under the key (the default does not count)."""
        row = self._query(self._exists, StateReadError, "looking for the document")
        return bool(row is not None and row[0])

    @contextmanager
    def session(self, timeout: float) -> Iterator[PostgresSession]:
        """A transaction holding the key's lock; committed on normal exit, else rolled back.

        A key in a namespace (``"<namespace>/<name>"``) also holds the namespace's
        lock, shared: sessions of its documents run side by side, and a
        :class:`PostgresFolder` transaction of the namespace excludes them all.
        """
        mark = self._enter_namespace()
        try:
            session = PostgresSession(self, self._begin(timeout))
            try:
                yield session
            except BaseException:
                session._end(commit=False)
                raise
            session._end(commit=True)
        finally:
            if mark is not None:
                with _marks_lock:
                    left = _store_marks.pop(mark) - 1
                    if left:
                        _store_marks[mark] = left

    def _enter_namespace(self) -> tuple[int, str] | None:
        """Count this thread as in a session of the namespace; refuse a session that
        the thread's own folder transaction would keep waiting."""
        if self._namespace_mark is None:
            return None
        mark = (threading.get_ident(), self._namespace_mark)
        with _marks_lock:
            if mark in _folder_marks:
                raise NestedTransactionError(
                    self.location,
                    "a locked call of a document of the state folder "
                    f"{self._namespace_mark} inside that folder's transaction() in the same "
                    "thread would wait for itself (the transaction holds the folder's lock). "
                    "Change the document through tx[store] instead",
                )
            _store_marks[mark] = _store_marks.get(mark, 0) + 1
        return mark

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the idle connections (the storage connects again if used later)."""
        self._pool.close()

    def __enter__(self) -> PostgresStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStorage({self.location!r})"

    # ---------------------------------------------------------------- internals

    def _with_connection(
        self, run: Any, error: type[StateStoreError], what: str, *, keep: bool = False
    ) -> Any:
        """``run(conn)`` on a pooled connection; once more on a new one if it had gone stale.

        The connection goes back to the pool afterwards, unless ``keep`` (and ``run``
        succeeded): then the caller owns it.
        """
        for _ in range(2):
            try:
                conn, reused = self._pool.take()
            except psycopg.Error as e:
                raise error(self.location, _describe(e, f"connecting for {what}")) from e
            try:
                result = run(conn)
            except psycopg.Error as e:
                if conn.broken:
                    conn.close()
                    # A connection that died while idle (server restart, idle timeout).
                    if reused:
                        continue
                self._pool.give(conn)
                raise error(self.location, _describe(e, what)) from e
            except BaseException:
                self._pool.give(conn)  # closed unless it is idle and healthy
                raise
            if not keep:
                self._pool.give(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _query(
        self, query: sql.Composed, error: type[StateStoreError], what: str
    ) -> tuple[Any, ...] | None:
        def run(conn: _Conn) -> tuple[Any, ...] | None:
            try:
                return conn.execute(query, (self.key,)).fetchone()
            except pgerrors.UndefinedTable:
                return None  # nothing was ever saved to this table

        result: tuple[Any, ...] | None = self._with_connection(run, error, what)
        return result

    def _ensure_tables(self, conn: _Conn) -> None:
        """Create the tables once per storage, if missing; a lost connection propagates."""
        if self._ready:
            return
        names = (self._qualified, self._quoted(self.backup_table))
        try:
            # Checked first, so that a role without CREATE can use tables made for it.
            row = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL", names
            ).fetchone()
            if not (row and row[0]):
                conn.execute("BEGIN")
                # Serialised by a lock of its own: concurrent CREATE TABLE IF NOT EXISTS
                # of one name can still fail on the catalog's unique index.
                # Keyed by where the server would create it, as the lock on a row is.
                conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(self._create_key))
                conn.execute(self._create)
                conn.execute("COMMIT")
            self._check_table(conn)
        except psycopg.Error as e:
            if conn.broken:
                raise
            conn.execute("ROLLBACK")
            raise StateWriteError(
                self.location, _describe(e, f"creating the tables {names[0]} and {names[1]}")
            ) from e
        self._ready = True

    def _check_table(self, conn: _Conn) -> None:
        """Refuse a documents table whose rows a lock keyed by (OID, key) would not guard."""
        row = conn.execute(
            "SELECT c.relkind, c.relispartition, format_type(a.atttypid, NULL), "
            "coalesce(co.collisdeterministic, true), "
            "EXISTS (SELECT FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) "
            "FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid "
            "AND a.attname = 'key' AND NOT a.attisdropped "
            "LEFT JOIN pg_collation co ON co.oid = a.attcollation "
            "WHERE c.oid = to_regclass(%s)",
            (self._qualified,),
        ).fetchone()
        if row is None:
            return  # dropped since: the session's own statements say so
        kind, partition, key_type, deterministic, inherits = row
        problem = None
        if kind not in ("r", "p"):
            what = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}
            problem = f"is {what.get(kind, f'of relkind {kind!r}')}, not a table"
        elif partition:
            problem = "is a partition, whose rows its parent's name reaches too"
        elif kind == "r" and inherits:
            problem = "takes part in table inheritance, so another table's name reaches its rows"
        elif key_type is None:
            problem = "has no column named key"
        elif key_type not in _KEY_TYPES or not deterministic:
            how = key_type if deterministic else f"{key_type} with a nondeterministic collation"
            problem = f"has a key column of type {how}, which may equate two spellings of a key"
        if problem is not None:
            raise LockError(
                self.location,
                f"the table {self._qualified} {problem}: the lock, keyed by the table "
                "and the key's bytes, would not guard its rows. Point the storage at a "
                "plain table whose key column is text (see docs/postgres.md)",
            )

    def _begin(self, timeout: float) -> _Conn:
        """A connection in a transaction that holds the session's advisory locks."""
        # READ COMMITTED whatever the server's default: each statement then sees what
        # was committed before the lock was granted. Under REPEATABLE READ the snapshot
        # would be taken before the wait, and an update could be lost.
        setup = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
        if not self.durable:
            setup += "; SET LOCAL synchronous_commit = off"
        # Each key is computed in the locking statement itself, from the table's OID as
        # the server resolves the name now (see the module's docstring).
        locks = self._session_locks
        if timeout <= 0:
            tries = [
                sql.SQL("pg_try_advisory_xact_lock{}({})").format(
                    sql.SQL("_shared" if shared else ""), key
                )
                for key, shared in locks
            ]
            statements = [sql.SQL("SELECT ") + sql.SQL(" AND ").join(tries)]
        else:
            # lock_timeout 0 means "wait forever", so round up to at least 1 ms.
            ms = 0 if math.isinf(timeout) else max(1, math.ceil(timeout * 1000))
            setup += f"; SET LOCAL lock_timeout = {ms}"
            statements = []
            for i, (key, shared) in enumerate(locks):
                if i and ms:
                    # The locks are taken one after the other, always in this order (the
                    # namespace's first), and the timeout bounds the whole wait: the next
                    # lock gets what is left of it since the transaction began.
                    statements.append(
                        sql.SQL(
                            "SELECT set_config('lock_timeout', greatest(1, {} - floor(extract("
                            "epoch FROM clock_timestamp() - now()) * 1000))::bigint::text, true)"
                        ).format(sql.Literal(ms))
                    )
                statements.append(
                    sql.SQL(
                        "SELECT true FROM (SELECT {} AS id) AS l, pg_advisory_xact_lock{}(l.id)"
                    ).format(key, sql.SQL("_shared" if shared else ""))
                )
        statement = sql.SQL("; ").join([sql.SQL(setup), *statements])

        def run(conn: _Conn) -> _Conn:
            self._ensure_tables(conn)
            try:
                cur = conn.execute(statement)
                while cur.nextset():
                    pass
                row = cur.fetchone()
                got = bool(row and row[0])
            except pgerrors.LockNotAvailable:
                got = False
            if not got:
                conn.execute("ROLLBACK")
                raise self._timeout(conn, timeout)
            return conn

        conn: _Conn = self._with_connection(run, LockError, "taking the lock", keep=True)
        return conn

    def _timeout(self, conn: _Conn, timeout: float) -> LockTimeout:
        """A LockTimeout that names the server session holding the lock, when it can be seen."""
        try:
            locks = self._session_locks
            found = conn.execute(
                sql.SQL("SELECT ") + sql.SQL(", ").join(key for key, _ in locks)
            ).fetchone()
            assert found is not None
            # A holder of a lock this session asked for: any holder of an exclusive
            # one, an exclusive holder of a shared one.
            wanted: list[sql.Composable] = []
            params: list[Any] = []
            for key, (_, shared) in zip(found, locks, strict=True):
                key &= 0xFFFF_FFFF_FFFF_FFFF
                mode = " AND l.mode = 'ExclusiveLock'" if shared else ""
                wanted.append(sql.SQL(f"(l.classid::int8 = %s AND l.objid::int8 = %s{mode})"))
                params += [key >> 32, key & 0xFFFF_FFFF]
            row = conn.execute(
                sql.SQL(
                    "SELECT a.pid, host(a.client_addr), a.application_name, "
                    "extract(epoch FROM clock_timestamp() - a.xact_start)::float8 "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                    "AND l.pid <> pg_backend_pid() AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND ({}) ORDER BY a.xact_start LIMIT 1"
                ).format(sql.SQL(" OR ").join(wanted)),
                params,
            ).fetchone()
        except psycopg.Error:
            row = None
        text = f"could not acquire the lock within {timeout:g} s"
        if row is None:
            return LockTimeout(
                self.location,
                text + " (the holder could not be identified)",
                timeout=timeout,
            )
        pid, host, app, age = row
        holder = {"pid": pid, "host": host or "local", "application": app, "age": age}
        age_text = f"{age:.1f} s" if isinstance(age, float) else "an unknown time"
        return LockTimeout(
            self.location,
            f"{text}: held by server process {pid} for client {host or 'local'} "
            f"({app or 'no application name'}) for {age_text}; if that client is stuck, "
            f"end its session with SELECT pg_terminate_backend({pid})",
            timeout=timeout,
            holder=holder,
            alive=True,
        )

    def _xact_status(self, xid: str) -> str | None:
        """'committed', 'aborted', or None when the server cannot be asked."""
        deadline = time.monotonic() + _STATUS_WAIT
        try:
            with self._connect() as conn:
                while True:
                    row = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
                    status = row[0] if row else None
                    # "in progress": the server is still ending the dropped session.
                    if status != "in progress" or time.monotonic() > deadline:
                        return status if status in ("committed", "aborted") else None
                    time.sleep(0.05)
        except psycopg.Error:
            return None


def _open(conninfo: str, params: dict[str, Any]) -> _Conn:
    extra: dict[str, Any] = {}
    if "connect_timeout" not in params and "PGCONNECT_TIMEOUT" not in os.environ:
        extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
    if "application_name" not in params and "PGAPPNAME" not in os.environ:
        # Shown in pg_stat_activity, and in the LockTimeout of whoever waits on us.
        extra["application_name"] = f"statestore {socket.gethostname()} {os.getpid()}"[:63]
    conn = psycopg.connect(conninfo, autocommit=True, **extra)
    try:
        # The server drops a silent client's connection (and so its lock) after about
        # a minute of failed keepalive probes, not the operating system's two hours.
        conn.execute(
            "SELECT set_config('tcp_keepalives_idle', '30', false), "
            "set_config('tcp_keepalives_interval', '10', false), "
            "set_config('tcp_keepalives_count', '3', false), "
            "set_config('client_encoding', 'UTF8', false)"
        )
    except BaseException:
        conn.close()
        raise
    return conn


def _base_location(params: dict[str, Any]) -> str:
    host = str(params.get("host") or os.environ.get("PGHOST") or "localhost")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    user = params.get("user") or os.environ.get("PGUSER")
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or user or ""
    if host.startswith("/"):  # a Unix socket folder
        return f"postgresql:///{dbname}?host={host}&port={port}"
    return f"postgresql://{host}:{port}/{dbname}"


# ------------------------------------------------------------------ state folders


class _FolderTables(PostgresStorage):
    """The tables and connections of a :class:`PostgresFolder`; its errors name the folder.

    Its sessions (``_begin``) take the namespace's lock exclusively, and nothing else.
    """

    def __init__(self, conninfo: str, namespace: str, **options: Any) -> None:
        super().__init__(conninfo, key=namespace, **options)
        self._folder_location = self._namespace_location(namespace)
        self._session_locks = [(self._namespace_key(namespace), False)]
        self._unchanged = "every document of the folder is unchanged"
        self._whole = (
            "Every document of the group is the old one or every one is the new one; "
            "read() them to see which before running the transaction again."
        )

    @property
    def location(self) -> str:
        return self._folder_location

    @property
    def identity(self) -> str:
        return self._folder_location

    def __repr__(self) -> str:
        return f"_FolderTables({self.location!r})"


class PostgresFolder:
    """A state folder kept in PostgreSQL: documents that share one lock and commit together.

    The twin of :class:`~statestore.StateFolder`, with the same methods, for
    processes on several machines. The documents are rows of ``table`` keyed
    ``<namespace>/<name>``; a :meth:`transaction` is one SQL transaction that
    holds the namespace's advisory lock, so the documents it changed are
    committed together or not at all, and :meth:`read` is one ``SELECT`` of
    several rows (one snapshot). ``docs/postgres.md`` tells the whole story.

    >>> folder = PostgresFolder("postgresql://app@db/app", "planning")  # doctest: +SKIP
    >>> roadmap = folder.store(Roadmap, "roadmap.json", default=Roadmap)  # doctest: +SKIP
    >>> progress = folder.store(Progress, "progress.json", default=Progress)  # doctest: +SKIP
    >>> with folder.transaction() as tx:  # doctest: +SKIP
    ...     task = tx[roadmap].tasks.pop(0)
    ...     tx[progress].doing.append(task)

    ``timeout`` is how long a locked operation waits for the folder's lock (and
    a store's, for its document's); ``durable=False`` commits with
    ``synchronous_commit = off``. ``table``, ``schema``, ``backup_table`` and
    ``max_idle`` are :class:`PostgresStorage`'s; the folder and its stores
    share one pool of connections.
    """

    def __init__(
        self,
        conninfo: str,
        namespace: str,
        *,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        backup_table: str | None = None,
        timeout: float = 10.0,
        durable: bool = True,
        max_idle: int = 2,
    ) -> None:
        if not isinstance(namespace, str) or not namespace or "\0" in namespace:
            raise ValueError(f"namespace must be a non-empty string without NUL, not {namespace!r}")
        self._tables = _FolderTables(
            conninfo,
            namespace,
            table=table,
            schema=schema,
            backup_table=backup_table,
            durable=durable,
            max_idle=max_idle,
        )
        self.namespace = namespace
        self.table = table
        self.schema = schema
        self.backup_table = self._tables.backup_table
        self.timeout = timeout
        self.durable = durable
        self._conninfo = conninfo
        self._max_idle = max_idle
        self._stores: dict[str, StateStore[Any]] = {}

    def __repr__(self) -> str:
        return f"PostgresFolder({self.location!r})"

    @property
    def location(self) -> str:
        """``postgresql://host:port/dbname#table/namespace/``: no user name, no password."""
        return self._tables.location

    @property
    def lock_id(self) -> int:
        """The namespace's advisory lock key (``pg_locks``: ``classid``/``objid``), asked
        of the server as :attr:`PostgresStorage.lock_id` is."""
        return self._tables.lock_id

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
    ) -> StateStore[M]:
        """A store of the document ``name`` (without ``/``) of this folder: the row
        keyed ``<namespace>/<name>``.

        An ordinary :class:`StateStore` in every way; its sessions take the
        folder's lock (shared) before the document's own, so they wait for a
        folder transaction, and it for them.
        """
        if not isinstance(name, str) or not name or "/" in name or "\0" in name:
            raise ValueError(
                f"{name!r}: a folder's document is named by a non-empty name without '/' "
                "or NUL (make another PostgresFolder, namespace '<namespace>/<sub>', for "
                "a subfolder)"
            )
        t = self._tables
        storage = PostgresStorage(
            self._conninfo,
            key=self._key(name),
            table=t.table,
            schema=t.schema,
            backup_table=t.backup_table,
            durable=self.durable,
            max_idle=self._max_idle,
        )
        # One pool for the folder and its stores, closed when the first of them goes
        # (the others open connections again as they need them).
        storage._pool = t._pool
        weakref.finalize(storage, t._pool.close)
        made = StateStore(
            model,
            storage,
            default=default,
            timeout=self.timeout,
            version=version,
            migrations=migrations,
            schema_ref=schema_ref,
            read_attempts=read_attempts,
            read_delay=read_delay,
        )
        self._stores[name] = made
        return made

    @property
    def stores(self) -> tuple[StateStore[Any], ...]:
        """The stores made with :meth:`store`, one per document (the latest), by name."""
        return tuple(self._stores[n] for n in sorted(self._stores))

    @contextmanager
    def transaction(self) -> Iterator[PostgresFolderTransaction]:
        """``with folder.transaction() as tx:`` change several documents, commit them together.

        One SQL transaction holding the folder's lock. ``tx[store]`` is the
        loaded, mutable model of that store's document (loaded on first use,
        migrated in memory, the newer-version guard checked). On normal exit
        every changed document (and the backup of each migrated one) is written
        and the transaction committed; if the block raises, it is rolled back
        and nothing is written.
        """
        mark = (threading.get_ident(), self.location)
        with _marks_lock:
            if mark in _folder_marks or _store_marks.get(mark):
                raise NestedTransactionError(
                    self.location,
                    "transaction() called inside a transaction of this folder, or of one "
                    "of its documents, in the same thread: it would wait for itself. "
                    "Change the state yielded by the outer transaction instead",
                )
            _folder_marks.add(mark)
        try:
            tx = PostgresFolderTransaction(self, self._tables._begin(self.timeout))
            try:
                yield tx
            except BaseException:
                tx.abort()
                raise
            tx.commit()
        finally:
            with _marks_lock:
                _folder_marks.discard(mark)

    def read(self, *stores: StateStore[Any]) -> PostgresFolderSnapshot:
        """The documents of ``stores`` as of one moment, without the lock.

        One ``SELECT`` of their rows: a statement sees one snapshot of the
        database, in which a folder transaction is committed entirely or not at
        all. Each is validated (and migrated in memory) as :meth:`StateStore.load`
        does; a missing one is its store's default.
        """
        names = {self._name_of(s): s for s in stores}
        keys = [self._key(n) for n in names]
        t = self._tables
        query = sql.SQL(
            "SELECT key, convert_to(document, 'UTF8') FROM {} WHERE key = ANY(%s)"
        ).format(t._table_id)

        def run(conn: _Conn) -> list[tuple[Any, ...]]:
            try:
                return conn.execute(query, (keys,)).fetchall()
            except pgerrors.UndefinedTable:
                return []  # nothing was ever saved to this table

        rows: list[tuple[Any, ...]] = t._with_connection(run, StateReadError, "reading")
        found = {str(key): bytes(data) for key, data in rows}
        states: dict[str, Any] = {}
        for name, store in names.items():
            data = found.get(self._key(name))
            doc = store.document
            states[name] = doc.make_default() if data is None else doc.parse(data).model
        return PostgresFolderSnapshot(self, states)

    def recover(self) -> bool:
        """Whether an unfinished group commit was completed: never, on PostgreSQL (the
        server rolls back the transaction of a holder that died). For programs
        written for :class:`~statestore.StateFolder`."""
        return False

    def close(self) -> None:
        """Close the idle connections of the folder and its stores."""
        self._tables.close()

    def __enter__(self) -> PostgresFolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _key(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def _name_of(self, store: StateStore[Any]) -> str:
        """The name of ``store``'s document in this folder; a typed error if it is not one."""
        storage = store.storage
        t = self._tables
        if not (
            isinstance(storage, PostgresStorage)
            and not isinstance(storage, _FolderTables)
            and storage._base == t._base
            and storage._qualified == t._qualified
            and storage.backup_table == t.backup_table
            and storage.namespace == self.namespace
        ):
            raise StateStoreError(
                store.location,
                f"is not a document of the state folder {self.location} (a folder's "
                "documents are the rows of its table keyed '<namespace>/<name>', with its "
                "backup table; make the store with folder.store())",
            )
        return storage.key.rpartition("/")[2]


class PostgresFolderTransaction(GroupTransaction):
    """The documents of one :meth:`PostgresFolder.transaction`: ``tx[store]``."""

    def __init__(self, folder: PostgresFolder, conn: _Conn) -> None:
        super().__init__(folder)
        self._conn = conn
        self._pid = os.getpid()

    def _begin_document(self, store: StateStore[Any]) -> Transaction[Any]:
        storage = store.storage
        assert isinstance(storage, PostgresStorage)
        # The document's statements run in the folder's transaction, on its connection.
        session = PostgresSession(storage, self._conn)
        session._pid = self._pid
        txn: Transaction[Any] = Transaction(store.document, session)
        txn.begin()
        return txn

    def abort(self) -> None:
        """End without writing: roll the transaction back (what a block that raises does)."""
        if self._ended:
            return
        self._ended = True
        for _, txn in self._open.values():
            txn.abort()
        _end_transaction(self._folder._tables, self._conn, None, self._pid, commit=False)

    def commit(self) -> None:
        """Write every changed document and commit them as one SQL transaction (what the
        end of the block does)."""
        if self._ended:  # before the transaction is touched: a second commit changes nothing
            raise RuntimeError("the folder transaction has ended")
        xid: str | None = None
        try:
            # Proved (and each migrated document's backup kept) first, written in the
            # order of their keys, all in the one transaction.
            for _, txn, data in self.staged():
                txn.session.write(data)
            for _, txn in self._open.values():
                session = txn.session
                assert isinstance(session, PostgresSession)
                xid = xid or session._xid
        except BaseException:
            _end_transaction(self._folder._tables, self._conn, None, self._pid, commit=False)
            raise
        _end_transaction(self._folder._tables, self._conn, xid, self._pid, commit=True)


class PostgresFolderSnapshot(FolderSnapshot):
    """Documents read together by :meth:`PostgresFolder.read`: ``snapshot[store]``."""

    _not_read = (KeyError, StateStoreError, AttributeError)
