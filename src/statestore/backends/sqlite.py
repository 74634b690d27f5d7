"""The SQLite backend: one row per document in a database file, WAL, ``BEGIN IMMEDIATE``.

For programs on one machine that want SQLite's speed and accept a database file
in place of a JSON file::

    from statestore import StateStore
    from statestore.backends.sqlite import SqliteStorage

    store = StateStore(Settings, SqliteStorage("state.db", key="settings"), default=Settings)

A row holds the store's exact bytes (the same bytes a file store writes, commit
stamp and all), so revisions, ``written_by``, ``save(expect=)``, migrations and
their backups work unchanged. Several documents (keys) share one database.
``docs/sqlite.md`` has the user's view.

The rules.

* **A session is one write transaction.** ``BEGIN IMMEDIATE`` takes SQLite's
  write lock up front, so a load, modify and save is exclusive across
  processes and threads; it commits on normal exit and rolls back on any
  exception (nothing written). SQLite has one write lock per database file:
  sessions of two keys of one database take turns. The wait honours the
  store's ``timeout`` and ends in :class:`LockTimeout` (naming the holder's pid
  when ``/proc/locks`` shows it). Threads of one process queue on a lock of the
  process first (a blocking wait, no polling), so at most one thread per
  process tries SQLite's lock, sleeping between tries (from 0.1 ms, doubling up
  to ``POLL_CAP``, 2 ms, jittered): a wait costs little CPU, and a lock given up
  is taken within 2 ms (SQLite's own busy handler sleeps up to 100 ms). A session
  inside a session of the same database in one thread would wait for itself:
  :class:`NestedTransactionError` at once.
* **Durable by default.** ``journal_mode=WAL`` and ``synchronous=FULL`` (each
  commit is fsynced to the write-ahead log before it returns); ``durable=False``
  uses ``synchronous=NORMAL`` (a power loss may lose the last commits, never
  mix them). A commit whose log write fails (a full disk, a file size limit)
  saved nothing: :class:`StateWriteError` (Python 3.11+: older ``sqlite3``
  modules do not tell it from the next case). One that fails otherwise (its fsync)
  may or may not have reached the log: :class:`DurabilityError`, never a
  :class:`StateWriteError`, which promises nothing was saved.
* **Only a file of ours is opened.** Before SQLite opens the database, and
  again right after, the path is ``lstat``-ed: it must be a regular file, of
  this user, with one link, and the same file both times. A symbolic link, a
  hard-linked file (SQLite keeps its ``-wal`` and ``-shm`` files next to the
  name it opens: two names of one database give two write-ahead logs, which
  corrupts it), a folder, a named pipe, a socket, a device or another user's
  file is a :class:`StateReadError`, before anything is opened, so nothing
  blocks and nothing is written. The same holds for the ``-wal``, ``-shm`` and
  ``-journal`` files beside it, which SQLite would otherwise write through
  (checked before each new connection is opened: a file swapped in by another
  writer of the folder in that instant is outside the rule, as for any program).
  A ``-wal`` or ``-shm`` file without its database (a database deleted, its log
  left) is refused too: a new database must not replay another one's log.
  A file that is not a SQLite database, or a damaged one, is an error
  (:class:`StateReadError`, :class:`StateCorruptError`) and is never rewritten;
  a database of other tables is used (two tables are added to it). An empty
  file is an empty database (SQLite's own rule).
* **Created private.** A missing database is created by the first write (never
  by a read), with ``O_EXCL`` and mode ``0600`` (the umask can only narrow it);
  SQLite gives its ``-wal`` and ``-shm`` files the database's mode. A missing
  folder is created as a file store creates it.
* **A row is a document.** A row whose bytes do not parse or validate gives the
  errors a damaged file gives (:class:`StateCorruptError`,
  :class:`StateValidationError`), and a plain load never writes it. Rows larger
  than ``max_size`` are refused unread.
* **Connections belong to one process.** Connections are pooled per storage
  and checked at every use: one opened before a ``fork`` is never used, closed
  or collected in the child (it is kept aside, untouched: closing it there
  could checkpoint the parent's log), and one whose path now names another
  file (the database was deleted or replaced) is dropped, so a write never goes
  to a file that is gone.
"""

from __future__ import annotations

