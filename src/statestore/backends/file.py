"""The file system backend: a JSON file, a directory lock, atomic renames.

What is read (``_atomic.read_bytes``): only a regular file (or a symbolic link
to one), and at most ``max_size`` bytes; anything else is a typed error, at
once, never a hang.

When a missing file means "new". A missing state file gives the store's
default only when nothing says the file existed. Two things say so:

* a copy that ``statestore doctor --fix`` quarantined
  (``.quarantine/<name>.<UTC time>`` next to it): the read fails at once with
  :class:`StateMissingError`, naming the copy and how to restore it, or how to
  start over deliberately (remove the copy);
* an editor's backup ``<name>~``: vim and Emacs save by renaming the file to
  ``<name>~`` and writing a new one, so for a moment there is no file. The read
  looks again, for up to ``missing_wait`` seconds, and reads the new file as
  soon as it is there; if it does not come back, :class:`StateMissingError`
  names the backup. A store never starts from its default in that moment.

A file with neither is new, and the default is used at once: no wait. A
``.quarantine/`` folder that this user cannot list is neither: the read fails
with :class:`StateReadError` naming it, as a copy there cannot be ruled out. Whether
the file or its ``<name>~`` is there is judged from one listing of the folder
(one ``getdents`` call is not interleaved with a rename in that folder on a
local file system, and an editor's save always leaves one of the two names),
so a save in progress is not mistaken for "no file" (where the folder cannot
be listed, the names are checked one after the other: best effort). The rule
holds for every read: :meth:`~statestore.StateStore.load` and the reads under the lock
(``update()``, ``transaction()``, ``save()``). Statestore's own backups of
older versions (``<name>.v<N>.bak``; a migration refuses to run when that name
holds a symbolic link, something other than a regular file, or another user's
file, which would be no backup) are not such a trace: they stay after a
migration for good, and deleting the state file remains a way to start over.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Final

from .._atomic import DEFAULT_MAX_SIZE, read_bytes, resolve_target, sweep_temp_files, write_atomic
from .._errors import LockError, StateMissingError, StateReadError, StateWriteError
from .._folder_journal import MARKER, group_commit, read_marker, recover
from .._lock import AcquiredLock, DirectoryLock

if TYPE_CHECKING:
    from .._history import History
    from .._watch import FileWatcher

__all__ = [
    "EDITOR_BACKUP_SUFFIX",
    "MISSING_WAIT",
    "QUARANTINE",
    "FileSession",
    "FileStorage",
    "quarantined_copies",
]

#: The folder, next to the state files, into which ``statestore doctor --fix`` moves
#: files that do not parse.
QUARANTINE: Final = ".quarantine"
#: What vim and Emacs append to the name of the file they rename aside while saving.
EDITOR_BACKUP_SUFFIX: Final = "~"
#: How long a read waits for a file an editor is saving (seconds), by default.
MISSING_WAIT: Final = 2.0
_STAMP: Final = r"\.[0-9]{8}T[0-9]{6}Z(?:-[0-9]+)?"


def quarantined_copies(path: str) -> list[str]:
    """The quarantined copies of the state file ``path`` (paths), oldest first."""
    folder, name = os.path.split(path)
    qdir = os.path.join(folder, QUARANTINE)
    try:
        names = os.listdir(qdir)
    except OSError:  # none (the usual case), or not a folder
        return []
    pattern = re.compile(re.escape(name) + _STAMP, re.DOTALL)
    return [os.path.join(qdir, n) for n in sorted(names) if pattern.fullmatch(n)]


def _check_listable(qdir: str) -> None:
    """Refuse to take the file as new when its quarantine folder cannot be listed:
    a copy there may be the state the user would lose."""
    try:
        os.listdir(qdir)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise StateReadError(
            qdir,
            "the state file is missing and this quarantine folder cannot be listed "
            f"({e.strerror or e}), so the store cannot tell whether 'statestore doctor "
            "--fix' moved the file there; it does not start over from its default. "
            "Give this user access to the folder (or remove it)",
            errno=e.errno,
        ) from e


def _names(path: str) -> list[str]:
    """``path``, and the file it points to when it is a symbolic link."""
    try:
        target = resolve_target(path)
    except OSError:
        return [path]
    return [path] if target == path else [path, target]


class FileSession:
    """The locked half of :class:`FileStorage`.

    It reads and writes the file its lock was taken for (for the store's own
    lock: the state file as resolved when the lock was taken, so a symlink
    switched meanwhile cannot send the write to a file this lock does not guard).
    """

    def __init__(self, storage: FileStorage, held: AcquiredLock, folder: str | None = None) -> None:
        self._storage = storage
        self._held = held
        #: The declared state folder whose lock is held, or None (the file's own lock).
        self.folder = folder
        self.path = held.file or storage.path

    def lend(self, thread: int) -> AbstractContextManager[None]:
        """For the block, ``thread`` may take this session's lock again, as its holder
        can (a group of updates runs each function on its caller's thread)."""
        return self._held.lent_to(thread)

    def read(self) -> bytes | None:
        return self._storage._read_at(self.path)

    def write(self, data: bytes) -> None:
        s = self._storage
        if len(data) > s.max_size:
            # A file the store would then refuse to read.
            raise StateWriteError(
                s.path,
                f"could not save: the new state is {len(data)} bytes, more than the "
                f"store's limit of {s.max_size} bytes (max_size), so it could not be read "
                "again; give the store a larger max_size. The old file is unchanged.",
                errno=errno.EFBIG,
            )
        if self.folder is not None:
            # Through the folder's journal, so that lock-free readers of several of
            # its documents see this commit in order with the folder's groups.
            group_commit(
                self.folder,
                {os.path.basename(os.path.realpath(self.path)): data},
                durable=s.durable,
                verify=self._held.verify,
            )
            return
        write_atomic(self.path, data, durable=s.durable, before_replace=self._held.verify)

    def backup_location(self, label: str) -> str:
        return f"{self._storage.path}.{label}.bak"

    def backup(self, label: str, data: bytes) -> str:
        target = self.backup_location(label)
        # A backup keeps the first original of that version: never overwrite it.
        try:
            found = os.lstat(target)
        except FileNotFoundError:
            # With the state file's mode, owner and group: a private state must not
            # get a public backup, nor an app's state a backup only root may read.
            # Not following links: one planted at the name after the look above must
            # not redirect the write (the rename replaces the link itself).
            write_atomic(
                target,
                data,
                durable=self._storage.durable,
                mode_of=self._storage.path,
                follow_links=False,
            )
            return target
        # Only a regular file of ours or of the state file's owner counts as that
        # original: a link or another user's file planted at the name is no backup,
        # and a migration that named it as one would leave none.
        owners = {os.geteuid(), os.stat(self._storage.path).st_uid}
        if not stat.S_ISREG(found.st_mode) or found.st_uid not in owners:
            raise StateWriteError(
                target,
                "is where the backup of the file's current version goes, but it is "
                + (
                    "not a regular file"
                    if not stat.S_ISREG(found.st_mode)
                    else "another user's file"
                )
                + ", not a backup statestore made; nothing was written. Move it away, "
                "then try again",
                errno=errno.EEXIST,
            )
        return target

    def history(self, keep: int) -> History:
        """The history keeper (``history=N``) of the file this session's lock guards."""
        from .._history import History

        return History(self.path, keep=keep)


class FileStorage:
    """A state file at ``path``, guarded by a directory lock.

    ``lock``: None (the default) for the lock beside the file (``<file>.lock``,
    next to the file a symbolic link points to, resolved again at every locked
    operation), a path for a lock directory of the caller's choice, or a
    :class:`DirectoryLock` to share. ``timeout`` is the lock's default wait.
    ``max_size``: the largest file read (bytes). ``missing_wait``: how long a
    read waits for a file that an editor is saving (see the module's docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        lock: DirectoryLock | str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        durable: bool = True,
        max_size: int = DEFAULT_MAX_SIZE,
        missing_wait: float = MISSING_WAIT,
    ) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive number of bytes, not {max_size!r}")
        if not missing_wait >= 0:
            raise ValueError(f"missing_wait must be a number of seconds >= 0, not {missing_wait!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.timeout = timeout
        self._given_lock = lock is not None
        if lock is None:
            # Next to the file a symlink points to, so that stores opened through
            # the link and through the target share one lock; resolved again for
            # every locked operation, so that a link switched meanwhile takes the
            # lock of the file the operation really reads and writes.
            lock = DirectoryLock.for_file(self.path, timeout=timeout)
        elif not isinstance(lock, DirectoryLock):
            lock = DirectoryLock(lock, timeout=timeout)
        self._file_lock: DirectoryLock = lock
        #: (the marker's identity, the folder, its lock) as last seen.
        self._folder_seen: tuple[tuple[int, int, int, int], str, DirectoryLock] | None = None
        #: The file, resolved through links when the storage is made: two stores of
        #: one file share it (the nesting check's key).
        self.identity = os.path.realpath(self.path)
        self.durable = durable
        self.max_size = max_size
        self.missing_wait = float(missing_wait)
        self._swept = False

    @property
    def location(self) -> str:
        return self.path

    @property
    def lock(self) -> DirectoryLock:
        """The lock a session takes: the declared state folder's, when the file is
        in one (``docs/folders.md``), else the file's own (or the one given)."""
        return self._lock_and_folder()[0]

    def declared_folder(self) -> str | None:
        """The declared state folder the file is in (its direct parent), or None."""
        return self._lock_and_folder()[1]

    def _lock_and_folder(self) -> tuple[DirectoryLock, str | None]:
        """Looked up at every session: a folder declared after this storage was made
        is honoured from its next operation on (one ``lstat`` when there is none)."""
        try:
            # The folder of the file itself: of the file a symbolic link points to.
            path = os.path.realpath(self.path) if os.path.islink(self.path) else self.path
            folder = os.path.dirname(path)
            marker = os.path.join(folder, MARKER)
            st = os.lstat(marker)
        except FileNotFoundError:
            self._folder_seen = None
            return self._file_lock, None
        except OSError as e:
            raise StateReadError(
                self.path,
                f"cannot look for a state folder's marker beside the file ({e.strerror or e})",
                errno=e.errno,
            ) from e
        ident = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._folder_seen
        if seen is None or seen[0] != ident or seen[1] != folder:
            declared = read_marker(folder)  # typed errors for a marker that is not ours
            seen = (ident, folder, DirectoryLock(declared.lock_path, timeout=self.timeout))
            self._folder_seen = seen
        lock = seen[2]
        if self._given_lock and os.path.abspath(self._file_lock.path) != lock.path:
            raise LockError(
                self.path,
                f"is in the state folder {folder}, whose documents all take its lock "
                f"{lock.path}, but this store was given the lock {self._file_lock.path}; "
                "writing under another lock would race the folder's writers. Drop lock= "
                "(or give the folder's lock)",
            )
        return lock, folder

    def read(self) -> bytes | None:
        return self._read_at(self.path)

    def _read_at(self, path: str) -> bytes | None:
        """The bytes at ``path`` (this file, or a session's resolution of it), bounded;
        when missing, the module's rule decides whether it is new."""
        data = read_bytes(path, self.max_size)
        return data if data is not None else self._missing()

    def exists(self) -> bool:
        try:
            os.stat(self.path)
        except FileNotFoundError:  # nothing there, or a link to nothing yet
            return False
        except OSError:  # something is there, if only a link loop: not "no file"
            return True
        return True

    def _traces(self) -> tuple[bool, str | None]:
        """(whether the file is there, the editor's backup that is there or None).

        Both from one listing of the folder where the folder can be listed: a
        rename in that folder is not seen half-done by one ``getdents`` call, and
        an editor's save always leaves the file or its backup, so "neither" is
        not a moment in the middle of a save.
        """
        target = _names(self.path)[-1]
        folder, name = os.path.split(target)
        backup = target + EDITOR_BACKUP_SUFFIX
        try:
            names = set(os.listdir(folder or "."))
        except OSError:
            there = os.path.lexists(target)
            return there, backup if os.path.lexists(backup) else None
        if name + EDITOR_BACKUP_SUFFIX in names:
            return name in names, backup
        link_backup = self.path + EDITOR_BACKUP_SUFFIX
        if target != self.path and os.path.lexists(link_backup):
            return name in names, link_backup
        return name in names, None

    def _missing(self) -> bytes | None:
        """The file was not there: None if it is new; its bytes if it came back."""
        deadline: float | None = None
        delay = 0.001
        while True:
            for name in _names(self.path):
                copies = quarantined_copies(name)
                if copies:
                    raise self._quarantined(copies[-1])
                _check_listable(os.path.join(os.path.dirname(name), QUARANTINE))
            there, backup = self._traces()
            if not there and backup is None:
                return None  # nothing says it existed: a new file
            if backup is not None:
                # An editor is saving: give it time to write the new file.
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.missing_wait
                if now >= deadline:
                    raise self._editor_left(backup)
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.02)
            data = read_bytes(self.path, self.max_size)
            if data is not None:
                return data

    def _quarantined(self, copy: str) -> StateMissingError:
        return StateMissingError(
            self.path,
            f"the state file is missing: 'statestore doctor --fix' moved it to {copy} "
            "because it did not parse, and the store does not start over from its default "
            "while that copy is kept. Repair the copy (statestore validate REF --path "
            f"{shlex.quote(copy)} shows where), then move it back: mv {shlex.quote(copy)} "
            f"{shlex.quote(self.path)}. To start from the default instead, delete the copy "
            f"or move it out of {QUARANTINE}/",
            errno=errno.ENOENT,
        )

    def _editor_left(self, backup: str) -> StateMissingError:
        return StateMissingError(
            self.path,
            f"the state file is missing, but {backup} is there (an editor saves by "
            "renaming the file to that name and writing a new one), and no new file "
            f"appeared within {self.missing_wait:g} s; the store does not start over "
            "from its default meanwhile. If a save was interrupted, move the backup "
            f"back: mv {shlex.quote(backup)} {shlex.quote(self.path)}; to start from the "
            "default instead, remove the backup",
            errno=errno.ENOENT,
        )

    @contextmanager
    def session(self, timeout: float) -> Iterator[FileSession]:
        # The handle, not the thread, holds the lock: a session left on another
        # thread (a transaction ended by a thread pool) still releases it.
        while True:  # again only when a folder was declared meanwhile (rare): a new wait
            lock, folder = self._lock_and_folder()
            held = lock.acquire(timeout)
            if self._still_the_lock(lock, held):
                break
        try:
            self._sweep()
            if folder is not None:
                recover(folder)  # what this session reads must not predate a group
            yield FileSession(self, held, folder)
        finally:
            held.release()

    @asynccontextmanager
    async def async_session(self, timeout: float) -> AsyncIterator[FileSession]:
        # Imported here: a program that never uses asyncio does not import it.
        import asyncio

        from .._lock import AsyncDirectoryLock

        while True:  # again only when a folder was declared meanwhile (rare): a new wait
            lock, folder = self._lock_and_folder()
            level = await AsyncDirectoryLock.over(lock).acquire(timeout)
            try:
                again = self._lock_and_folder()[0]
            except BaseException:
                await level.release()
                raise
            if again.path == lock.path:
                break
            await level.release()  # declared (or re-declared) meanwhile: take the new lock
        try:
            if not self._swept:
                await asyncio.to_thread(self._sweep)
            if folder is not None:
                await asyncio.to_thread(recover, folder)
            yield FileSession(self, level.handle, folder)
        finally:
            await level.release()

    def _still_the_lock(self, lock: DirectoryLock, held: AcquiredLock) -> bool:
        """Whether ``lock``, just acquired, is still the one to hold; if not it is released.

        The lock is chosen before it is acquired; a folder declared in between (a
        marker that appeared, or changed) makes it the wrong one: then it is given
        back and the folder's lock taken. The declarer drains the documents' own
        locks after publishing the marker (``StateFolder``), so a session that got
        its file's lock before the marker appeared has ended before the folder's
        writers start, and one that got it after sees the marker here.
        """
        try:
            again = self._lock_and_folder()[0]
        except BaseException:
            held.release()
            raise
        if again.path == lock.path:
            return True
        held.release()
        return False

    def _sweep(self) -> None:
        if not self._swept:
            # Once per store and process: temp files of writers that died.
            sweep_temp_files(self.path)
            self._swept = True

    # Watching and history: the store asks its storage for both.

    def watcher(self) -> FileWatcher:
        """A :class:`~statestore._watch.FileWatcher` of the file (``store.watch()``)."""
        from .._watch import FileWatcher  # not imported by programs that never watch

        return FileWatcher(self.path)

    def history(self, keep: int) -> History:
        """The history keeper (``history=N``): ``.statestore-history/`` beside the file."""
        from .._history import History

        return History(self.path, keep=keep)
