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

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, contextmanager
from types import TracebackType
from typing import Any, Final, TypeVar

from pydantic import BaseModel

try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg import pq, sql
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
from .._history import HistoryEntry
from .._migrate import Migrations
from .._store import StateStore
from .._transaction import Transaction
from .._watch import WatcherBase, readable

__all__ = [
    "WATCH_POLL_INTERVAL",
    "WATCH_RECONNECT",
    "PostgresFolder",
    "PostgresFolderSnapshot",
    "PostgresFolderTransaction",
    "PostgresHistory",
    "PostgresSession",
    "PostgresStorage",
    "PostgresWatcher",
    "channel_of",
    "notify_payload",
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
    for watcher in list(_watchers):
        watcher._forked()
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
#: The channel a commit notifies, computed by the server: ``statestore_<table OID>``.
#: An identifier of digits and letters only, whatever the table is called, and one
#: channel for every spelling of one table (the OID, as the server resolves the name).
_CHANNEL: Final = "'statestore_' || {table}::regclass::oid::text"
#: A key longer than this (in UTF-8) is notified by its digest: a payload is limited
#: to 8000 bytes by the server.
_PAYLOAD_MAX: Final = 1024
#: Seconds between a watcher's looks at the row's version: the latency for a change
#: made without statestore (a hand ``UPDATE`` in psql sends no notification).
WATCH_POLL_INTERVAL: Final = 1.0
#: How long a watcher tries to connect again after losing its connection, before
#: raising :class:`~statestore.StateReadError` from ``wait()`` (and trying again after).
WATCH_RECONNECT: Final = 10.0
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


def notify_payload(key: str) -> str:
    """What a commit of ``key`` sends with its notification: the key itself, or for a
    key longer than 1024 bytes (UTF-8), ``"sha256:"`` and its digest in hex."""
    if len(key.encode()) <= _PAYLOAD_MAX:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def channel_of(table_oid: int) -> str:
    """The channel the commits of the table ``table_oid`` notify (``LISTEN`` it)."""
    return f"statestore_{int(table_oid)}"


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
        # The notification is sent by the server at commit, only if it commits.
        self._change(s._upsert, (s.key, data, s._payload), "saving")

    def history(self, keep: int) -> PostgresHistory:
        """The history keeper of the document (``history=N``), in this session's
        transaction: versions recorded with the commit, pruned with it, or not at all."""
        return PostgresHistory(self._storage, keep, self)

    def backup_location(self, label: str) -> str:
        return self._storage.backup_location(label)

    def backup(self, label: str, data: bytes) -> str:
        s = self._storage
        # Inserted only if absent: a backup keeps the first original of that version.
        self._change(s._insert_backup, (s.key, label, data), "keeping a backup")
        return self.backup_location(label)

    def _change(
        self, query: sql.Composed, params: tuple[Any, ...] | Mapping[str, Any], what: str
    ) -> None:
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
    are created when missing. ``history_table`` (default ``<table>_history``) holds
    the versions a store with ``history=N`` keeps, created at the first one.
    ``watch_poll``: seconds between a watcher's looks at the row, the latency for
    a change made without statestore (commits through it are notified at once).
    ``notify=False``: commits send no notification (the server serialises the
    commits of every transaction that notifies); watchers then rely on the poll.
    ``durable=False`` commits with ``synchronous_commit = off`` (a server crash may
    lose the last saves, never mix them). Up to ``max_idle`` connections are kept
    open between uses, shared by the process's threads.

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
        history_table: str | None = None,
        watch_poll: float = WATCH_POLL_INTERVAL,
        notify: bool = True,
    ) -> None:
        if not isinstance(key, str) or not key or "\0" in key:
            raise ValueError(f"key must be a non-empty string without NUL, not {key!r}")
        backup_table = f"{table}_backups" if backup_table is None else backup_table
        history_table = f"{table}_history" if history_table is None else history_table
        for what, name in (
            ("table", table),
            ("backup_table", backup_table),
            ("history_table", history_table),
            ("schema", schema),
        ):
            if name is not None:
                _check_name(what, name)
        if max_idle < 0:
            raise ValueError("max_idle must be at least 0")
        if not (isinstance(watch_poll, (int, float)) and watch_poll > 0):
            raise ValueError(f"watch_poll must be a positive number of seconds, not {watch_poll!r}")
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error as e:
            raise ValueError(f"not a valid PostgreSQL conninfo: {_reason(e)}") from e
        self.key = key
        self.table = table
        self.schema = schema
        self.backup_table = backup_table
        #: The table of the kept versions (``history=N``), made at the first one.
        self.history_table = history_table
        #: Seconds between a watcher's looks at the row (a change made without
        #: statestore, such as an ``UPDATE`` in psql, is seen within this).
        self.watch_poll = float(watch_poll)
        #: Whether commits notify watchers (False: they see changes by the poll only).
        self.notify = bool(notify)
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
        #: The channel of the table's commits, computed by the server from the table's
        #: OID (``statestore_<oid>``), and what a commit of this key sends on it.
        self._channel_sql = sql.SQL(_CHANNEL).format(table=sql.Literal(self._qualified))
        self._payload = notify_payload(key)
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
        # The notification is queued by the same statement (one row from pg_notify),
        # and the server delivers it at commit, only if the transaction commits.
        notifying = (
            sql.SQL("pg_notify({}, %s)").format(self._channel_sql)
            if self.notify
            else sql.SQL("(SELECT %s::text) AS quiet")
        )
        self._upsert = sql.SQL(
            "INSERT INTO {} AS d (key, document, updated_at) "
            "SELECT %s, convert_from(%s, 'UTF8'), clock_timestamp() FROM {} "
            "ON CONFLICT (key) DO UPDATE "
            "SET document = EXCLUDED.document, updated_at = EXCLUDED.updated_at "
            "RETURNING pg_current_xact_id()::text"
        ).format(t, notifying)
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

    # ------------------------------------------------- watching and history

    #: Starting a watch waits on the server (a connection, ``LISTEN``, a read): the
    #: async store starts it on a worker thread.
    watch_blocks: Final = True

    def watcher(self, *, poll_interval: float | None = None) -> PostgresWatcher:
        """A :class:`PostgresWatcher` of this document (what ``store.watch()`` waits on)."""
        return PostgresWatcher(
            self, poll_interval=self.watch_poll if poll_interval is None else poll_interval
        )

    def history(self, keep: int) -> PostgresHistory:
        """The history keeper of the document (``history=N``), reading on a pooled
        connection; a session's (:meth:`PostgresSession.history`) records."""
        return PostgresHistory(self, keep)

    @property
    def history_location(self) -> str:
        """``postgresql://host:port/dbname#<history table>/key``: where the versions are."""
        kept = self._quoted(self.history_table).replace(chr(34), "")
        return f"{self._base}#{kept}/{self.key}"

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