import errno
import math
import os
import random
import sqlite3
import stat
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, suppress
from types import TracebackType
from typing import Final

from .._atomic import DEFAULT_MAX_SIZE, file_kind
from .._errors import (
    DurabilityError,
    LockCompromisedError,
    LockTimeout,
    NestedTransactionError,
    StateCorruptError,
    StateReadError,
    StateStoreError,
    StateWriteError,
)

__all__ = ["DEFAULT_TABLE", "SqliteSession", "SqliteStorage"]

DEFAULT_TABLE: Final = "statestore_documents"
#: The files SQLite keeps beside a database (and writes through, by name).
COMPANIONS: Final = ("-wal", "-shm", "-journal")
#: Mode of a database this backend creates (the umask can only narrow it).
FILE_MODE: Final = 0o600
#: How long a lock-free read waits for SQLite (only crash recovery keeps readers waiting).
READ_BUSY: Final = 10.0
#: The longest sleep between two tries of a busy write lock (seconds).
POLL_CAP: Final = 0.002
#: The byte of the ``-shm`` file whose POSIX lock is SQLite's WAL write lock.
_WAL_WRITE_LOCK_BYTE: Final = 120

# SQLite's primary result codes, and the extended code of a failed write.
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26
_IOERR_WRITE: Final = _IOERR | 3 << 8

# Connections a forked child inherited from its parent: never used, closed or
# collected there (closing one could checkpoint, or delete, the parent's log).
_inherited: list[sqlite3.Connection] = []
_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()
_gates_lock = threading.Lock()
_gates: dict[str, _Gate] = {}


def _keep(conn: sqlite3.Connection) -> None:
    """Keep a parent's connection in this child for good: not even the interpreter's
    exit may collect it (collecting closes it, and sqlite3 has no fork check)."""
    import ctypes  # only in a forked child that inherited connections

    _inherited.append(conn)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))


def _after_fork_in_child() -> None:
    global _gates_lock
    for pool in list(_pools):
        pool.after_fork()
    _gates_lock = threading.Lock()
    _gates.clear()  # the child holds none of its parent's sessions


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Gate:
    """The process's turn at one database's write lock: threads wait here, blocked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # not thread-owned: an async session ends elsewhere
        self.holder: threading.Thread | None = None  # the thread of a sync session


def _gate(database: str) -> _Gate:
    with _gates_lock:
        gate = _gates.get(database)
        if gate is None:
            gate = _gates[database] = _Gate()
        return gate


class _Conn:
    """A connection, the process that opened it and the file (device, inode) it opened."""

    __slots__ = ("conn", "file", "pid", "wal")

    def __init__(self, conn: sqlite3.Connection, file: tuple[int, int]) -> None:
        self.conn = conn
        self.file = file
        self.pid = os.getpid()
        self.wal = False  # whether journal_mode=WAL was seen on it


class _Pool:
    """Idle connections of one storage, shared by the process's threads."""

    def __init__(self, max_idle: int) -> None:
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        _pools.add(self)

    def after_fork(self) -> None:
        # In the child, single-threaded, right after fork.
        for c in self._idle:
            _keep(c.conn)
        self._idle = []
        self._lock = threading.Lock()

    def take(self, file: tuple[int, int]) -> _Conn | None:
        """An idle connection to ``file``; the others (of a file gone) are closed."""
        stale: list[_Conn] = []
        found = None
        with self._lock:
            while self._idle:
                c = self._idle.pop()
                if c.file == file:
                    found = c
                    break
                stale.append(c)
        for c in stale:
            c.conn.close()
        return found

    def give(self, c: _Conn) -> None:
        if c.pid != os.getpid():
            _keep(c.conn)  # the parent's: never touch it
            return
        if c.conn.in_transaction:
            c.conn.close()
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(c)
                return
        c.conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            if c.pid == os.getpid():
                c.conn.close()
            else:
                _keep(c.conn)


