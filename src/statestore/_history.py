"""The last N committed versions of a document, kept next to it.

Where: ``<folder>/.statestore-history/<name>/`` for the state file
``<folder>/<name>``. Each version is one file named ``<sequence>-<random>.version``
(the sequence, twelve digits, orders them; the random part keeps two writers
apart), holding one header line (``statestore-history 1 {json}``: revision,
time, written_by, size) and then the document's bytes exactly as committed.
Each is written with :func:`statestore._atomic.write_atomic`, so a version file
is whole or absent. A marker file (``00-statestore-history.txt``) says what
the folder is.

Rules:

* **Private.** Both folders are created mode 0700 and every file 0600,
  whatever the state file's mode: an old version can hold what the current
  one no longer does (a token since removed), and a mode a person later
  narrows on the state file would not narrow copies made before. A history is
  its recording user's: a folder at either place that is not a folder (a
  symbolic link, a file, a pipe), that belongs to another user, or that others
  may enter, is refused with :class:`StateWriteError` / :class:`StateReadError`
  naming it; nothing there is followed, changed or removed.
* **Bounded.** Every ``record()`` prunes to ``keep`` versions, and removes the
  temporary files of records whose process died (``kill -9`` in the middle):
  between two records there are at most ``keep + 1`` version files plus one
  temporary file per record interrupted since, and a completed record leaves
  exactly ``keep``.
* **Only ours.** Pruning removes only regular files whose names match the
  version pattern, and temporary files of the version pattern left by dead
  processes; anything else in the folder is left alone. An entry with a
  version name that is not a regular file (a link, a folder, a FIFO) was not
  made here: it is refused with a typed error, never followed or removed.
* **Order.** Newest first by sequence. Records of one document must be
  serialised by the caller (the store records under the document's lock); two
  concurrent records are both kept, in an unspecified order between them.

The seam. The store and the transaction core do not build a history: they
ask the storage (``storage.history(keep)``, for listing and reading) and the
session (``session.history(keep)``, for recording under the lock) for a
:class:`HistoryKeeper`. A file storage gives this module's :class:`History`;
the PostgreSQL storage a ``PostgresHistory``, which keeps the versions in a
table and records them in the commit's own transaction.

Revisions are opaque strings chosen by the caller. Reading a revision that is
not (or no longer) kept raises :class:`StateReadError` with ``errno`` ENOENT
(not a ``StateNotFoundError``: the state file itself may well exist).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final, NamedTuple, Protocol

from ._atomic import abandoned_temp_files, file_kind, write_atomic
from ._errors import StateReadError, StateStoreError, StateWriteError

__all__ = [
    "HISTORY_FOLDER",
    "History",
    "HistoryEntry",
    "HistoryKeeper",
]

#: The folder, next to the state files, that holds their histories.
HISTORY_FOLDER: Final = ".statestore-history"
_MARKER: Final = "00-statestore-history.txt"
_MAGIC: Final = b"statestore-history 1 "
_NAME_RE: Final = re.compile(r"(?P<seq>[0-9]{12})-[0-9a-f]{12}\.version")
_HEADER_MAX: Final = 64 * 1024
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
)


def _via(fd: int, path: str) -> str:
    """A path to the folder open as ``fd`` that no rename or link can redirect
    (Linux's ``/proc/self/fd``), or ``path`` where there is none."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.isdir(proc) else path


class HistoryEntry(NamedTuple):
    """One kept version: its revision, when it was recorded (seconds since the
    epoch), who wrote it (as given to ``record``; from a store's ``history()``, a
    :class:`~statestore.WrittenBy`, None for a version made by hand), and its
    size in bytes."""

    revision: str
    time: float
    written_by: Any
    size: int


class HistoryKeeper(Protocol):
    """The last ``keep`` committed versions of one document, wherever they are kept."""

    keep: int

    def entries(self) -> list[HistoryEntry]:
        """The kept versions, newest first."""
        ...

    def newest(self) -> HistoryEntry | None:
        """The newest kept version, or None."""
        ...

    def read(self, revision: str) -> bytes:
        """The bytes committed as ``revision``; :class:`StateReadError` (ENOENT) if
        it is not kept."""
        ...

    def record(
        self, data: bytes, revision: str, written_by: Mapping[str, Any] | None = None
    ) -> None:
        """Keep ``data`` as ``revision``, then prune to the newest ``keep``."""
        ...


class History:
    """The kept versions of ``state_file`` (see the module's rules)."""

    def __init__(self, state_file: str | os.PathLike[str], keep: int) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a whole number of versions, at least 1, not {keep!r}")
        self.state_file = os.path.abspath(os.fspath(state_file))
        self.keep = keep
        parent, name = os.path.split(self.state_file)
        self.root = os.path.join(parent, HISTORY_FOLDER)
        self.folder = os.path.join(self.root, name)

    # -- the folders ------------------------------------------------------

    def _refuse(self, path: str, why: str, writing: bool, code: int) -> StateStoreError:
        error = StateWriteError if writing else StateReadError
        return error(
            path,
            f"{why}; statestore keeps history only in a private folder of its own "
            "user. Nothing there was followed or changed: move it away (or fix its "
            "owner and mode), or turn history off",
            errno=code,
        )

    def _check_dir(self, path: str, fd: int, writing: bool) -> None:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise self._refuse(
                path, f"belongs to another user (uid {st.st_uid})", writing, errno.EPERM
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise self._refuse(
                path,
                f"is open to other users (mode {stat.S_IMODE(st.st_mode):o}, expected 700)",
                writing,
                errno.EPERM,
            )

    def _open_dir(self, at: int | None, path: str, create: bool) -> int | None:
        """Open one level (never through a link); None when absent and not creating."""
        name = os.path.basename(path)
        made = False
        if create:
            try:
                os.mkdir(name if at is not None else path, 0o700, dir_fd=at)
                made = True
            except FileExistsError:
                pass
            except OSError as e:
                raise StateWriteError(
                    path, f"cannot create the history folder: {e.strerror or e}", errno=e.errno
                ) from e
        try:
            fd = os.open(name if at is not None else path, _DIR_FLAGS, dir_fd=at)
        except FileNotFoundError:
            if create:
                raise StateWriteError(
                    path, "the history folder vanished while being opened", errno=errno.ENOENT
                ) from None
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                try:
                    kind = file_kind(os.lstat(name if at is not None else path, dir_fd=at).st_mode)
                except OSError:
                    kind = "not a folder"
                raise self._refuse(path, f"is {kind}, not a folder", create, e.errno) from e
            error = StateWriteError if create else StateReadError
            raise error(path, f"cannot open: {e.strerror or e}", errno=e.errno) from e
        try:
            if made:
                os.fchmod(fd, 0o700)  # the umask may have narrowed it to unusable
            self._check_dir(path, fd, create)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _folder(self, create: bool) -> Iterator[int | None]:
        root = self._open_dir(None, self.root, create)
        if root is None:
            yield None
            return
        try:
            fd = self._open_dir(root, self.folder, create)
        finally:
            os.close(root)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _marker(self, fd: int) -> str:
        """The marker file (created 0600 if missing), whose mode the versions take."""
        path = os.path.join(self.folder, _MARKER)
        text = (
            f"Earlier versions of {self.state_file}, kept by statestore (the newest "
            f"{self.keep}). Files named <sequence>-<random>.version are managed and "
            "pruned by statestore; anything else here is left alone.\n"
        )
        try:
            out = os.open(
                _MARKER,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=fd,
            )
        except FileExistsError:
            st = os.lstat(_MARKER, dir_fd=fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise self._refuse(
                    path, f"is {file_kind(st.st_mode)} not made by statestore", True, errno.EEXIST
                ) from None
            return path
        try:
            os.fchmod(out, 0o600)
            os.write(out, text.encode())
        finally:
            os.close(out)
        return path

    # -- listing ----------------------------------------------------------

    def _names(self, fd: int, writing: bool) -> list[tuple[int, str]]:
        """(sequence, name) of the version files, oldest first; refuses impostors."""
        found: list[tuple[int, str]] = []
        for name in os.listdir(fd):
            m = _NAME_RE.fullmatch(name)
            if m is None:
                continue
            st = os.lstat(name, dir_fd=fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(
                    os.path.join(self.folder, name),
                    f"is {file_kind(st.st_mode)} under a version's name, not made by statestore",
                    writing,
                    errno.EINVAL,
                )
            found.append((int(m["seq"]), name))
        found.sort()
        return found

    def _read(self, fd: int, name: str) -> tuple[dict[str, Any], bytes]:
        path = os.path.join(self.folder, name)
        try:
            vfd = os.open(name, _READ_FLAGS, dir_fd=fd)
        except OSError as e:
            raise StateReadError(path, f"cannot read: {e.strerror or e}", errno=e.errno) from e
        try:
            st = os.fstat(vfd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(path, f"is {file_kind(st.st_mode)}", False, errno.EINVAL)
            chunks = []
            left = st.st_size + 1
            while left > 0:
                chunk = os.read(vfd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(vfd)
        blob = b"".join(chunks)
        line, _, data = blob.partition(b"\n")
        try:
            if not line.startswith(_MAGIC) or len(line) > _HEADER_MAX:
                raise ValueError("no header")
            meta = json.loads(line[len(_MAGIC) :])
            if not isinstance(meta, dict) or meta.get("size") != len(data):
                raise ValueError("size")
        except ValueError as e:
            raise StateReadError(
                path,
                "is not a whole version file (its header or size is wrong); remove it",
                errno=errno.EINVAL,
            ) from e
        return meta, data

    def entries(self) -> list[HistoryEntry]:
        """The kept versions, newest first (empty when nothing was recorded)."""
        with self._folder(create=False) as fd:
            if fd is None:
                return []
            out = []
            for _seq, name in reversed(self._names(fd, writing=False)):
                meta, _data = self._read(fd, name)
                out.append(
                    HistoryEntry(
                        str(meta["revision"]),
                        float(meta["time"]),
                        meta.get("written_by"),
                        int(meta["size"]),
                    )
                )
            return out

    def newest(self) -> HistoryEntry | None:
        """The newest kept version (reading only its file), or None."""
        with self._folder(create=False) as fd:
            if fd is None:
                return None
            names = self._names(fd, writing=False)
            if not names:
                return None
            meta, _data = self._read(fd, names[-1][1])
            return HistoryEntry(
                str(meta["revision"]),
                float(meta["time"]),
                meta.get("written_by"),
                int(meta["size"]),
            )

    def read(self, revision: str) -> bytes:
        """The bytes committed as ``revision`` (the newest such, if recorded twice)."""
        with self._folder(create=False) as fd:
            if fd is not None:
                for _seq, name in reversed(self._names(fd, writing=False)):
                    meta, data = self._read(fd, name)
                    if meta.get("revision") == revision:
                        return data
        kept = ", ".join(e.revision for e in self.entries()[:5]) or "none"
        raise StateReadError(
            self.state_file,
            f"revision {revision!r} is not in the history (never recorded, or pruned: "
            f"only the newest {self.keep} are kept). Newest kept: {kept}",
            errno=errno.ENOENT,
        )

    # -- recording --------------------------------------------------------

    def record(
        self, data: bytes, revision: str, written_by: Mapping[str, Any] | None = None
    ) -> None:
        """Keep ``data`` as ``revision``, then prune to the newest ``keep``."""
        if not isinstance(revision, str) or not revision:
            raise ValueError(f"revision must be a non-empty string, not {revision!r}")
        meta = {
            "revision": revision,
            "time": time.time(),
            "written_by": dict(written_by) if written_by is not None else None,
            "size": len(data),
        }
        header = _MAGIC + json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode()
        if len(header) > _HEADER_MAX:
            raise ValueError("revision and written_by are too large for a history header")
        with self._folder(create=True) as fd:
            assert fd is not None
            try:
                self._marker(fd)
                self._sweep(fd)
                names = self._names(fd, writing=True)
                seq = (names[-1][0] + 1) if names else 1
                name = f"{seq:012d}-{secrets.token_hex(6)}.version"
                try:
                    write_atomic(
                        os.path.join(_via(fd, self.folder), name),
                        header + b"\n" + bytes(data),
                        mode_of=os.path.join(_via(fd, self.folder), _MARKER),
                        follow_links=False,
                    )
                except StateWriteError as e:  # name the folder, not /proc/self/fd
                    raise StateWriteError(
                        os.path.join(self.folder, name), e.message, errno=e.errno
                    ) from e
                self._prune(fd)
            except StateStoreError:
                raise
            except OSError as e:
                raise StateWriteError(
                    self.folder, f"cannot record a version: {e.strerror or e}", errno=e.errno
                ) from e

    def _sweep(self, fd: int) -> None:
        """Remove temporary files of version writes whose process died."""
        for temp in abandoned_temp_files(_via(fd, self.folder)):
            if _NAME_RE.fullmatch(temp.target) is None:
                continue
            name = os.path.basename(temp.path)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(name, dir_fd=fd).st_mode):
                    os.unlink(name, dir_fd=fd)

    def _prune(self, fd: int) -> None:
        names = self._names(fd, writing=True)
        for _seq, name in names[: max(len(names) - self.keep, 0)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