# ------------------------------------------------------------------ history


class PostgresHistory:
    """The last ``keep`` committed versions of one document, in the history table.

    The twin of :class:`statestore._history.History` (the same ``entries``,
    ``newest``, ``read`` and ``record``). One row per version of a key: ``seq``
    (orders them), ``revision``, ``written_by`` (JSON), ``document`` (the exact
    bytes committed) and ``recorded_at``. The rules:

    * **With the commit, or not at all.** A keeper made by a session
      (:meth:`PostgresSession.history`) records in the session's transaction:
      the version row and the pruning are committed with the document, and
      rolled back with it (a failed commit, a killed client) — there is never a
      version of a commit that did not happen.
    * **Bounded.** Each record deletes the key's versions beyond the newest
      ``keep``, in the same statement: a key has at most ``keep`` rows after
      any commit.
    * **Only ours.** The table is created (``IF NOT EXISTS``, serialised like
      the documents' table) by the first record; only rows of the key are
      read, added or deleted.

    Records of one key are serialised by the key's advisory lock (the session
    holds it), which is what makes ``max(seq) + 1`` safe.
    """

    def __init__(
        self, storage: PostgresStorage, keep: int, session: PostgresSession | None = None
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a whole number of versions, at least 1, not {keep!r}")
        self.keep = keep
        self._storage = storage
        self._session = session
        self._table_ready = False
        h = storage._ident(storage.history_table)
        self._name = storage._quoted(storage.history_table)
        self._create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "key text NOT NULL, seq bigint NOT NULL, revision text NOT NULL, "
            "written_by text, document bytea NOT NULL, "
            "recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
            "PRIMARY KEY (key, seq))"
        ).format(h)
        self._create_key = sql.SQL(_CREATE_KEY).format(
            schema=sql.Literal(storage.schema), table=sql.Literal(storage.history_table)
        )
        self._entries = sql.SQL(
            "SELECT revision, extract(epoch FROM recorded_at)::float8, written_by, "
            "octet_length(document) FROM {} WHERE key = %s ORDER BY seq DESC"
        ).format(h)
        self._newest = self._entries + sql.SQL(" LIMIT 1")
        self._read = sql.SQL(
            "SELECT document FROM {} WHERE key = %s AND revision = %s ORDER BY seq DESC LIMIT 1"
        ).format(h)
        # Added and pruned in one statement (a data-modifying WITH runs whether or not
        # it is referred to); the DELETE sees the rows from before the INSERT.
        self._record = sql.SQL(
            "WITH n AS (SELECT coalesce(max(seq), 0) + 1 AS seq FROM {h} WHERE key = %(key)s), "
            "ins AS (INSERT INTO {h} (key, seq, revision, written_by, document) "
            "SELECT %(key)s, n.seq, %(revision)s, %(written_by)s, %(document)s FROM n "
            "RETURNING seq), "
            "del AS (DELETE FROM {h} WHERE key = %(key)s AND seq <= "
            "(SELECT seq FROM ins) - %(keep)s RETURNING 1) "
            "SELECT pg_current_xact_id()::text, (SELECT count(*) FROM del)"
        ).format(h=h)

    @property
    def location(self) -> str:
        return self._storage.history_location

    def _run(self, query: sql.Composed, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Rows of ``query``; none when the table does not exist yet."""
        s = self._storage
        session = self._session
        if session is not None:
            # In the session's transaction: a failed statement would abort it, so
            # the table's existence is asked first rather than tried.
            try:
                conn = session._usable()
                if not self._exists(conn):
                    return []
                return conn.execute(query, params).fetchall()
            except psycopg.Error as e:
                raise StateReadError(
                    self.location, _describe(e, "reading the history under the lock")
                ) from e

        def run(conn: _Conn) -> list[tuple[Any, ...]]:
            try:
                return conn.execute(query, params).fetchall()
            except pgerrors.UndefinedTable:
                return []  # no version was ever kept in this table

        rows: list[tuple[Any, ...]] = s._with_connection(run, StateReadError, "reading the history")
        return rows

    def _exists(self, conn: _Conn) -> bool:
        if not self._table_ready:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self._name,)).fetchone()
            self._table_ready = bool(row and row[0])
        return self._table_ready

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> HistoryEntry:
        revision, when, written_by, size = row
        who = json.loads(written_by) if written_by is not None else None
        return HistoryEntry(str(revision), float(when), who, int(size))

    def entries(self) -> list[HistoryEntry]:
        """The kept versions, newest first (empty when nothing was recorded)."""
        return [self._entry(r) for r in self._run(self._entries, (self._storage.key,))]

    def newest(self) -> HistoryEntry | None:
        """The newest kept version, or None."""
        rows = self._run(self._newest, (self._storage.key,))
        return self._entry(rows[0]) if rows else None

    def read(self, revision: str) -> bytes:
        """The bytes committed as ``revision`` (the newest such, if recorded twice)."""
        rows = self._run(self._read, (self._storage.key, revision))
        if rows:
            return bytes(rows[0][0])
        kept = ", ".join(e.revision for e in self.entries()[:5]) or "none"
        raise StateReadError(
            self._storage.location,
            f"revision {revision!r} is not in the history (never recorded, or pruned: "
            f"only the newest {self.keep} are kept). Newest kept: {kept}",
            errno=errno.ENOENT,
        )

    def record(
        self, data: bytes, revision: str, written_by: Mapping[str, Any] | None = None
    ) -> None:
        """Keep ``data`` as ``revision`` and prune to the newest ``keep``, in the
        session's transaction (committed with it)."""
        session = self._session
        if session is None:
            raise RuntimeError("versions are recorded in a session: storage.session().history()")
        if not isinstance(revision, str) or not revision:
            raise ValueError(f"revision must be a non-empty string, not {revision!r}")
        who = json.dumps(dict(written_by)) if written_by is not None else None
        try:
            conn = session._usable()
            if not self._exists(conn):
                # Serialised by a lock of its own, as the documents' table is; made
                # in this transaction, so it is there exactly if the commit is.
                conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(self._create_key))
                conn.execute(self._create)
                self._table_ready = True
        except psycopg.Error as e:
            raise StateWriteError(
                self.location,
                f"{_describe(e, f'creating the history table {self._name}')}. Nothing was "
                "saved; the stored document is unchanged",
            ) from e
        params = {
            "key": self._storage.key,
            "revision": revision,
            "written_by": who,
            "document": bytes(data),
            "keep": self.keep,
        }
        session._change(self._record, params, "keeping a version in the history")