def _code(e: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``e`` (Python 3.10 has no ``sqlite_errorcode``)."""
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(e).lower()
    for words, found in (
        ("not a database", _NOTADB),
        ("malformed", _CORRUPT),
        ("readonly", _READONLY),
        ("locked", _BUSY),
        ("busy", _BUSY),
        ("disk is full", _FULL),
        ("unable to open", _CANTOPEN),
        ("disk i/o error", _IOERR),
    ):
        if words in text:
            return found
    return None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ascii_lower(name: str) -> str:
    """A name as SQLite compares identifiers: ASCII letters folded, nothing else."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in name)


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"{what} must be a non-empty name without NUL, not {name!r}")
    if _ascii_lower(name).startswith("sqlite_"):
        raise ValueError(f"{what} {name!r}: names starting with sqlite_ are SQLite's own")


class SqliteSession:
    """One write transaction (``BEGIN IMMEDIATE``): the locked half of :class:`SqliteStorage`."""

    def __init__(self, storage: SqliteStorage, c: _Conn) -> None:
        self._storage = storage
        self._c = c
        self.changed = False

    def _usable(self) -> sqlite3.Connection:
        if os.getpid() != self._c.pid:
            raise LockCompromisedError(
                self._storage.location,
                "this process was forked inside a session: the write lock belongs to the "
                "parent's connection, so the child cannot read or write under it",
            )
        return self._c.conn

    def read(self) -> bytes | None:
        conn = self._usable()
        return self._storage._select(conn, StateReadError, "reading under the lock")

    def write(self, data: bytes) -> None:
        s = self._storage
        s._check_size(data)
        self._change(s._upsert, (s.key, data, time.time()), "saving")

    def backup_location(self, label: str) -> str:
        return self._storage.backup_location(label)

    def backup(self, label: str, data: bytes) -> str:
        s = self._storage
        # Inserted only if absent: a backup keeps the first original of that version.
        self._change(s._insert_backup, (s.key, label, data, time.time()), "keeping a backup")
        return self.backup_location(label)

    def _change(self, query: str, params: tuple[object, ...], what: str) -> None:
        conn = self._usable()
        try:
            conn.execute(query, params)
        except sqlite3.Error as e:
            raise self._storage._error(e, StateWriteError, what) from e
        self.changed = True


