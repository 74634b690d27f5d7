"""Fault injection and recording for the file system calls statestore makes.

Everything here goes through the real code path: the functions of the ``os``
module (and the builtin ``open`` as seen by statestore's own modules) are
wrapped in place, so ``statestore._atomic`` and ``statestore._lock`` call the
wrappers exactly where they would call the kernel.

* :class:`Countdown` makes the Nth call fail with a chosen errno.
* :class:`Recorder` keeps a trace of the calls that change a folder, and
  :func:`crash_outcomes` replays such a trace on a model of a file system that
  may lose anything not yet synced, to list what a power loss could leave.
* :func:`crash_server` is the fork server of the kill -9 test.
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

#: ``os`` functions that touch the file system (``os.makedirs`` and ``os.path``
#: go through ``os.mkdir`` / ``os.stat`` / ``os.lstat``, so they are covered).
OS_FUNCTIONS = (
    "open",
    "read",
    "write",
    "fsync",
    "fdatasync",
    "close",
    "replace",
    "rename",
    "unlink",
    "remove",
    "rmdir",
    "mkdir",
    "fchmod",
    "chmod",
    "stat",
    "lstat",
    "fstat",
    "listdir",
    "scandir",
    "readlink",
    "mkfifo",
    "utime",
    "link",
    "symlink",
)
#: statestore modules that call the builtin ``open`` (reading the state file,
#: the lock's owner record, /proc).
OPEN_USERS = (
    "statestore._atomic",
    "statestore._lock.liveness",
    "statestore._lock.record",
    "statestore._lock.handoff",
)


class Interposer:
    """Wraps the file system functions; :meth:`call` sees every call made while active.

    Only calls from the thread that activated it are seen (the heartbeat thread
    of a held lock keeps running undisturbed).
    """

    def __init__(self) -> None:
        self._thread: int | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in OS_FUNCTIONS:
            real = getattr(os, name, None)
            if real is not None:
                monkeypatch.setattr(os, name, self._wrap(name, real))
        journal = sys.modules.get("statestore._folder_journal")
        if journal is not None:  # renameat2(RENAME_EXCHANGE), made through ctypes, not os
            monkeypatch.setattr(journal, "_exchange", self._wrap("exchange", journal._exchange))
        import builtins

        for module in OPEN_USERS:
            monkeypatch.setattr(
                sys.modules[module],
                "open",
                self._wrap("builtin-open", builtins.open),
                raising=False,
            )

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._thread is not None and threading.get_ident() == self._thread:
                self._thread = None  # calls made by the hook itself are not counted
                try:
                    return self.call(name, real, args, kwargs)
                finally:
                    self._thread = threading.get_ident()
            return real(*args, **kwargs)

        wrapper.__wrapped__ = real  # type: ignore[attr-defined]
        return wrapper

    @contextmanager
    def active(self) -> Iterator[None]:
        self._thread = threading.get_ident()
        try:
            yield
        finally:
            self._thread = None

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return real(*args, **kwargs)


class Countdown(Interposer):
    """Count the calls; the ``fail_at``-th one fails with ``code`` (1-based, 0: none)."""

    def __init__(self, code: int = errno.EIO) -> None:
        super().__init__()
        self.code = code
        self.fail_at = 0
        self.count = 0
        self.calls: list[str] = []
        self.fired: str | None = None

    def arm(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.count = 0
        self.calls = []
        self.fired = None

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.count += 1
        self.calls.append(name)
        if self.count != self.fail_at:
            return real(*args, **kwargs)
        self.fired = f"{name}{_short(args)}"
        if name == "close":
            # Linux releases the descriptor even when close() reports an error.
            real(*args, **kwargs)
        raise OSError(self.code, os.strerror(self.code))


def _short(args: tuple[Any, ...]) -> str:
    parts = []
    for a in args:
        if isinstance(a, (bytes, bytearray, memoryview)):
            parts.append(f"<{len(a)} bytes>")
        else:
            parts.append(repr(a))
    return "(" + ", ".join(parts) + ")"


# --------------------------------------------------------------- power-loss model


@dataclass(frozen=True)
class Op:
    """One recorded operation on the watched folder.

    kind: "create" (name, ino), "write" (ino, offset, data), "fsync" (ino),
    "fsync-dir", "rename" (name -> target), "exchange" (name <-> target), "unlink" (name).
    """

    kind: str
    name: str = ""
    target: str = ""
    ino: int = 0
    offset: int = 0
    data: bytes = b""


class Recorder(Interposer):
    """Record what a save does to the files directly in ``folder``.

    Files are identified by model inode numbers; the real file descriptors are
    mapped to them as they are opened.
    """

    def __init__(self, folder: str, ignore_prefix: str) -> None:
        super().__init__()
        self.folder = os.path.realpath(folder)
        self.ignore_prefix = ignore_prefix
        self.ops: list[Op] = []
        self.names: dict[str, int] = {}  # the model's view of the folder right now
        self.fds: dict[int, tuple[str, int]] = {}  # fd -> ("file", ino) / ("dir", 0)
        self.offsets: dict[int, int] = {}
        self._next_ino = 1
        self.ignored: list[str] = []

    def start(self, existing: Iterable[str]) -> dict[str, int]:
        """Give the files already there their inodes; returns the initial name -> ino."""
        for name in sorted(existing):
            self.names[name] = self._new_ino()
        return dict(self.names)

    def _new_ino(self) -> int:
        self._next_ino += 1
        return self._next_ino

    def _watched(self, path: Any, kwargs: dict[str, Any]) -> str | None:
        """The name inside the folder that ``path`` is, or None when it is elsewhere."""
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
            return None
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None
        full = os.path.abspath(os.fsdecode(path))
        full = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        if full == self.folder:
            return "."
        if os.path.dirname(full) != self.folder:
            return None
        name = os.path.basename(full)
        if name.startswith(self.ignore_prefix):  # the lock directory: not a document
            return None
        return name

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if name == "open":
            where = self._watched(args[0], kwargs)
            flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
            fd = real(*args, **kwargs)
            if where == ".":
                self.fds[fd] = ("dir", 0)
            elif where is not None:
                if flags & os.O_TRUNC:
                    raise AssertionError("the model has no O_TRUNC: extend it first")
                if where not in self.names:
                    if not flags & os.O_CREAT:  # pragma: no cover - open of a missing file
                        return fd
                    ino = self._new_ino()
                    self.names[where] = ino
                    self.ops.append(Op("create", name=where, ino=ino))
                self.fds[fd] = ("file", self.names[where])
                self.offsets[fd] = 0
            return fd
        if name == "write":
            fd, data = args[0], bytes(args[1])
            written: int = real(*args, **kwargs)
            if fd in self.fds and self.fds[fd][0] == "file":
                ino = self.fds[fd][1]
                self.ops.append(Op("write", ino=ino, offset=self.offsets[fd], data=data[:written]))
                self.offsets[fd] += written
            return written
        if name in ("fsync", "fdatasync"):
            fd = args[0]
            result = real(*args, **kwargs)
            if fd in self.fds:
                kind, ino = self.fds[fd]
                self.ops.append(Op("fsync-dir") if kind == "dir" else Op("fsync", ino=ino))
            return result
        if name == "close":
            self.fds.pop(args[0], None)
            self.offsets.pop(args[0], None)
            return real(*args, **kwargs)
        if name in ("replace", "rename"):
            src = self._watched(args[0], kwargs)
            dst = self._watched(args[1], {"dir_fd": kwargs.get("dst_dir_fd")})
            result = real(*args, **kwargs)
            if src is not None and dst is not None and src != ".":
                self.names[dst] = self.names.pop(src)
                self.ops.append(Op("rename", name=src, target=dst))
            elif (src is None) != (dst is None):
                self.ignored.append(f"{name}{_short(args)}")
            return result
        if name == "exchange":
            src, dst = self._watched(args[0], {}), self._watched(args[1], {})
            swapped = real(*args, **kwargs)
            if swapped and src is not None and dst is not None:
                self.names[src], self.names[dst] = self.names[dst], self.names[src]
                self.ops.append(Op("exchange", name=src, target=dst))
            elif swapped:
                self.ignored.append(f"{name}{_short(args)}")
            return swapped
        if name in ("unlink", "remove"):
            where = self._watched(args[0], kwargs)
            result = real(*args, **kwargs)
            if where is not None and where != ".":
                self.names.pop(where, None)
                self.ops.append(Op("unlink", name=where))
            return result
        if name in ("link", "symlink", "mkdir", "rmdir", "mkfifo"):
            where = self._watched(args[-1] if name in ("link", "symlink") else args[0], kwargs)
            if where is not None:
                self.ignored.append(f"{name}{_short(args)}")
        return real(*args, **kwargs)


def _write_outcomes(data: bytes) -> list[tuple[str, bytes]]:
    """What of one un-synced write may reach the disk: nothing, any prefix, all, zeros."""
    outcomes = [("lost", b"")]
    outcomes += [(f"torn at {k}", data[:k]) for k in range(1, len(data))]
    outcomes += [("whole", data), ("zeros", bytes(len(data)))]
    return outcomes


def _overlay(base: bytes, offset: int, data: bytes) -> bytes:
    if len(base) < offset:
        base += bytes(offset - len(base))
    return base[:offset] + data + base[offset + len(data) :]


@dataclass
class _ModelFile:
    synced: bytes = b""
    pending: list[tuple[int, bytes]] = field(default_factory=list)


def crash_outcomes(
    initial: dict[str, bytes],
    ops: list[Op],
    inodes: dict[str, int],
    name: str,
    *,
    limit: int = 200_000,
) -> list[tuple[int, dict[bytes | None, str]]]:
    """For each crash point (after 0, 1, ... len(ops) operations), every content
    the file ``name`` may have after a power loss, with one way to get there.

    The model is weak on purpose:

    * file data written but not fsynced may be lost, torn (any prefix), or
      leave zeros where it should have been (the size reached the disk, the data
      did not); each un-synced write independently;
    * a change to the folder (create, rename, unlink) not followed by an fsync
      of the folder may be lost, each independently (any subset of them, in
      order, is what the disk may hold);
    * fsync of a file makes its data durable, not its name; fsync of the folder
      makes every earlier change of names durable.

    A content of ``None`` means the name does not exist.
    """
    files: dict[int, _ModelFile] = {
        inodes[n]: _ModelFile(synced=data) for n, data in initial.items()
    }
    synced_names = dict(inodes)
    pending_names: list[Op] = []
    result = []
    for point in range(len(ops) + 1):
        result.append((point, _outcomes_now(files, synced_names, pending_names, name, limit)))
        if point == len(ops):
            break
        op = ops[point]
        if op.kind == "create":
            files[op.ino] = _ModelFile()
            pending_names.append(op)
        elif op.kind == "write":
            files[op.ino].pending.append((op.offset, op.data))
        elif op.kind == "fsync":
            f = files[op.ino]
            for offset, data in f.pending:
                f.synced = _overlay(f.synced, offset, data)
            f.pending = []
        elif op.kind == "fsync-dir":
            synced_names = _apply_names(synced_names, pending_names)
            pending_names = []
        elif op.kind in ("rename", "exchange", "unlink"):
            pending_names.append(op)
        else:  # pragma: no cover
            raise AssertionError(op)
    return result


def _apply_names(names: dict[str, int], ops: Iterable[Op]) -> dict[str, int]:
    names = dict(names)
    for op in ops:
        if op.kind == "create":
            names.setdefault(op.name, op.ino)
        elif op.kind == "rename":
            if op.name in names:  # a rename whose source never reached the disk: nothing
                names[op.target] = names.pop(op.name)
        elif op.kind == "exchange":
            if op.name in names and op.target in names:  # both names are needed for a swap
                names[op.name], names[op.target] = names[op.target], names[op.name]
        elif op.kind == "unlink":
            names.pop(op.name, None)
    return names


def _outcomes_now(
    files: dict[int, _ModelFile],
    synced_names: dict[str, int],
    pending_names: list[Op],
    name: str,
    limit: int,
) -> dict[bytes | None, str]:
    seen: dict[bytes | None, str] = {}
    count = 0
    for keep in itertools.product((False, True), repeat=len(pending_names)):
        kept = [op for op, k in zip(pending_names, keep, strict=True) if k]
        names = _apply_names(synced_names, kept)
        how_names = "names: " + (
            ", ".join(_describe(op) for op in kept) or "none of the un-synced changes"
        )
        if name not in names:
            seen.setdefault(None, how_names)
            continue
        f = files[names[name]]
        for choice in itertools.product(*(_write_outcomes(d) for _, d in f.pending)):
            count += 1
            if count > limit:
                raise AssertionError("too many crash states to enumerate; shrink the trace")
            content = f.synced
            for (offset, _), (_, part) in zip(f.pending, choice, strict=True):
                if part:
                    content = _overlay(content, offset, part)
            how = how_names + "; data: " + (", ".join(h for h, _ in choice) or "all synced")
            seen.setdefault(content, how)
    return seen


def _describe(op: Op) -> str:
    if op.kind == "rename":
        return f"rename {op.name} -> {op.target}"
    if op.kind == "exchange":
        return f"exchange {op.name} <-> {op.target}"
    return f"{op.kind} {op.name}"


# ------------------------------------------------------------------ kill -9 loop


def crash_child(path: str, report: str) -> None:
    """Update the counter forever; after each update returns, append its count to ``report``.

    ``t <seconds>`` is written once, after the first update, with the time it
    took (lock acquisition included).
    """
    from conftest import Counter

    from statestore import StateStore

    def bump(s: Counter) -> None:
        s.count += 1

    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        started = time.monotonic()
        store = StateStore(Counter, path, default=Counter, timeout=10.0)
        first = True
        while True:
            saved = store.update(bump)
            os.write(fd, b"%d\n" % saved.count)
            if first:
                os.write(fd, b"t %.6f\n" % (time.monotonic() - started))
                first = False
    except BaseException as e:  # the parent fails the test on this line
        os.write(fd, f"error {type(e).__name__}: {e}\n".encode())
        raise


def once_child(path: str, report: str) -> None:
    """One update; appends ``<count> <seconds it took>`` to ``report``."""
    from conftest import Counter

    from statestore import StateStore

    def bump(s: Counter) -> None:
        s.count += 1

    started = time.monotonic()
    saved = StateStore(Counter, path, default=Counter, timeout=10.0).update(bump)
    with open(report, "a") as f:
        f.write(f"{saved.count} {time.monotonic() - started:.6f}\n")


def crash_server() -> None:
    """A fork server: statestore is imported once, each child starts in about a millisecond.

    Reads commands on stdin, answers one line each on stdout:
    ``spawn <path> <report>`` (a :func:`crash_child`) -> ``pid <n>``;
    ``once <path> <report>`` (a :func:`once_child`, waited for) -> ``status <wait status>``;
    ``reap <n>`` -> ``status <wait status>``.
    """
    from conftest import Counter  # noqa: F401

    import statestore  # noqa: F401  (imported here, before any fork)

    out = sys.stdout
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd in ("spawn", "once"):
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    null = os.open(os.devnull, os.O_RDWR)
                    os.dup2(null, 0)
                    os.dup2(null, 1)
                    (crash_child if cmd == "spawn" else once_child)(args[0], args[1])
                    code = 0
                finally:
                    os._exit(code)
            if cmd == "spawn":
                out.write(f"pid {pid}\n")
            else:
                out.write(f"status {os.waitpid(pid, 0)[1]}\n")
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            out.write(f"status {status}\n")
        else:  # pragma: no cover
            out.write(f"error unknown command {cmd!r}\n")
        out.flush()
