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
import errno
import hashlib
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable
from typing import Final, NamedTuple

from ._errors import DurabilityError, StateReadError, StateStoreError, write_error
from ._owner import identity, process_alive

__all__ = [
    "TempFile",
    "abandoned_temp_files",
    "read_bytes",
    "resolve_target",
    "sweep_temp_files",
    "temp_pattern",
    "write_atomic",
]

_TMP_SUFFIX: Final = ".tmp"
#: Temporary files of processes on other hosts are swept only when this old (seconds).
FOREIGN_TEMP_AGE: Final = 3600.0


_host_tags: dict[tuple[str, str | None, int | None], str] = {}


def _host_tag() -> str:
    me = identity()
    key = (me.host, me.boot_id, me.pid_ns)
    tag = _host_tags.get(key)
    if tag is None:  # one hash per host, boot and pid namespace, not one per save
        tag = _host_tags[key] = hashlib.sha256(
            f"{me.host}\0{me.boot_id}\0{me.pid_ns}".encode()).hexdigest()[:8]
    return tag


def temp_pattern(target: str) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files statestore makes for ``target``."""
    return f".{os.path.basename(target)}.", _TMP_SUFFIX


def _temp_name(target: str) -> str:
    prefix, suffix = temp_pattern(target)
    name = f"{prefix}{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"
    return os.path.join(os.path.dirname(target), name)


def resolve_target(path: str) -> str:
    """The file a save really replaces: a symlink's final target, so the link stays a link.

    Raises OSError when a link cannot be read: guessing "not a link" would replace it.
    """
    for _ in range(40):
        try:
            link = os.readlink(path)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):  # not a link, or nothing there yet
                return path
            raise
        path = os.path.join(os.path.dirname(path), link)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)


def read_bytes(path: str) -> bytes | None:
    """The whole file, or None when it does not exist."""
    try:
        # os.open and reads sized by fstat: a buffered file object makes five more
        # system calls, and this runs on every load.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            chunks = [os.read(fd, size + 1)]  # one byte more: see the end in one read
            while chunks[-1]:
                chunks.append(os.read(fd, max(size, 65536)))
        finally:
            os.close(fd)
        return b"".join(chunks) if len(chunks) > 2 else chunks[0]
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
    mode_of: str | None = None,
) -> None:
    """Replace the file at ``path`` with ``data``, atomically (and durably if asked).

    The file keeps the mode it had (``mode_of``: take the mode of that file
    instead, as a backup does of its state file).

    ``path`` may be a symlink: the link's target is replaced and the link kept.
    ``before_replace`` runs right before the rename; if it raises, nothing is
    published and the exception propagates.
    """
    try:
        target = resolve_target(path)
    except OSError as e:
        raise write_error(path, e, "read the symbolic link") from e
    folder = os.path.dirname(target) or "."
    try:
        mode: int | None = stat.S_IMODE(os.stat(mode_of or target).st_mode)
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


# ".<target>.<host tag>-<pid>-<random>.tmp", as made by _temp_name.
_TEMP_RE: Final = re.compile(
    r"\.(?P<target>.+)\.(?P<tag>[0-9A-Za-z]+)-(?P<pid>[0-9]+)-[0-9A-Za-z]+"
    + re.escape(_TMP_SUFFIX),
    re.DOTALL,
)


class TempFile(NamedTuple):
    """A temporary file statestore left next to a state file."""

    path: str
    target: str  # the name of the file it was meant to replace, in the same folder
    pid: int
    local: bool  # made on this host since its last boot (its pid can be checked)


def abandoned_temp_files(folder: str, target: str | None = None) -> list[TempFile]:
    """Temporary files in ``folder`` whose writers are gone (for the file named ``target``,
    or for any file).

    A file from this host is abandoned when its process is no longer running; one
    from another host (or an earlier boot) only once it is ``FOREIGN_TEMP_AGE`` old.
    """
    mine = _host_tag()
    found: list[TempFile] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return found
    now = time.time()
    for name in names:
        m = _TEMP_RE.fullmatch(name)
        if m is None or (target is not None and m["target"] != target):
            continue
        full = os.path.join(folder, name)
        local = m["tag"] == mine
        try:
            if local:
                me = identity()  # the tag matched: this host, this boot
                if process_alive(me.host, me.boot_id, int(m["pid"]), None, me.pid_ns) is not False:
                    continue
            elif now - os.lstat(full).st_mtime < FOREIGN_TEMP_AGE:
                continue
        except OSError:
            continue
        found.append(TempFile(full, m["target"], int(m["pid"]), local))
    return found


def sweep_temp_files(path: str) -> list[str]:
    """Remove temporary files left next to ``path`` by processes that died.

    Call only while holding the lock. Files of this host's live processes are
    kept; files from other hosts only once they are very old.
    """
    try:
        target = resolve_target(path)
    except OSError:
        return []
    removed: list[str] = []
    for temp in abandoned_temp_files(os.path.dirname(target) or ".", os.path.basename(target)):
        try:
            os.unlink(temp.path)
        except OSError:
            continue
        removed.append(temp.path)
    return removed
