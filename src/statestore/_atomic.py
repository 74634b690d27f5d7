"""Atomic, durable file replacement, and reading a file whole.

The write path (each step with the bug report that taught it; ``docs/store.md``
has the user's view):

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

Who may see the temporary file: it is created with the target's mode in the
``open`` call itself (the umask can only narrow that; a wider mode is restored
by ``fchmod`` afterwards, which only ever widens), so private content is never
in a file more open than the target, not even for a moment. A process that may
(root) gives it the target's owner and group before the rename (``fchown``),
so a root cron job or ``sudo statestore migrate`` leaves the app's file the
app's. A backup takes the mode, owner and group of its state file.

The read path (:func:`read_bytes`) reads only regular files: the path is
``stat``-ed and anything else (a folder, a named pipe, a socket, a device) is
refused with :class:`StateReadError` before it is opened, and the file is then
opened with ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block) and
``O_NOCTTY`` and checked again with ``fstat``. At most ``max_size`` bytes are
read: a longer file (or one that keeps growing) is refused, not read to the end.
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
from ._lock import identity, process_alive

__all__ = [
    "DEFAULT_MAX_SIZE",
    "abandoned_temp_files",
    "read_bytes",
    "resolve_target",
    "sweep_temp_files",
    "temp_pattern",
    "write_atomic",
]

_TMP_SUFFIX: Final = ".tmp"
#: The largest state file read by default (bytes): far above any state a model
#: holds comfortably, far below what exhausts memory (``StateStore(max_size=)``).
DEFAULT_MAX_SIZE: Final = 256 * 1024 * 1024
_READ_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
#: Temporary files of processes on other hosts are swept only when this old (seconds).
FOREIGN_TEMP_AGE: Final = 3600.0


_host_tags: dict[tuple[str, str | None, int | None], str] = {}


def _host_tag() -> str:
    me = identity()
    key = (me.host, me.boot_id, me.pid_ns)
    tag = _host_tags.get(key)
    if tag is None:  # one hash per host, boot and pid namespace, not one per save
        tag = _host_tags[key] = hashlib.sha256(
            f"{me.host}\0{me.boot_id}\0{me.pid_ns}".encode()
        ).hexdigest()[:8]
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


def file_kind(mode: int) -> str:
    """What a ``stat`` mode is, as messages name it ("a symbolic link", "a folder",
    "a named pipe (FIFO)", ..., "a file")."""
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a file"),
    )
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def _not_regular(path: str, mode: int) -> StateReadError:
    kind = file_kind(mode)
    if stat.S_ISDIR(mode):
        return StateReadError(
            path,
            "is a folder, not a state file; move it away or choose another path",
            errno=errno.EISDIR,
        )
    return StateReadError(
        path,
        f"is {kind}, not a regular file; a state file must be a regular file (if it is "
        "a symbolic link, it must point to one): move it away or choose another path. "
        "Nothing was read",
        errno=errno.EINVAL,
    )


def _too_large(path: str, size: int | None, max_size: int) -> StateReadError:
    found = f"is {size} bytes, more" if size is not None else "holds more"
    return StateReadError(
        path,
        f"{found} than the store's limit of {max_size} bytes (max_size); nothing "
        "more was read. If the file is really this large, give the store a larger "
        "max_size; otherwise it is not the state file it should be",
        errno=errno.EFBIG,
    )


def read_bytes(path: str, max_size: int = DEFAULT_MAX_SIZE) -> bytes | None:
    """The whole file, or None when it does not exist.

    Only a regular file (or a symbolic link to one) is read, and at most
    ``max_size`` bytes of it: anything else is a :class:`StateReadError`.
    """
    try:
        # Never open what is not a regular file (opening a device can act on it).
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        # os.open and reads sized by fstat: a buffered file object makes five more
        # system calls, and this runs on every load. O_NONBLOCK: if a FIFO was put
        # there since the stat, the open returns at once (and fstat refuses it).
        fd = os.open(path, _READ_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(path, st.st_mode)
            size = st.st_size
            if size > max_size:
                raise _too_large(path, size, max_size)
            # One byte more than the size: see the end in one read. Never more than
            # max_size + 1 in all, whatever the file does meanwhile.
            left = max_size + 1
            chunks: list[bytes] = []
            chunk = os.read(fd, min(size + 1, left))
            while chunk:
                chunks.append(chunk)
                left -= len(chunk)
                if left <= 0:
                    raise _too_large(path, None, max_size)
                chunk = os.read(fd, min(max(size, 65536), left))
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except FileNotFoundError:
        return None
    except StateReadError:
        raise
    except PermissionError as e:
        raise StateReadError(
            path,
            "permission denied while reading; check the file's owner and mode",
            errno=e.errno,
        ) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateReadError(
                path,
                "is a loop of symbolic links, not a state file; remove or repair the link",
                errno=e.errno,
            ) from e
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


def _keep_owner_and_mode(fd: int, old: os.stat_result) -> None:
    """Give the new file ``old``'s owner and group (as far as allowed), then its mode."""
    now = os.fstat(fd)
    changed = False
    if (now.st_uid, now.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)  # root: the file stays the app's
            changed = True
        except PermissionError:
            # Not root: the owner stays ours; the group can still be kept if we are
            # one of its members.
            if now.st_gid != old.st_gid:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, -1, old.st_gid)
                    changed = True
    # Only ever widening here (the umask narrowed the mode given to open), and
    # after chown, which clears the set-user-ID and set-group-ID bits.
    if changed or stat.S_IMODE(now.st_mode) != stat.S_IMODE(old.st_mode):
        os.fchmod(fd, stat.S_IMODE(old.st_mode))


