"""Prompt, first-come-first-served hand-off between waiters on one host.

The lock directory stays the only source of truth (``mkdir`` decides who
holds the lock); this module only decides *when* a waiter tries again. Each
waiter on this host makes a named pipe in a queue folder under the user's
runtime directory (never in the state folder), named by the monotonic clock
at which it started waiting. A releaser writes one byte into the oldest
waiter's pipe; the waiter, blocked in ``poll`` on it, wakes at once instead of
sleeping through the lock's free time. A new acquirer that finds waiters
queued joins the end of the queue rather than barging in, so the lock is
shared in turn instead of being handed back and forth inside one process.

A waiter keeps its own pipe open read-write: while it lives, the pipe has a
reader; once it dies, opening the pipe for writing fails with ``ENXIO`` and
the entry is pruned by whoever notices. Waiters that are woken late, or never
(a holder killed with SIGKILL releases nothing), still poll the lock with a
capped timeout, so the queue can delay nobody by more than that cap.

A queue folder exists only while somebody waits: the waiter that leaves last
(or the releaser that prunes the last dead entry) removes it with ``rmdir``,
which removes nothing but an empty folder, and a joiner that finds it gone
makes it again. Only the library's own names are ever removed (the waiter's
own pipe, a pipe whose reader is gone, the empty folder): never a recursive
delete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import select
import stat
import tempfile
import time

__all__ = ["WaitQueue"]


_roots: dict[tuple[int, str | None], str | None] = {}


def _runtime_root() -> str | None:
    """A private folder for this user's queues, or None when none is safe to use."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    where = (uid, os.environ.get("XDG_RUNTIME_DIR"))
    if where not in _roots:
        _roots.clear()
        _roots[where] = _make_root(uid)
    return _roots[where]


def _make_root(uid: int) -> str | None:
    # A memory file system when there is one: joining and leaving the queue are
    # file-system operations on every contended acquire, and on a disk they would
    # queue behind the journal commits of everybody's fsyncs.
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        root = os.path.join(base, "statestore")
    elif os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        root = os.path.join("/dev/shm", f"statestore-{uid}")
    else:
        root = os.path.join(tempfile.gettempdir(), f"statestore-{uid}")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.lstat(root)
    except OSError:
        return None
    # Someone else's folder (or a link) in a shared /tmp: do not use it.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None
    return root


class WaitQueue:
    """The queue of waiters on this host for one lock path."""

    def __init__(self, lock_path: str) -> None:
        self._dir: str | None = None
        self._lock_path = lock_path
        self._resolved = False

    def _folder(self) -> str | None:
        """Where this path's queue lives (made by :meth:`join`, not here)."""
        if not self._resolved:
            root = _runtime_root() if hasattr(os, "mkfifo") else None
            if root is not None:
                key = hashlib.sha256(self._lock_path.encode()).hexdigest()[:32]
                self._dir = os.path.join(root, key)
            self._resolved = True
        return self._dir

    def tidy(self) -> None:
        """Remove the queue folder if nobody waits in it any more (``rmdir``: only if empty)."""
        folder = self._folder()
        if folder is not None:
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def _entries(self) -> list[str]:
        folder = self._folder()
        if folder is None:
            return []
        try:
            return sorted(e for e in os.listdir(folder) if e.startswith("w"))
        except OSError:
            return []

    def has_waiters(self) -> bool:
        return bool(self._entries())

    def join(self) -> Ticket | None:
        """Enter the queue; None when this platform or folder cannot host one."""
        folder = self._folder()
        if folder is None:
            return None
        name = f"w{time.monotonic_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(folder, name)
        for _ in range(3):  # the last waiter to leave may remove the folder meanwhile
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(folder, 0o700)
                os.mkfifo(path, 0o600)
                break
            except FileNotFoundError:
                # The folder went (the last waiter left), or the root did: look again.
                _roots.clear()
                self._resolved = False
                folder = self._folder()
                if folder is None:
                    return None
                path = os.path.join(folder, name)
            except OSError:
                return None
        else:
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            self.tidy()
            return None
        return Ticket(self, name, path, fd)

    def _open_writer(self, name: str) -> int | None:
        """Open a waiter's pipe for writing; None when it is gone (its entry is pruned)."""
        folder = self._folder()
        assert folder is not None
        path = os.path.join(folder, name)
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no reader: the waiter died
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return None

    def _signal(self, name: str) -> bool:
        """Wake one waiter; False when it is gone."""
        fd = self._open_writer(name)
        if fd is None:
            return False
        try:
            os.write(fd, b"!")
        except BlockingIOError:
            pass  # its pipe is full of wake-ups already
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        return True

    def _alive(self, name: str) -> bool:
        fd = self._open_writer(name)
        if fd is None:
            return False
        with contextlib.suppress(OSError):
            os.close(fd)
        return True

    def wake_first(self) -> None:
        """Wake the oldest live waiter (called right after the lock is released)."""
        names = self._entries()
        for name in names:
            if self._signal(name):
                return
        if names:  # only dead entries, now pruned
            self.tidy()


class Ticket:
    """One waiter's place in the queue."""

    def __init__(self, queue: WaitQueue, name: str, path: str, fd: int) -> None:
        self._queue = queue
        self.name = name
        self._path = path
        self._fd = fd

    def is_first(self) -> bool:
        """Whether every waiter ahead of us has gone (dead entries are pruned)."""
        for name in self._queue._entries():
            if name == self.name:
                return True
            if self._queue._alive(name):
                return False
        return True  # our entry vanished (cleaned up by hand): act as first

    def wait(self, timeout: float) -> bool:
        """Block until woken or ``timeout`` seconds pass; True when woken."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        try:
            events = poller.poll(max(0, int(timeout * 1000)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            events = []
        if not events:
            return False
        with contextlib.suppress(OSError):
            os.read(self._fd, 512)  # drain
        return True

    def leave(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._queue.tidy()  # the last one out removes the (then empty) folder