class SqliteStorage:
    """One document, under ``key``, in a SQLite database file at ``path``.

    ``table`` holds the documents, ``backup_table`` (default ``<table>_backups``)
    the backups migrations keep; both are created by the first write. ``durable``
    (the default) commits with ``synchronous=FULL``, ``durable=False`` with
    ``NORMAL``. ``max_size``: the largest document read or written (bytes). Up
    to ``max_idle`` connections are kept open between uses, shared by threads.

    >>> SqliteStorage("/srv/app/state.db", key="settings").location
    '/srv/app/state.db#statestore_documents/settings'
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: str,
        table: str = DEFAULT_TABLE,
        backup_table: str | None = None,
        durable: bool = True,
        max_size: int = DEFAULT_MAX_SIZE,
        max_idle: int = 4,
    ) -> None:
        if not isinstance(key, str) or not key or "\0" in key:
            raise ValueError(f"key must be a non-empty string without NUL, not {key!r}")
        backup_table = f"{table}_backups" if backup_table is None else backup_table
        _check_name("table", table)
        _check_name("backup_table", backup_table)
        if _ascii_lower(table) == _ascii_lower(backup_table):
            raise ValueError("table and backup_table must be two tables")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive number of bytes, not {max_size!r}")
        if max_idle < 0:
            raise ValueError("max_idle must be at least 0")
        self.path = os.path.abspath(os.fspath(path))
        self.key = key
        self.table = table
        self.backup_table = backup_table
        self.durable = durable
        self.max_size = max_size
        folder, name = os.path.split(self.path)
        #: The database file with its folder resolved: one for every spelling of it.
        self.database = os.path.join(os.path.realpath(folder), name)
        self._identity = f"sqlite:{self.database}#{_ascii_lower(table)}/{key}"
        self._pool = _Pool(max_idle)
        weakref.finalize(self, self._pool.close)
        t, b = _quote(table), _quote(backup_table)
        self._read_sql = (
            f"SELECT length(CAST(document AS BLOB)), "
            f"CASE WHEN length(CAST(document AS BLOB)) <= ? THEN CAST(document AS BLOB) END "
            f"FROM {t} WHERE key = ?"
        )
        self._exists_sql = f"SELECT 1 FROM {t} WHERE key = ?"
        self._upsert = (
            f"INSERT INTO {t} (key, document, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET document = excluded.document, "
            "updated_at = excluded.updated_at"
        )
        self._insert_backup = (
            f"INSERT OR IGNORE INTO {b} (key, label, document, created_at) VALUES (?, ?, ?, ?)"
        )
        self._create = (
            f"CREATE TABLE IF NOT EXISTS {t} (key TEXT PRIMARY KEY NOT NULL, "
            "document BLOB NOT NULL, updated_at REAL NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {b} (key TEXT NOT NULL, label TEXT NOT NULL, "
            "document BLOB NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (key, label))",
        )

    # ------------------------------------------------------------------ Storage

    @property
    def location(self) -> str:
        """``<database path>#<table>/<key>``, for messages."""
        return f"{self.path}#{self.table}/{self.key}"

    @property
    def identity(self) -> str:
        """The row: the database file (folder resolved), the table (as SQLite
        compares names) and the key; equal for two storages of one document."""
        return self._identity

    @property
    def lock(self) -> None:
        """No lock object: each session takes SQLite's write lock itself."""
        return None

    def backup_location(self, label: str) -> str:
        return f"{self.path}#{self.backup_table}/{self.key}@{label}"

    def read(self) -> bytes | None:
        """The committed document, without the write lock (WAL: readers never wait
        for a writer). None when there is no database, table or row; never creates one."""
        c = self._connection(create=False)
        if c is None:
            return None
        try:
            return self._select(c.conn, StateReadError, "reading")
        finally:
            self._pool.give(c)

    def exists(self) -> bool:
        """Whether a document is stored under the key (the default does not count)."""
        c = self._connection(create=False)
        if c is None:
            return False
        try:
            return c.conn.execute(self._exists_sql, (self.key,)).fetchone() is not None
        except sqlite3.Error as e:
            if "no such table" in str(e):
                return False
            raise self._error(e, StateReadError, "looking for the document") from e
        finally:
            self._pool.give(c)

    @contextmanager
    def session(self, timeout: float) -> Iterator[SqliteSession]:
        """A write transaction (``BEGIN IMMEDIATE``), waiting at most ``timeout``
        seconds for the lock; committed on normal exit, else rolled back."""
        deadline = time.monotonic() + timeout if math.isfinite(timeout) else math.inf
        gate = _gate(self.database)
        me = threading.current_thread()  # an object, never reused as an ident can be
        if gate.holder is me:
            raise NestedTransactionError(
                self.location,
                "a session of a document of this database inside another one in the same "
                "thread would wait for itself (SQLite has one write lock per database "
                "file). Change the document outside the other transaction, or keep the two "
                "documents in two databases",
            )
        if not gate.lock.acquire(timeout=max(timeout, 0) if math.isfinite(timeout) else -1):
            raise LockTimeout(
                self.location,
                f"could not acquire the database's write lock within {timeout:g} s: other "
                f"threads of this process (pid {os.getpid()}) held it or were ahead in the "
                "queue",
                timeout=timeout,
                holder={"pid": os.getpid()},
                alive=True,
            )
        gate.holder = me
        c: _Conn | None = None
        try:
            c = self._connection(create=True)
            assert c is not None
            self._begin(c, deadline, timeout)
            session = SqliteSession(self, c)
            try:
                yield session
            except BaseException:
                self._end(c, commit=False)
                raise
            self._end(c, commit=session.changed)
        finally:
            if gate.holder is me:
                gate.holder = None
            gate.lock.release()
            if c is not None:
                self._pool.give(c)

    def async_session(self, timeout: float) -> AbstractAsyncContextManager[SqliteSession]:
        """:meth:`session` for asyncio: each blocking step on a worker thread."""
        from .._async import threaded_session  # asyncio only for programs that use it

        return threaded_session(self.session, self.identity, self.location, timeout)

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the idle connections (the storage opens new ones if used later)."""
        self._pool.close()

    def __enter__(self) -> SqliteStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteStorage({self.location!r})"

    # ---------------------------------------------------------------- internals

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.max_size:
            raise StateWriteError(
                self.location,
                f"could not save: the new state is {len(data)} bytes, more than the "
                f"storage's limit of {self.max_size} bytes (max_size), so it could not be "
                "read again; give the storage a larger max_size. The stored document is "
                "unchanged.",
                errno=errno.EFBIG,
            )

    def _select(
        self, conn: sqlite3.Connection, error: type[StateReadError | StateWriteError], what: str
    ) -> bytes | None:
        try:
            row = conn.execute(self._read_sql, (self.max_size, self.key)).fetchone()
        except sqlite3.Error as e:
            if "no such table" in str(e):
                return None  # nothing was ever saved to this database
            raise self._error(e, error, what) from e
        if row is None:
            return None
        size, data = row
        if data is None:
            raise StateReadError(
                self.location,
                f"the stored document is {size} bytes, more than the storage's limit of "
                f"{self.max_size} bytes (max_size); nothing more was read. If it is really "
                "this large, give the storage a larger max_size",
                errno=errno.EFBIG,
            )
        return bytes(data)

    def _refuse(self, path: str, problem: str, code: int) -> StateReadError:
        return StateReadError(
            path,
            f"{problem}; statestore opens only a regular file of this user with one name, "
            f"so nothing was opened or written. Move it away, or give SqliteStorage "
            "another path",
            errno=code,
        )

    def _inspect(self, path: str) -> os.stat_result | None:
        """``lstat`` of ``path`` if it is a file the module's rule lets SQLite open."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError as e:
            raise self._refuse(path, "has a file where a folder should be", errno.ENOTDIR) from e
        except OSError as e:
            raise StateReadError(
                path, f"cannot be examined ({e.strerror or e})", errno=e.errno
            ) from e
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            raise self._refuse(
                path,
                "is a symbolic link: SQLite keeps its -wal and -shm files beside the name it "
                "opens, and two names of one database would give it two write-ahead logs "
                "(which corrupts it). Give the storage the path the link points to",
                errno.ELOOP,
            )
        if not stat.S_ISREG(mode):
            kind = file_kind(mode)
            raise self._refuse(
                path,
                f"is {kind}, not a database file",
                errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL,
            )
        if st.st_uid != os.geteuid():
            raise self._refuse(
                path,
                f"is another user's file (uid {st.st_uid}; this process runs as uid "
                f"{os.geteuid()}); its owner could replace or read it at any time, and "
                "SQLite would give its own files this user's ownership",
                errno.EPERM,
            )
        if st.st_nlink > 1:
            raise self._refuse(
                path,
                f"has {st.st_nlink} names (hard links): SQLite keeps its -wal and -shm "
                "files beside the name it opens, and two names of one database would give "
                "it two write-ahead logs (which corrupts it)",
                errno.EMLINK,
            )
        return st

    def _companions(self) -> list[str]:
        """The companions present beside the database (each passing :meth:`_inspect`)."""
        return [self.path + suffix for suffix in COMPANIONS if self._inspect(self.path + suffix)]

    def _connection(self, *, create: bool) -> _Conn | None:
        """A connection to the file at the path (pooled, or new), checked by the rule;
        None when there is no database and ``create`` is false."""
        st = self._inspect(self.path)
        if st is None:
            if not create:
                return None
            st = self._create_file()
        file = (st.st_dev, st.st_ino)
        c = self._pool.take(file)
        if c is not None:
            return c
        self._companions()
        uri = "file:" + urllib.parse.quote(self.path) + "?mode=rw"
        error = StateWriteError if create else StateReadError
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=READ_BUSY,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=16,
            )
        except sqlite3.Error as e:
            raise self._error(e, error, "opening the database") from e
        try:
            after = self._inspect(self.path)
            if after is None or (after.st_dev, after.st_ino) != file:
                raise StateReadError(
                    self.path,
                    "was replaced while it was being opened; nothing was read or written. "
                    "Try again",
                    errno=errno.ESTALE,
                )
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e, error, "opening the database") from e
        except BaseException:
            conn.close()
            raise
        return _Conn(conn, file)

    def _create_file(self) -> os.stat_result:
        """Create the database file (``O_EXCL``, mode 0600), unless it appeared meanwhile."""
        left = self._companions()
        # Looked for again: another process may have created the database (and its
        # log) since this one found it missing; an orphan is a log with no database.
        if left and self._inspect(self.path) is None:
            raise StateWriteError(
                left[0],
                "is there, but the database it belongs to is not: a database was deleted "
                "and its SQLite files were left, and a new database must not take over "
                "another one's write-ahead log (it may hold its last commits). Restore the "
                "database, or move these files away; nothing was written",
                errno=errno.EEXIST,
            )
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(
                self.path,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                FILE_MODE,
            )
            os.close(fd)
        except FileExistsError:
            pass  # another process created it first: it is checked like any file
        except OSError as e:
            raise StateWriteError(
                self.path,
                f"could not create the database ({e.strerror or e}); check that the folder "
                "exists and that this user may write in it. Nothing was written",
                errno=e.errno,
            ) from e
        st = self._inspect(self.path)
        if st is None:
            raise StateWriteError(
                self.path, "vanished right after it was created; try again", errno=errno.ENOENT
            )
        return st

    def _begin(self, c: _Conn, deadline: float, timeout: float) -> None:
        """``BEGIN IMMEDIATE`` within ``deadline``, in WAL mode, with the tables there."""
        conn = c.conn
        try:
            conn.execute("PRAGMA busy_timeout = 0")  # waits are this loop's, below
            if not c.wal:  # once per connection
                self._retry(lambda: self._switch_to_wal(conn), deadline)
                c.wal = True
            self._retry(lambda: conn.execute("BEGIN IMMEDIATE"), deadline)
        except sqlite3.Error as e:
            if _code(e) in (_BUSY, _LOCKED):
                raise self._timeout(timeout) from e
            raise self._error(e, StateWriteError, "starting the write transaction") from e
        finally:
            with suppress(sqlite3.Error):
                conn.execute(f"PRAGMA busy_timeout = {int(READ_BUSY * 1000)}")
        try:
            for statement in self._create:
                conn.execute(statement)
        except BaseException as e:
            self._end(c, commit=False)
            if isinstance(e, sqlite3.Error):
                raise self._error(e, StateWriteError, "creating the tables") from e
            raise

    @staticmethod
    def _retry(step: Callable[[], object], deadline: float) -> None:
        """``step`` (``BEGIN IMMEDIATE``, the switch to WAL), tried again while SQLite
        says busy, until ``deadline``.

        Sleeps between tries, doubling from 0.1 ms up to :data:`POLL_CAP` (with
        jitter, so that waiting processes do not try in step): a wait costs about
        one failed try per sleep, and a lock given up is taken within
        ``POLL_CAP``, where SQLite's own busy handler sleeps up to 100 ms. SQLite
        also answers busy at once, without its handler, where waiting could
        deadlock (two connections of a database not yet in WAL mode both wanting
        its exclusive lock): a try after a sleep resolves that too.
        """
        delay = 0.0001
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as e:
                left = deadline - time.monotonic()
                if _code(e) not in (_BUSY, _LOCKED) or left <= 0:
                    raise
            time.sleep(min(delay * (0.5 + random.random()), left))
            delay = min(delay * 2, POLL_CAP)

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """WAL mode. A database not in it yet is first checked to be whole, unless
        it is new (no pages): switching rewrites its header."""
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        if mode and str(mode[0]).lower() == "wal":
            return
        pages = conn.execute("PRAGMA page_count").fetchone()
        if pages and pages[0]:
            found = conn.execute("PRAGMA quick_check").fetchone()
            if not found or found[0] != "ok":
                raise StateCorruptError(
                    self.path,
                    "the database is damaged (quick_check: "
                    f"{found[0] if found else 'no answer'}); it was not changed",
                    hint=f"restore it from a backup, or salvage it with: sqlite3 {self.path} "
                    ".recover",
                )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise StateWriteError(
                self.location,
                "SQLite could not switch the database to WAL mode (it stays in "
                f"{mode[0] if mode else 'an unknown'} mode; a file system without shared "
                "memory?); nothing was written",
            )

    def _end(self, c: _Conn, *, commit: bool) -> None:
        """Commit (when something changed) or roll back the session's transaction."""
        if c.pid != os.getpid():
            if commit:
                raise LockCompromisedError(
                    self.location,
                    "this process was forked inside a session: the write lock belongs to "
                    "the parent's connection, so the child cannot commit under it",
                )
            return  # the parent's transaction: never touch it
        conn = c.conn
        if not commit:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                conn.close()  # closing rolls back; the pool drops a closed connection
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            code = _code(e)
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                conn.close()
            if code == _IOERR and getattr(e, "sqlite_errorcode", None) == _IOERR_WRITE:
                # The log's frames end with the commit frame, each checksummed: a write
                # that failed leaves no commit a later reader or a recovery would take.
                raise StateWriteError(
                    self.location,
                    f"committing failed: writing the write-ahead log failed ({e}). Nothing "
                    "was saved; the stored document is unchanged.",
                    errno=errno.EIO,
                ) from e
            if code == _IOERR:
                # The log may hold the commit frame, unsynced: either outcome is possible.
                raise DurabilityError(
                    self.location,
                    f"committing failed with an I/O error ({e}); whether the commit reached "
                    "the database could not be found out. The stored document is whole: "
                    "either the old one or the new one. load() it to see which before "
                    "running the update again",
                ) from e
            raise self._error(e, StateWriteError, "committing") from e

    def _error(
        self, e: sqlite3.Error, error: type[StateReadError | StateWriteError], what: str
    ) -> StateStoreError:
        """The typed error of SQLite's ``e`` while doing ``what``."""
        code = _code(e)
        nothing = (
            " Nothing was saved; the stored document is unchanged."
            if error is StateWriteError
            else ""
        )
        if code == _NOTADB:
            return StateReadError(
                self.path,
                f"is not a SQLite database ({e}); it was not changed. Give SqliteStorage "
                "the path of a database (or of a file that does not exist yet)",
                errno=errno.EINVAL,
            )
        if code == _CORRUPT:
            return StateCorruptError(
                self.path,
                f"the database is damaged ({e}) while {what}; it was not changed",
                hint=f"restore it from a backup, or salvage it with: sqlite3 {self.path} .recover",
            )
        if code == _READONLY:
            return error(
                self.location,
                f"{what} failed: the database is read-only for this process ({e}); check "
                "the mode of the database file and of its folder (SQLite keeps its -wal "
                "and -shm files there, and needs them to read a WAL database too)."
                f"{nothing}",
                errno=errno.EROFS,
            )
        if code == _FULL:
            return StateWriteError(
                self.location,
                f"{what} failed: the disk is full ({e}).{nothing}",
                errno=errno.ENOSPC,
            )
        if code == _CANTOPEN:
            return error(
                self.location,
                f"{what} failed: SQLite cannot open the database or its -wal/-shm files "
                f"({e}); check the permissions of the file and its folder.{nothing}",
            )
        if code in (_BUSY, _LOCKED):
            return error(
                self.location,
                f"{what} failed: the database stayed busy for {READ_BUSY:g} s ({e}).{nothing}",
            )
        return error(self.location, f"{what} failed ({e}).{nothing}")

    def _timeout(self, timeout: float) -> LockTimeout:
        """A LockTimeout naming the process that holds the write lock, if it can be seen."""
        pid = _write_lock_holder(self.path + "-shm")
        text = f"could not acquire the database's write lock within {timeout:g} s"
        if pid is None:
            return LockTimeout(
                self.location, text + " (the holder could not be identified)", timeout=timeout
            )
        return LockTimeout(
            self.location,
            f"{text}: process {pid} holds a write transaction on {self.path}; SQLite "
            "releases it when that process commits, rolls back or exits",
            timeout=timeout,
            holder={"pid": pid},
            alive=True,
        )


def _write_lock_holder(shm: str) -> int | None:
    """The pid holding SQLite's WAL write lock (a POSIX lock on a byte of ``-shm``),
    from ``/proc/locks``; None where that cannot be seen."""
    try:
        st = os.stat(shm)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: POSIX  ADVISORY  WRITE 4242 08:01:1234 120 120" (a "->" marks a waiter).
        if len(parts) < 8 or parts[1] != "POSIX":
            continue
        try:
            pid, where, start, end = int(parts[4]), parts[5], int(parts[6]), parts[7]
        except ValueError:
            continue
        last = math.inf if end == "EOF" else int(end)
        if where == want and start <= _WAL_WRITE_LOCK_BYTE <= last and parts[3] == "WRITE":
            return pid
    return None