def write_atomic(
    path: str,
    data: bytes,
    *,
    durable: bool = True,
    before_replace: Callable[[], None] | None = None,
    mode_of: str | None = None,
    follow_links: bool = True,
) -> None:
    """Replace the file at ``path`` with ``data``, atomically (and durably if asked).

    The file keeps the mode, owner and group it had (``mode_of``: take them from
    that file instead, as a backup does from its state file); owner and group
    only as far as the process may set them.

    ``path`` may be a symlink: the link's target is replaced and the link kept
    (``follow_links=False``: the name itself is replaced, whatever is there, and no
    link is followed, for a file the caller creates, such as a backup).
    ``before_replace`` runs right before the rename; if it raises, nothing is
    published and the exception propagates.
    """
    try:
        target = resolve_target(path) if follow_links else path
    except OSError as e:
        raise write_error(path, e, "read the symbolic link") from e
    folder = os.path.dirname(target) or "."
    try:
        old: os.stat_result | None = os.stat(mode_of or target)
    except FileNotFoundError:
        old = None  # new file: 0o666 & ~umask, applied by the kernel
    except OSError as e:
        raise write_error(path, e, "stat") from e
    # Created with its final mode: the umask may narrow it, never widen it, so the
    # content is never more exposed than in the target (narrowing afterwards would
    # leave a window in which another user can open the file).
    mode = 0o666 if old is None else stat.S_IMODE(old.st_mode)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    tmp = _temp_name(target)
    what = "create a temporary file"
    made = False  # only a temp file this call created is ours to remove
    try:
        try:
            fd = os.open(tmp, flags, mode)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, flags, mode)
        made = True
        try:
            if old is not None:
                what = "set the owner and mode of the temporary file"
                _keep_owner_and_mode(fd, old)
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
        # Not when the open failed: whatever holds the name then (another party's
        # file or link, planted under a name it guessed) was not made here.
        if made:
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


def temp_writer_gone(path: str, tag: str, pid: int, now: float) -> bool:
    """The rule for a temporary file named with ``tag`` and ``pid``: its writer is gone.

    This host (same boot, same pid namespace): the process is no longer running.
    Another host or an earlier boot: the file is ``FOREIGN_TEMP_AGE`` old. When in
    doubt (the process cannot be checked, the file cannot be looked at): not gone.
    """
    try:
        if tag == _host_tag():
            me = identity()  # the tag matched: this host, this boot
            return process_alive(me.host, me.boot_id, pid, None, me.pid_ns) is False
        return now - os.lstat(path).st_mtime >= FOREIGN_TEMP_AGE
    except OSError:
        return False


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
        if not temp_writer_gone(full, m["tag"], int(m["pid"]), now):
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


# The pieces of the write path the folder journal's group commit shares.
host_tag = _host_tag
fsync_file = _fsync
fsync_dir = _fsync_dir
keep_owner_and_mode = _keep_owner_and_mode
__all__ += [
    "file_kind",
    "fsync_dir",
    "fsync_file",
    "host_tag",
    "keep_owner_and_mode",
    "temp_writer_gone",
]
