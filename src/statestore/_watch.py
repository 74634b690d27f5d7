"""Waiting for a change of one file path, from any process.

:class:`FileWatcher` wakes its caller when the file at a path *may* have
changed: written by any process, replaced by a rename, created, deleted, edited
in place, or saved by an editor that renames the old file aside (vim's
``name~``). A wake-up says only that; the caller re-reads and compares. So the
rules are:

* **Never miss a change.** A change that happens while nobody waits, between
  two ``wait()`` calls, is queued and reported by the next ``wait()`` at once
  (the kernel queues inotify events; the poll keeps the state seen at the end
  of the last wait and compares against it, never against a fresh look).
* **Spurious wake-ups are allowed, and coalesced.** Many events queued since
  the last wait give one ``True``; events that do not concern the path (other
  names in the folder) give none. After an overflow of the kernel's queue, after
  a fork, or when the folder itself goes away, the next wait returns ``True``.
* **No CPU while nothing changes** on the inotify path: the waiting thread
  sleeps in ``select`` on the inotify descriptor and a wake-up pipe.

Mechanism. On Linux, inotify through ``ctypes`` (no extra dependency): one
watch on the *parent folder* of the path (and on the folder of each file a
symbolic link at the path leads to), filtered by name, for ``IN_CLOSE_WRITE``,
``IN_MODIFY``, ``IN_MOVED_TO``, ``IN_MOVED_FROM``, ``IN_CREATE``, ``IN_DELETE``
and ``IN_ATTRIB``. Watching the folder, not the file, is what sees a file
replaced by a rename (the file's own watch would follow the old inode).
If the folder is deleted or moved (``IN_DELETE_SELF``, ``IN_MOVE_SELF``,
``IN_IGNORED``, ``IN_UNMOUNT``), the watcher reports a change and polls from
then on.

Elsewhere, when the folder is on a network or FUSE file system (where inotify
sees only this machine's own writes), when the folder does not exist yet, or
when inotify is unavailable or exhausted (``ENOSPC``: the user's
``fs.inotify.max_user_watches``; ``EMFILE``: ``max_user_instances`` or the
process's descriptors), the watcher polls ``stat`` every :data:`POLL_INTERVAL`
seconds, comparing device, inode, size, modification and change times (and a
symbolic link's own ones). ``backend="poll"`` or the environment variable
``STATESTORE_WATCH_BACKEND=poll`` forces the poll. A poll costs a ``stat`` per
interval, and can miss a rewrite that keeps the same inode, size and
timestamps within one tick of a coarse clock (the limits are in
``docs/watching.md``).

The seam. A store does not know which watcher it has: it asks its storage
(``storage.watcher()``) for an object of the :class:`Watcher` shape, the
file storage for a :class:`FileWatcher`, the PostgreSQL storage for a
``PostgresWatcher`` (``LISTEN``/``NOTIFY`` and a slow poll of the row). Every
watcher keeps the rules above: a wake-up means "may have changed", nothing is
missed between two waits, ``close()`` from any thread ends a blocked wait.

Threads and processes. ``close()`` may be called from any thread: it wakes a
blocked ``wait()``, which then returns ``False``; a ``wait()`` after ``close()``
raises :class:`StateReadError` (``EBADF``). A forked child never shares its parent's
inotify queue (reading it would steal the parent's events): its first use
reopens the watch, and that first ``wait()`` returns ``True``. Descriptors are
close-on-exec.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import io
import os
import select
import struct
import sys
import threading
import time
import weakref
from typing import Final, Literal, Protocol

from typing_extensions import Self

from ._errors import StateReadError

__all__ = [
    "POLL_INTERVAL",
    "FileWatcher",
    "Watcher",
    "WatcherBase",
    "readable",
    "wait_async",
]

#: Seconds between two looks of the stat poll (a change is seen within this).
POLL_INTERVAL: Final = 0.05

Backend = Literal["auto", "inotify", "poll"]

_IN_MODIFY: Final = 0x2
_IN_ATTRIB: Final = 0x4
_IN_CLOSE_WRITE: Final = 0x8
_IN_MOVED_FROM: Final = 0x40
_IN_MOVED_TO: Final = 0x80
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_DELETE_SELF: Final = 0x400
_IN_MOVE_SELF: Final = 0x800
_IN_UNMOUNT: Final = 0x2000
_IN_Q_OVERFLOW: Final = 0x4000
_IN_IGNORED: Final = 0x8000
_IN_ONLYDIR: Final = 0x01000000
_IN_NAMED: Final = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
)
_IN_GONE: Final = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_IGNORED
_EVENT: Final = struct.Struct("iIII")

#: File systems whose changes by other machines inotify does not see: polled.
_REMOTE_FS: Final = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "afs",
        "gpfs",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
    }
)


class Watcher(Protocol):
    """What ``store.watch()`` waits on; a storage's ``watcher()`` makes one."""

    @property
    def closed(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the document may have changed since the last wait (True), the
        timeout passes or another thread closes the watcher (False)."""
        ...

    async def wait_async(self, timeout: float | None = None) -> bool:
        """:meth:`wait` for asyncio, without blocking the event loop."""
        ...

    def close(self) -> None:
        """Stop watching, from any thread."""
        ...


class _Libc:
    def __init__(self) -> None:
        # The process's own symbols include libc's (no file is opened, unlike
        # ctypes.util.find_library, which runs programs).
        lib = ctypes.CDLL(None, use_errno=True)
        self.init1 = lib.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add = lib.inotify_add_watch
        self.add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add.restype = ctypes.c_int
        self.rm = lib.inotify_rm_watch
        self.rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm.restype = ctypes.c_int


def _load() -> _Libc | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):  # pragma: no cover - a libc without inotify
        return None


_libc: Final = _load()


def _inotify() -> _Libc:
    if _libc is None:
        raise OSError(errno.ENOSYS, "inotify is not available on this system")
    return _libc


def _fs_type(folder: str) -> str | None:
    """The file system type of the mount holding ``folder`` (Linux), or None."""
    try:
        real = os.path.realpath(folder)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        after = line.split(" - ", 1)[1].split()
        if not after:
            continue
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), after[0]
    return kind


def _remote(folder: str) -> bool:
    kind = _fs_type(folder)
    return kind is not None and (kind in _REMOTE_FS or kind.startswith("fuse"))


def _chain(path: str) -> list[str]:
    """``path`` and every file a symbolic link there leads to (at most 40 links)."""
    found = [path]
    for _ in range(40):
        try:
            link = os.readlink(found[-1])
        except OSError:
            break
        found.append(os.path.join(os.path.dirname(found[-1]), link))
    return found


def _signature(path: str) -> tuple[object, ...]:
    """What the poll compares: each link's and the final file's identity and times."""
    parts: list[object] = []
    for name in _chain(path):
        try:
            st = os.lstat(name)
        except OSError as e:
            parts.append(e.errno)
            continue
        parts.append((st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(parts)


_live: weakref.WeakSet[FileWatcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for watcher in list(_live):
        watcher._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class WatcherBase:
    """What every watcher's ``close()`` and waits share: closing wakes a wait blocked
    in another thread through the watcher's wake-up pipe, and the last waiter to
    leave releases what the watcher holds (``_release``)."""

    _lock: threading.Lock
    _closed: bool
    _waiting: int
    _wake_w: int
    _pid: int

    def close(self) -> None:
        """Stop watching; a ``wait()`` blocked in another thread returns False."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._waiting:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")
                return  # the last waiter releases what the watcher holds
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(Exception):
                self.close()

    def _leave(self) -> None:
        with self._lock:
            self._waiting -= 1
            release = self._closed and self._waiting == 0
        if release:
            self._release()

    def _release(self) -> None:
        raise NotImplementedError