# ------------------------------------------------------------------ watching


class PostgresWatcher(WatcherBase):
    """Wait for a change of one document of a PostgreSQL table, from any machine.

    The twin of :class:`statestore._watch.FileWatcher`: ``wait(timeout)`` returns
    True when the row *may* have changed (the caller re-reads and compares
    revisions), False at the timeout or when another thread calls ``close()``;
    ``wait_async`` is the same for asyncio. The rules:

    * **Notified commits.** Every commit through statestore (a store's session,
      a :class:`PostgresFolder` group) sends ``pg_notify('statestore_<table
      OID>', <key>)`` in its transaction, so the notification is delivered
      only if the commit happened. The watcher holds a connection of its own
      (autocommit) that ``LISTEN``\\ s on the table's channel, and wakes on a
      notification of its key only (``notify_payload``): a commit of another
      document of the table is read off the socket and ignored.
    * **Changes made by hand are polled.** An ``UPDATE`` in psql sends nothing,
      so every ``poll_interval`` seconds (:data:`WATCH_POLL_INTERVAL`, 1 s) the
      watcher looks at the row's ``xmin`` (the transaction that wrote the row
      version: it changes with every update), and at the table's OID (a table
      dropped and made again: the channel is listened for afresh). One small
      query a second on an idle socket, not a trigger: it needs no privilege
      beyond SELECT and changes nothing in the user's schema.
    * **No CPU while idle.** The waiting thread sleeps in ``select`` on the
      connection's socket and a wake-up pipe, up to the next poll.
    * **A lost connection is not a quiet one.** When the socket fails, the
      watcher connects again with backoff (0.1 s doubling to 2 s); once
      connected it reports a change (the caller re-reads: what happened
      meanwhile is not lost), and until then it reports none (nothing stale
      is handed out). If it cannot connect within ``reconnect_for`` seconds
      (:data:`WATCH_RECONNECT`) of the loss, ``wait()`` raises
      :class:`StateReadError` naming the document; the next ``wait()`` tries
      again.
    * **Forks.** A forked child never uses its parent's connection: its first
      ``wait()`` connects anew and reports a change.
    """

    def __init__(
        self,
        storage: PostgresStorage,
        *,
        poll_interval: float | None = None,
        reconnect_for: float = WATCH_RECONNECT,
    ) -> None:
        interval = WATCH_POLL_INTERVAL if poll_interval is None else poll_interval
        if not interval > 0:
            raise ValueError("poll_interval must be positive")
        self._storage = storage
        self.location = storage.location
        self.poll_interval = float(interval)
        self.reconnect_for = reconnect_for
        self._payload = storage._payload
        self._lock = threading.Lock()  # the closed flag and the count of waiters
        self._io = threading.Lock()  # the connection: one look at a time
        self._closed = False
        self._waiting = 0
        self._pid = os.getpid()
        self._conn: _Conn | None = None
        self._channel: str | None = None
        self._oid: int | None = None
        self._seen: tuple[int | None, str | None] | None = None
        self._pending = False
        self._next_poll = 0.0
        self._lost_at: float | None = None
        self._next_try = 0.0
        self._backoff = 0.1
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._look = sql.SQL(
            "SELECT to_regclass(%s)::oid::int8, (SELECT xmin::text FROM {} WHERE key = %s)"
        ).format(storage._table_id)
        try:
            self._connect()
        except psycopg.Error as e:
            self._release()
            raise StateReadError(self.location, _describe(e, "connecting to watch")) from e
        self._pending = False  # the first look is the state the caller starts from
        _watchers.add(self)

    # -- public -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        """Whether the watcher holds a live connection now."""
        return self._conn is not None

    @property
    def backend_pid(self) -> int | None:
        """The server process of the listening connection (None while disconnected)."""
        conn = self._conn
        return None if conn is None else conn.info.backend_pid

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the row may have changed since the last wait (True), the
        timeout passes (False) or another thread closes the watcher (False)."""
        self._enter()
        try:
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
            while True:
                if self._collect():
                    return True
                if self._closed:
                    return False
                if deadline is not None and deadline - time.monotonic() <= 0:
                    return False
                step = self._step(deadline)
                fds = self._fds()
                ready, _, _ = select.select(fds, [], [], step)
                if self._wake_r in ready:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 512)
        finally:
            self._leave()

    async def wait_async(self, timeout: float | None = None) -> bool:
        """:meth:`wait` for asyncio: the loop watches the socket and the wake-up pipe;
        each look at the server (a poll, a reconnection) runs on a worker thread."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        self._enter()
        try:
            while True:
                job = loop.run_in_executor(None, self._collect)
                try:
                    changed = await asyncio.shield(job)
                except asyncio.CancelledError:
                    job.add_done_callback(self._keep_pending)
                    raise
                if changed:
                    return True
                if self._closed:
                    return False
                step = self._step(deadline)
                if deadline is not None and deadline - time.monotonic() <= 0:
                    return False
                await readable(self._fds(), step)
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 512)
        finally:
            self._leave()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("listening" if self._conn else "disconnected")
        return f"<PostgresWatcher {self.location!r} {state}>"

    # -- inside -----------------------------------------------------------

    def _keep_pending(self, job: asyncio.Future[bool]) -> None:
        # A change collected for a waiter that was cancelled is the next wait's.
        if not job.cancelled() and job.exception() is None and job.result():
            self._pending = True

    def _forked(self) -> None:
        """In a forked child: fresh locks and pipe, the parent's connection let go;
        the first wait connects anew and reports a change."""
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._waiting = 0
        if self._closed:
            return
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._drop()  # while _pid is still the parent's: kept, never closed
        self._pid = os.getpid()
        self._lost(time.monotonic())

    def _fds(self) -> list[int]:
        """What a wait sleeps on: the wake-up pipe, and the socket while connected."""
        fds = [self._wake_r]
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # dropped meanwhile: the next look says
                fds.append(conn.fileno())
        return fds

    def _step(self, deadline: float | None) -> float:
        """Seconds to sleep: until the deadline, the next poll or the next reconnection."""
        now = time.monotonic()
        until = self._next_poll if self._conn is not None else self._next_try
        step = max(until - now, 0.0)
        if deadline is not None:
            step = min(step, max(deadline - now, 0.0))
        return step

    def _enter(self) -> None:
        with self._lock:
            if self._closed:
                raise StateReadError(
                    self.location, "the watcher is closed; make a new one", errno=errno.EBADF
                )
            self._waiting += 1

    def _release(self) -> None:
        self._drop()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        _watchers.discard(self)

    def _drop(self) -> None:
        """Let the connection go (a forked child's is its parent's: kept, never used)."""
        conn, self._conn = self._conn, None
        self._channel = self._oid = None
        if conn is None:
            return
        if self._pid != os.getpid():
            _inherited.append(conn)
            return
        with contextlib.suppress(Exception):
            conn.close()

    def _on_notify(self, note: psycopg.Notify) -> None:
        if note.channel == self._channel and note.payload == self._payload:
            self._pending = True

    def _connect(self) -> None:
        """Connect, listen on the table's channel, and look at the row."""
        conn = self._storage._connect()
        # Through a weak reference: the connection must not keep the watcher alive,
        # so that a watcher let go is closed (and its connection with it) at once.
        conn.add_notify_handler(functools.partial(_notify_weakly, weakref.ref(self)))
        self._conn = conn
        self._channel = self._oid = None
        self._poll(time.monotonic())

    def _listen(self, conn: _Conn, oid: int | None) -> None:
        if oid == self._oid:
            return
        if self._channel is not None:
            conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(self._channel)))
            self._channel = None
        self._oid = oid
        if oid is not None:
            channel = channel_of(oid)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._channel = channel

    def _poll(self, now: float) -> None:
        """Look at the table's OID and the row's ``xmin``; a difference is a change.
        Listening on the channel comes before the look, so nothing falls between."""
        conn = self._conn
        assert conn is not None
        s = self._storage
        try:
            row = conn.execute(self._look, (s._qualified, s.key)).fetchone()
        except pgerrors.UndefinedTable:  # dropped between the two halves of the look
            row = None
        oid = None if row is None or row[0] is None else int(row[0])
        if oid != self._oid:
            self._listen(conn, oid)
            # Again, now that the channel is listened on: a commit in between is seen.
            try:
                row = conn.execute(self._look, (s._qualified, s.key)).fetchone()
            except pgerrors.UndefinedTable:
                row = None
        seen = (oid, None if row is None or row[1] is None else str(row[1]))
        if seen != self._seen:
            self._seen = seen
            self._pending = True
        self._next_poll = now + self.poll_interval

    def _notified(self, conn: _Conn) -> None:
        """Take in the notifications that arrived on the idle socket (never blocks)."""
        pgconn = conn.pgconn
        pgconn.consume_input()
        while (note := pgconn.notifies()) is not None:
            channel = note.relname.decode("utf-8", "replace")
            payload = note.extra.decode("utf-8", "replace")
            if channel == self._channel and payload == self._payload:
                self._pending = True
        if pgconn.status != pq.ConnStatus.OK:
            raise psycopg.OperationalError("the connection to the server was lost")

    def _collect(self) -> bool:
        """Take in what happened (blocking only on a poll or a reconnection); True if
        a change is to report."""
        with self._io:
            if self._closed:
                return False
            now = time.monotonic()
            if self._pid != os.getpid():  # forked without the at-fork hook
                self._drop()
                self._pid = os.getpid()
                self._lost(now)
            if self._conn is None:
                self._reconnect(now)
            else:
                try:
                    self._notified(self._conn)
                    if now >= self._next_poll:
                        self._poll(now)
                except (psycopg.Error, OSError):
                    self._drop()
                    self._lost(now)
                    self._reconnect(now)
            if self._conn is None:
                return False  # nothing is reported while disconnected: it could be stale
            changed, self._pending = self._pending, False
            return changed

    def _lost(self, now: float) -> None:
        if self._lost_at is None:
            self._lost_at = now
            self._next_try = now
            self._backoff = 0.1

    def _reconnect(self, now: float) -> None:
        if now < self._next_try:
            return
        try:
            self._connect()
        except (psycopg.Error, OSError) as e:
            self._drop()
            lost_at = self._lost_at if self._lost_at is not None else now
            self._next_try = now + self._backoff
            self._backoff = min(self._backoff * 2, 2.0)
            if now - lost_at >= self.reconnect_for:
                self._lost_at = now  # the next wait tries for as long again
                why = _describe(e, "connecting") if isinstance(e, psycopg.Error) else str(e)
                raise StateReadError(
                    self.location,
                    "the watcher lost its connection to the server and could not connect "
                    f"again within {self.reconnect_for:g} s: {why}. Iterate again to keep "
                    "trying, or close the watch",
                ) from e
            return
        self._lost_at = None
        self._pending = True  # what happened while disconnected is unknown: re-read


_watchers: weakref.WeakSet[PostgresWatcher] = weakref.WeakSet()


def _notify_weakly(ref: weakref.ReferenceType[PostgresWatcher], note: psycopg.Notify) -> None:
    watcher = ref()
    if watcher is not None:
        watcher._on_notify(note)


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
        history: int | None = None,
    ) -> StateStore[M]:
        """A store of the document ``name`` (without ``/``) of this folder: the row
        keyed ``<namespace>/<name>``.

        An ordinary :class:`StateStore` in every way; its sessions take the
        folder's lock (shared) before the document's own, so they wait for a
        folder transaction, and it for them. ``history=N``: the store's own
        commits keep versions (``<table>_history``); a group commit records
        none, and the store's next commit records the version it replaces.
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
            history=history,
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
