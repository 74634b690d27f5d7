"""Atomic, durable file replacement, and reading a file whole.

The write path (``../shared/DESIGN.md`` has the reasons and the bug reports):

1. a temporary file in the target's own folder (same file system, so the rename
   is atomic), with a unique name (host, pid and random bits; fixed names
   collide: lowdb#157), created with ``O_EXCL``, with the target's mode
   (``tempfile.mkstemp`` would make it 0600: atomicwrites#42);
2. every byte written (a write can be short), then ``fsync``; a failed fsync
   is never retried (after one failure Linux may report the next as success
   without the data: PostgreSQL's "fsyncgate");
3. a last check supplied by the caller (the lock is still ours), then
   ``os.replace``;
4. ``fsync`` of the folder, without which the rename itself can be lost in a
   crash (write-file-atomic#64). If only this step fails the new content is in
   place but its durability is unknown: :class:`DurabilityError` says so.

On any failure before the rename the temporary file is removed and the target
is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable
from typing import Final

from ._errors import DurabilityError, StateReadError, StateStoreError, write_error
from ._owner import identity

__all__ = ["read_bytes", "resolve_target", "sweep_temp_files", "temp_pattern", "write_atomic"]

_TMP_SUFFIX: Final = ".tmp"
#: Temporary files of processes on other hosts are swept only when this old (seconds).
FOREIGN_TEMP_AGE: Final = 3600.0


def _host_tag() -> str:
    me = identity()
    return hashlib.sha256(f"{me.host}\0{me.boot_id}".encode()).hexdigest()[:8]


def temp_pattern(target: str) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files statestore makes for ``target``."""
    return f".{os.path.basename(target)}.", _TMP_SUFFIX


def _temp_name(target: str) -> str:
    prefix, suffix = temp_pattern(target)
    name = f"{prefix}{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"
    return os.path.join(os.path.dirname(target), name)


def resolve_target(path: str) -> str:
    """The file a save really replaces: a symlink's final target, so the link stays a link."""
    if not os.path.islink(path):
        return path
    return os.path.realpath(path)


def read_bytes(path: str) -> bytes | None:
    """The whole file, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError as e:
        raise StateReadError(
            path, "is a folder, not a state file; move it away or choose another path",
            errno=e.errno,
        ) from e
    except PermissionError as e:
        raise StateReadError(
            path, "permission denied while reading; check the file's owner and mode",
            errno=e.errno,
        ) from e
    except OSError as e:
        raise StateReadError(path, f"cannot read: {e.strerror or e}", errno=e.errno) from e


def _fsync(fd: int) -> None:
    if sys.platform == "darwin":  # pragma: no cover - fsync does not reach the platter there
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    os.fsync(fd)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str,
    data: bytes,
    *,
    durable: bool = True,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Replace the file at ``path`` with ``data``, atomically (and durably if asked).

    ``path`` may be a symlink: the link's target is replaced and the link kept.
    ``before_replace`` runs right before the rename; if it raises, nothing is
    published and the exception propagates.
    """
    target = resolve_target(path)
    folder = os.path.dirname(target) or "."
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None  # new file: 0o666 & ~umask, applied by the kernel
    except OSError as e:
        raise write_error(path, e, "stat") from e
    tmp = _temp_name(target)
    what = "create a temporary file"
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            if mode is not None:
                what = "set the mode of the temporary file"
                os.fchmod(fd, mode)
            what = "write"
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                what = "fsync"
                _fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        what = "rename the temporary file over the target"
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, StateStoreError):
            raise write_error(path, e, what) from e
        raise
    if durable:
        try:
            _fsync_dir(folder)
        except OSError as e:
            raise DurabilityError(
                path,
                f"the new content is in place, but syncing its folder failed "
                f"({e.strerror or e}): it may not survive a power loss",
                errno=e.errno,
            ) from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def sweep_temp_files(path: str) -> list[str]:
    """Remove temporary files left next to ``path`` by processes that died.

    Call only while holding the lock. Files of this host's live processes are
    kept; files from other hosts only once they are very old.
    """
    target = resolve_target(path)
    folder = os.path.dirname(target) or "."
    prefix, suffix = temp_pattern(target)
    mine = _host_tag()
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        parts = name[len(prefix) : -len(suffix)].split("-")
        if len(parts) != 3:
            continue
        tag, pid_text, _ = parts
        full = os.path.join(folder, name)
        try:
            if tag == mine:
                if _pid_alive(int(pid_text)):
                    continue
            elif now - os.lstat(full).st_mtime < FOREIGN_TEMP_AGE:
                continue
            os.unlink(full)
            removed.append(full)
        except (OSError, ValueError):
            continue
    return removed