class FileWatcher(WatcherBase):
    """Wait for changes of the file at ``path`` (see the module's rules)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: Backend | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        chosen = backend or os.environ.get("STATESTORE_WATCH_BACKEND") or "auto"
        if chosen not in ("auto", "inotify", "poll"):
            raise ValueError(f"backend must be 'auto', 'inotify' or 'poll', not {chosen!r}")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._wanted: str = chosen
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._closed = False
        self._waiting = 0
        self._pid = os.getpid()
        self._fd = -1  # the inotify descriptor, or -1 when polling
        self._wds: dict[int, str] = {}  # watch descriptor -> folder
        self._names: dict[str, set[str]] = {}  # folder -> names of interest there
        self._pending = False  # a change seen and not yet reported
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._why_poll: str | None = None
        self._open()
        self._seen = _signature(self.path)
        _live.add(self)

    # -- setting up -------------------------------------------------------

    def _open(self) -> None:
        if self._wanted == "poll":
            self._why_poll = "asked for"
            return
        try:
            self._open_inotify()
        except OSError as e:
            if self._wanted == "inotify":
                raise StateReadError(
                    self.path,
                    f"cannot watch with inotify ({e.strerror or e}); use backend='poll' "
                    "or 'auto'. ENOSPC: raise fs.inotify.max_user_watches; EMFILE: raise "
                    "fs.inotify.max_user_instances or close descriptors",
                    errno=e.errno,
                ) from e
            self._to_poll(e.strerror or str(e))

    def _open_inotify(self) -> None:
        lib = _inotify()
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise OSError(errno.ENOENT, "the folder does not exist", folder)
        if _remote(folder):
            raise OSError(
                errno.EOPNOTSUPP,
                "on a network or FUSE file system inotify sees only this machine's writes",
            )
        fd = lib.init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self._fd = fd
        try:
            self._arm()
        except OSError:
            os.close(fd)
            self._fd = -1
            self._wds.clear()
            self._names.clear()
            raise

    def _arm(self) -> None:
        """Watch the folder of the path and of each file its links lead to."""
        lib = _inotify()
        wanted: dict[str, set[str]] = {}
        for name in _chain(self.path):
            wanted.setdefault(os.path.dirname(name), set()).add(os.path.basename(name))
        main = os.path.dirname(self.path)
        have = {folder: wd for wd, folder in self._wds.items()}
        for folder in wanted:
            if folder in have:
                continue
            mask = _IN_NAMED | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
            wd = lib.add(self._fd, os.fsencode(folder), mask)
            if wd < 0:
                code = ctypes.get_errno()
                if folder == main or code in (errno.ENOSPC, errno.EMFILE):
                    raise OSError(code, os.strerror(code), folder)
                continue  # a link into a folder that is not there: the link's name is watched
            self._wds[wd] = folder
        for folder, wd in have.items():
            if folder not in wanted and folder != main:
                lib.rm(self._fd, wd)
                del self._wds[wd]
        self._names = wanted

    def _to_poll(self, why: str) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._wds.clear()
        self._names.clear()
        self._why_poll = why

    def _forked(self) -> None:
        """In a forked child: fresh lock, fresh descriptors, report a change once."""
        self._lock = threading.Lock()
        self._waiting = 0
        self._reopen_in_child()

    def _reopen_in_child(self) -> None:
        self._pid = os.getpid()
        if self._closed:
            return
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = -1
        self._wds.clear()
        self._names.clear()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._why_poll = None
        self._open()
        self._seen = _signature(self.path)
        self._pending = True  # what happened between the fork and now is unknown

    # -- public -----------------------------------------------------------

    @property
    def backend(self) -> Literal["inotify", "poll"]:
        """The mechanism in use now ("poll" after a fall-back)."""
        return "inotify" if self._fd >= 0 else "poll"

    @property
    def poll_reason(self) -> str | None:
        """Why the watcher polls (None when it uses inotify)."""
        return None if self._fd >= 0 else self._why_poll

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The inotify descriptor: readable when ``wait(0)`` may return True.

        A polling watcher has none (``io.UnsupportedOperation``): call ``wait(0)``
        every ``poll_interval`` seconds instead. The descriptor may change after a
        fork or a fall-back to the poll.
        """
        self._check()
        if self._fd < 0:
            raise io.UnsupportedOperation(f"{self.path}: the watcher polls; there is no descriptor")
        return self._fd

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the file may have changed since the last wait (True), the
        timeout passes (False) or another thread closes the watcher (False)."""
        self._enter()
        try:
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
            while True:
                if self._collect():
                    return True
                if self._closed:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._fd >= 0:
                    ready, _, _ = select.select([self._fd, self._wake_r], [], [], left)
                else:
                    step = self.poll_interval if left is None else min(left, self.poll_interval)
                    ready, _, _ = select.select([self._wake_r], [], [], step)
                if self._wake_r in ready:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 512)
        finally:
            self._leave()

    async def wait_async(self, timeout: float | None = None) -> bool:
        """:meth:`wait` for asyncio (:func:`wait_async`)."""
        return await wait_async(self, timeout)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.backend
        return f"<FileWatcher {self.path!r} {state}>"

    # -- inside -----------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise StateReadError(
                self.path, "the watcher is closed; make a new one", errno=errno.EBADF
            )
        if self._pid != os.getpid():  # forked without the at-fork hook (os.fork is covered)
            self._reopen_in_child()

    def _enter(self) -> None:
        with self._lock:
            self._check()
            self._waiting += 1

    def _release(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1
        self._wds.clear()
        _live.discard(self)

    def _collect(self) -> bool:
        """Take in what happened (without blocking); True if a change is to report."""
        with self._lock:
            if self._closed:
                return False
            if self._fd >= 0:
                self._read_events()
            if self._fd < 0:  # polling (maybe just fallen back)
                now = _signature(self.path)
                if now != self._seen:
                    self._seen = now
                    self._pending = True
            changed, self._pending = self._pending, False
            return changed

    def _read_events(self) -> None:
        rearm = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                self._pending = True
                self._to_poll(f"reading inotify failed: {e.strerror or e}")
                return
            if not data:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + size]
                offset += _EVENT.size + size
                name = os.fsdecode(raw.split(b"\0", 1)[0])
                if mask & _IN_Q_OVERFLOW:
                    self._pending = True
                    continue
                folder = self._wds.get(wd)
                if folder is None:
                    continue
                if mask & _IN_GONE:
                    self._pending = True
                    if folder == os.path.dirname(self.path):
                        self._to_poll("the folder was deleted or moved")
                        self._seen = _signature(self.path)
                        return
                    self._wds.pop(wd, None)
                    rearm = True
                    continue
                if name in self._names.get(folder, ()):
                    self._pending = True
                    rearm = True  # a link may now lead elsewhere
        if rearm:
            try:
                self._arm()
            except OSError as e:
                self._to_poll(f"re-watching failed: {e.strerror or e}")
                self._seen = _signature(self.path)


async def wait_async(watcher: FileWatcher, timeout: float | None = None) -> bool:
    """``watcher.wait(timeout)`` for asyncio: the loop watches the inotify
    descriptor (``loop.add_reader``), or sleeps between polls; ``close()`` from
    any thread ends it with False."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + max(timeout, 0.0)
    watcher._enter()
    try:
        while True:
            if watcher._collect():
                return True
            if watcher._closed:
                return False
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            fds = [watcher._wake_r] + ([watcher._fd] if watcher._fd >= 0 else [])
            if watcher._fd < 0:
                left = watcher.poll_interval if left is None else min(left, watcher.poll_interval)
            await readable(fds, left)
            with contextlib.suppress(OSError):
                os.read(watcher._wake_r, 512)
    finally:
        watcher._leave()


async def readable(fds: list[int], timeout: float | None) -> None:
    """Return when one of ``fds`` is readable, or after ``timeout`` seconds (None:
    no limit), without blocking the event loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake(f: asyncio.Future[None] = ready) -> None:
        if not f.done():
            f.set_result(None)

    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), timeout)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
