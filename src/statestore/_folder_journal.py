"""State folders on disk: the folder marker and the group-commit journal.

A *state folder* F is a directory whose state documents share one lock and are
committed together. This module is the file-level mechanism: the caller holds
the folder's lock (for everything but :func:`read_consistent`, :func:`pending`,
:func:`read_marker` and :func:`find_folder`) and hands over validated bytes.

The marker ``F/.statestore-folder.json`` declares the folder::

    {"format": "statestore.folder", "format_version": 1, "lock": ".statestore.lock"}

``lock`` is the name of the folder's lock directory inside F: a plain name,
no separators (``schemas/folder.v1.schema.json``). Rules:

* :func:`declare` publishes it without ever replacing anything: a complete,
  fsynced temporary file is hard-linked to the marker name (``link`` fails when
  the name exists, so two declarers cannot overwrite each other and nobody sees a
  half-written marker), then the folder is fsynced. An equal valid marker already
  there is success; a different one is a :class:`StateWriteError`.
* :func:`read_marker` reads it without following links (``O_NOFOLLOW``) and
  refuses, with a typed error naming the path: a symbolic link, anything but a
  regular file, a file owned by a user who owns neither the folder nor this
  process (nor root: someone else's marker in a shared folder could point our
  writers at a lock they control), bad JSON, another format, a newer
  ``format_version`` (:class:`SchemaVersionError`). Unknown keys are ignored.
* :func:`find_folder` looks only at the state file's direct parent: a marker
  higher up does not make a folder of the subfolders.

The journal ``F/.statestore-folder.journal`` records the latest group::

    {"format": "statestore.folder-journal", "format_version": 1, "gen": N,
     "state": "pending" | "done", "entries": [{"name": "a.json",
     "temp": ".a.json.<host>-<pid>-<random>.g<N>.tmp", "sha256": "..."}],
     "written_by": {"pid": ..., "host": ...}, "sha256": "<of the rest>"}

It is only ever replaced whole, by rename, never edited in place; its
``sha256`` covers the canonical JSON of every other key, so a garbled or
hand-edited journal is detected. No journal is generation 0, done.

:func:`group_commit` (the caller holds the lock):

1. checks every name (a plain file name directly in F, not the marker, the
   journal, the lock or one of our temporary names) and that nothing but a
   regular file is at each final name; otherwise a :class:`StateWriteError`
   and nothing is written;
2. :func:`recover` finishes or reports an unfinished group first;
3. writes each document to its own temporary file in F (``O_EXCL|O_NOFOLLOW``,
   created with the final file's mode, given its owner and group as the
   single-file write does), fsynced when ``durable``;
4. calls ``verify()`` (the lock's fencing check);
5. writes the journal ``pending N+1`` listing the entries to its own temporary
   file, fsyncs it, **fsyncs F** (so the temporary files' names are on disk
   before the record's: a power loss may keep a later change of names and lose
   an earlier one no folder fsync covered, which would leave a committed record
   naming a temporary file that never existed), then renames it over the
   journal: that rename is **the commit point**; then fsyncs F;
6. renames each temporary file over its final name, fsyncs F;
7. writes the journal ``done N+1`` without any fsync. Why none is needed: the
   renames are already durable (step 6's fsync came first), so if ``done`` is
   lost the journal is still the fsynced ``pending N+1``, which the next
   :func:`recover` re-checks and marks done; if only its data is lost the
   journal is *torn* (below), which is recognised.

Failure before the commit point: exactly the temporary files this call
created are removed (nothing else), and :class:`StateWriteError` (or, for a
file it could not even look at, :class:`StateReadError`) is raised; every
document is old. Failure after it: :class:`DurabilityError` — the group is
committed and the next :func:`recover` (by the next holder of the lock)
completes it; every document is then new.

One document (k = 1): a single rename is atomic, so no pending record is
needed: the journal gets ``done N+1`` (not synced) *before* the rename, so the
generation moves between any two commits, which is what lock-free readers need
(a reader can only see a mix if two commits happen between its reads, and the
second one's generation bump comes before its rename). The rename itself is the
commit point (a failure of it is a :class:`StateWriteError`, the document
untouched), then F is fsynced. Against a single-file save this costs one small
create, write and rename more, and no extra fsync.

The unsynced records (this bump, and step 7's ``done``) are published with
``renameat2(RENAME_EXCHANGE)`` where the system has it (Linux), then the old
record, now under the temporary name, is unlinked; elsewhere, or on a file
system without exchange, with a plain rename. Why: on ext4 a rename *over* an
existing file starts the writeback of the renamed file's data
(``auto_da_alloc``), about a millisecond, which made a one-document save in a
folder several times slower than outside one; an exchange is not a rename over
a file and skips it. Why readers and recovery keep every guarantee:

* the exchange is atomic: at every instant the journal's name names one whole
  record, the old or the new, exactly as with a rename over it; a reader that
  opened the old record reads it whole (an open file is not changed by a
  rename or an unlink). The journal still changes, by one atomic step, before
  the document's rename, and generations still only grow, so the seqlock
  argument below is unchanged;
* the old record under the temporary name is never read: readers and
  :func:`recover` read only the journal's name and the entries' temporary
  names, never a journal's temporary name. Left behind by a kill before the
  unlink, it has the group temporary-file form and is swept once its writer
  is gone, like any group temporary file;
* what ``auto_da_alloc`` bought, this record's data reaching the disk with its
  name, is what these records never needed: they are not synced at all, and a
  power loss that keeps the name and loses the data leaves the *torn* journal
  below, which is recognised and replaced. The synced ``pending`` record keeps
  the plain rename (its data is on disk already, so the rename costs nothing
  extra there).

A *torn* journal is the only garbled journal the protocol can leave: a ``done``
record (never synced) whose rename reached the disk while its data did not. It
is empty, all zero bytes, or a truncated text that starts as our journal does
and does not parse. In every such case each document is whole (old or new): a
k > 1 ``done`` record follows durable renames, a k = 1 group is one rename. So
:func:`recover` replaces a torn journal by a fresh durable ``done`` record (the
generation continues above any generation named by our temporary files); any
other garbled journal is a :class:`StateCorruptError` (a person must look).
With ``durable=False`` nothing is fsynced: a group is all-or-nothing under
kill -9, not under a power loss.

:func:`recover` (the caller holds the lock): for a ``pending`` journal, each
entry: temporary file present and its sha256 matches -> renamed over the final
name; temporary file absent and the final's sha256 matches -> already done;
anything else -> :class:`StateCorruptError` naming what is inconsistent (never
a guess, never a deletion of user data). Then F is fsynced and the journal
marked done. Temporary files of groups that never reached the commit point are
removed only when they match our group temporary naming and their writer is
gone by the same rule as the single-file temp sweep
(:func:`statestore._atomic.temp_writer_gone`: on this host and boot the process
is dead; otherwise the file is an hour old). Our group temporary names end in
``.g<gen>.tmp`` and so do not match the single-file sweep's pattern: an older
single-file sweeper never removes a temporary file a pending group needs.

:func:`read_consistent` is lock-free and never writes: a seqlock over the
journal. It reads the journal J1; for a ``pending`` J1, each entry from its
temporary file if that is present and its digest matches, else from the final
name (whose digest must match); every other name from its final; then reads
the journal J2 and returns only if J2 is byte-for-byte J1, else retries
(bounded, with a small backoff; then :class:`StateReadError`: the folder is
being written too fast for a snapshot). Why it cannot return a mixed snapshot:
every writer changes the journal (by an atomic rename) *before* it renames any
document: group N+1 renames its ``pending N+1`` over the journal before its
first document rename, and generations only grow, so the journal never comes
back to J1's bytes. If J1 is ``done N`` and J2 equals it, no document was
renamed between the two reads of the journal, so the documents read between
them are exactly the state after group N. If J1 is ``pending N`` and J2 equals
it, the only renames in between are group N's own temp -> final renames; each
entry was read from the temporary file before its rename or the final name
after it, both group N's new content (the digest proves it), and no other
document changes while the journal says ``pending N``. A torn journal is only
seen after a power loss and is replaced (by :func:`recover`) before any
document is renamed, so the same argument holds with its bytes as the
identity. Reads use the single-file path's bounded regular-file read.

:func:`pending` describes an unfinished group without the lock, for
``doctor``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from ._atomic import (
    file_kind,
    fsync_dir,
    fsync_file,
    host_tag,
    keep_owner_and_mode,
    read_bytes,
    temp_writer_gone,
)
from ._errors import (
    DurabilityError,
    SchemaVersionError,
    StateCorruptError,
    StateNotFoundError,
    StateReadError,
    StateWriteError,
    write_error,
)
from ._lock import identity

__all__ = [
    "DEFAULT_LOCK",
    "JOURNAL",
    "MARKER",
    "Entry",
    "Journal",
    "Marker",
    "PendingGroup",
    "Recovery",
    "declare",
    "find_folder",
    "group_commit",
    "is_lock_name",
    "marker_schema",
    "pending",
    "read_consistent",
    "read_journal",
    "read_marker",
    "recover",
]

MARKER: Final = ".statestore-folder.json"
JOURNAL: Final = ".statestore-folder.journal"
DEFAULT_LOCK: Final = ".statestore.lock"
MARKER_FORMAT: Final = "statestore.folder"
JOURNAL_FORMAT: Final = "statestore.folder-journal"
FORMAT_VERSION: Final = 1
_MARKER_MAX: Final = 64 * 1024
_JOURNAL_MAX: Final = 16 * 1024 * 1024
_JOURNAL_HEAD: Final = b'{"format":"' + JOURNAL_FORMAT.encode() + b'"'
#: ".<name>.<host tag>-<pid>-<random>.g<gen>.tmp"
_GROUP_TEMP_RE: Final = re.compile(
    r"\.(?P<target>.+)\.(?P<tag>[0-9A-Za-z]+)-(?P<pid>[0-9]+)-[0-9A-Za-z]+\.g(?P<gen>[0-9]+)\.tmp",
    re.DOTALL,
)
_SINGLE_TEMP_RE: Final = re.compile(r"\..+\.[0-9A-Za-z]+-[0-9]+-[0-9A-Za-z]+\.tmp", re.DOTALL)
_WRITE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_INCONSISTENT_HINT: Final = (
    "a person must look: compare the documents with the journal's entries, put back "
    "what is missing, then remove or fix the journal"
)


class Marker(NamedTuple):
    """A folder's declaration: where it is and where its lock is."""

    folder: str
    lock: str  # the lock directory's name inside the folder

    @property
    def lock_path(self) -> str:
        return os.path.join(self.folder, self.lock)


class Entry(NamedTuple):
    """One document of a group: its final name, its temporary file, its new content's digest."""

    name: str
    temp: str
    sha256: str


class Journal(NamedTuple):
    """The journal as read: ``torn`` when it is a record whose data a power loss took."""

    gen: int
    state: str  # "pending" or "done"
    entries: tuple[Entry, ...]
    raw: bytes | None  # None: there is no journal
    torn: bool = False


class PendingGroup(NamedTuple):
    """An unfinished group, as :func:`pending` sees it: per entry "temp" (its
    temporary file is there and whole), "final" (already renamed) or "inconsistent"."""

    gen: int
    entries: tuple[tuple[Entry, str], ...]


@dataclass
class Recovery:
    """What :func:`recover` did."""

    gen: int
    completed: list[str]  # documents renamed into place
    already: list[str]  # documents that were already in place
    removed: list[str]  # temporary files of dead writers removed
    torn_journal: bool = False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateReadError(path, f"cannot look at it: {e.strerror or e}", errno=e.errno) from e


def _read_nofollow(path: str, max_size: int, what: str) -> bytes | None:
    """A regular file at ``path`` itself (no link followed), or None when absent."""
    st = _lstat(path)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise StateReadError(
            path,
            f"is {file_kind(st.st_mode)}, not the {what} statestore writes (a regular file); "
            "nothing was read or changed: move it away",
            errno=errno.EINVAL,
        )
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateReadError(
                path, f"is a symbolic link, not the {what}; move it away", errno=e.errno
            ) from e
        raise StateReadError(path, f"cannot read the {what}: {e.strerror}", errno=e.errno) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateReadError(path, "is not a regular file; move it away", errno=errno.EINVAL)
        chunks: list[bytes] = []
        left = max_size + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise StateReadError(
                path, f"is larger than any {what} statestore writes", errno=errno.EFBIG
            )
        return b"".join(chunks)
    except OSError as e:
        if isinstance(e, StateReadError):
            raise
        raise StateReadError(path, f"cannot read the {what}: {e.strerror}", errno=e.errno) from e
    finally:
        with contextlib.suppress(OSError):  # read only: a failed close loses nothing
            os.close(fd)


# ------------------------------------------------------------------- the marker


def _check_lock_name(lock: object, path: str) -> str:
    if (
        not isinstance(lock, str)
        or not lock
        or lock in (".", "..")
        or "/" in lock
        or "\0" in lock
        or (os.altsep is not None and os.altsep in lock)
        or lock in (MARKER, JOURNAL)
        or len(lock.encode("utf-8", "surrogateescape")) > 200
    ):
        raise StateCorruptError(
            path,
            f"names the lock {lock!r}: the lock must be a plain file name inside the "
            "folder (no separators, not '.', '..', the marker or the journal)",
            hint='fix the marker\'s "lock" value',
        )
    return lock


def is_lock_name(lock: object) -> bool:
    """Whether ``lock`` may name a folder's lock (a plain name inside the folder)."""
    try:
        _check_lock_name(lock, "")
    except StateCorruptError:
        return False
    return True


def _marker_bytes(lock: str) -> bytes:
    record = {"format": MARKER_FORMAT, "format_version": FORMAT_VERSION, "lock": lock}
    return (json.dumps(record, indent=2) + "\n").encode()


def read_marker(folder: str | os.PathLike[str]) -> Marker:
    """The folder's marker, validated; :class:`StateNotFoundError` when there is none."""
    folder = os.fspath(folder)
    path = os.path.join(folder, MARKER)
    data = _read_nofollow(path, _MARKER_MAX, "folder marker")
    if data is None:
        raise StateNotFoundError(
            path, "the folder is not declared as a state folder (no marker); declare it first"
        )
    st = _lstat(path)
    if st is None:
        raise StateNotFoundError(path, "the folder's marker vanished while being read")
    try:
        folder_uid = os.stat(folder).st_uid
    except OSError as e:
        raise StateReadError(folder, f"cannot stat the folder: {e.strerror}", errno=e.errno) from e
    if st.st_uid not in (os.geteuid(), folder_uid, 0):
        raise StateReadError(
            path,
            f"is owned by uid {st.st_uid}, who owns neither this folder (uid {folder_uid}) nor "
            "this process: a marker planted by another user is not trusted. Remove it, or "
            "have the folder's owner declare the folder",
            errno=errno.EPERM,
        )
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateCorruptError(
            path, f"is not valid JSON ({e})", hint="fix it or remove it and declare again"
        ) from e
    if not isinstance(record, dict) or record.get("format") != MARKER_FORMAT:
        raise StateCorruptError(
            path,
            f'is not a statestore folder marker ("format" is not "{MARKER_FORMAT}")',
            hint="move it away if it belongs to something else",
        )
    version = record.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateCorruptError(path, "has no valid format_version", hint="fix it")
    if version > FORMAT_VERSION:
        raise SchemaVersionError(
            path,
            f"was written by a newer statestore (folder format {version}, this one knows "
            f"{FORMAT_VERSION}); upgrade statestore to use this folder",
        )
    return Marker(folder, _check_lock_name(record.get("lock"), path))


def find_folder(file_path: str | os.PathLike[str]) -> str | None:
    """The declared folder ``file_path`` belongs to, or None.

    Only the file's direct parent is looked at (a marker higher up does not
    count). A marker that is there but unusable raises, as :func:`read_marker` does.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(file_path)))
    if _lstat(os.path.join(folder, MARKER)) is None:
        return None
    read_marker(folder)
    return folder


def declare(folder: str | os.PathLike[str], *, lock: str = DEFAULT_LOCK) -> Marker:
    """Declare ``folder`` a state folder (idempotent for an equal marker)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, MARKER)
    try:
        _check_lock_name(lock, path)
    except StateCorruptError as e:
        raise StateWriteError(path, e.message, errno=errno.EINVAL) from None
    wanted = Marker(folder, lock)
    if _lstat(path) is not None:
        return _same_marker(path, wanted)
    tmp = _group_temp(folder, MARKER, 0)
    made = False
    what = "create a temporary file"
    try:
        fd = os.open(tmp, _WRITE_FLAGS, 0o666)
        made = True
        try:
            what = "write"
            _write_all(fd, _marker_bytes(lock))
            what = "fsync"
            fsync_file(fd)
        finally:
            os.close(fd)
        what = "publish the marker"
        try:
            os.link(tmp, path)  # never replaces: fails when the name exists
        except FileExistsError:
            return _same_marker(path, wanted)
        what = "sync the folder"
        fsync_dir(folder)
    except OSError as e:
        if isinstance(e, StateWriteError):
            raise
        raise write_error(path, e, what) from e
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return wanted


def _same_marker(path: str, wanted: Marker) -> Marker:
    found = read_marker(wanted.folder)
    if found != wanted:
        raise StateWriteError(
            path,
            f"the folder is already declared with the lock {found.lock!r}, not "
            f"{wanted.lock!r}; use the declared lock (the marker was left as it is)",
            errno=errno.EEXIST,
        )
    return found


def marker_schema() -> dict[str, Any]:
    """The JSON Schema of the marker (``schemas/folder.v1.schema.json``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:statestore:format:folder:v{FORMAT_VERSION}",
        "title": "statestore folder marker",
        "description": "The .statestore-folder.json file that declares a state folder: its "
        "documents share the lock named here and are committed together. Readers ignore "
        "keys they do not know.",
        "type": "object",
        "properties": {
            "format": {
                "const": MARKER_FORMAT,
                "description": "Names this record.",
                "type": "string",
            },
            "format_version": {
                "const": FORMAT_VERSION,
                "description": "Version of this record's format.",
                "type": "integer",
            },
            "lock": {
                "description": "Name of the folder's lock directory, inside the folder: a plain "
                "name, no path separators.",
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "pattern": "^[^/\\\\\\u0000]+$",
                "not": {"enum": [".", "..", MARKER, JOURNAL]},
            },
        },
        "required": ["format", "format_version", "lock"],
    }


# ------------------------------------------------------------------- the journal


def _group_temp(folder: str, name: str, gen: int) -> str:
    token = secrets.token_hex(6)
    return os.path.join(folder, f".{name}.{host_tag()}-{os.getpid()}-{token}.g{gen}.tmp")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _journal_bytes(gen: int, state: str, entries: Iterable[Entry]) -> bytes:
    me = identity()
    body: dict[str, Any] = {
        "format": JOURNAL_FORMAT,
        "format_version": FORMAT_VERSION,
        "gen": gen,
        "state": state,
        "entries": [e._asdict() for e in entries],
        "written_by": {"pid": me.pid, "host": me.host},
    }
    body["sha256"] = _digest(_canonical(body))
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _torn(data: bytes) -> bool:
    if data.strip(b"\0") == b"" or _JOURNAL_HEAD.startswith(data):
        return True
    return data.startswith(_JOURNAL_HEAD)  # (called only for a text that did not parse)


def _parse_journal(path: str, data: bytes) -> Journal:
    def garbled(why: str) -> StateCorruptError:
        return StateCorruptError(
            path,
            f"the folder's journal is garbled ({why}); nothing was changed",
            hint=_INCONSISTENT_HINT,
        )

    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        if _torn(data):
            return Journal(0, "done", (), data, torn=True)
        raise garbled("not JSON") from None
    if not isinstance(record, dict) or record.get("format") != JOURNAL_FORMAT:
        raise garbled(f'not a "{JOURNAL_FORMAT}" record')
    version = record.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SchemaVersionError(
            path, f"was written by a newer statestore (journal format {version}); upgrade"
        )
    body = {k: v for k, v in record.items() if k != "sha256"}
    if record.get("sha256") != _digest(_canonical(body)):
        raise garbled("its checksum does not match its content")
    gen, state, raw_entries = record.get("gen"), record.get("state"), record.get("entries")
    if (
        not isinstance(gen, int)
        or isinstance(gen, bool)
        or gen < 0
        or state not in ("pending", "done")
        or not isinstance(raw_entries, list)
    ):
        raise garbled("bad gen, state or entries")
    entries: list[Entry] = []
    for item in raw_entries:
        if not isinstance(item, dict) or set(item) != set(Entry._fields):
            raise garbled("a bad entry")
        entry = Entry(item["name"], item["temp"], item["sha256"])
        if not all(isinstance(v, str) for v in entry):
            raise garbled("a bad entry")
        if _name_problem(entry.name) or _GROUP_TEMP_RE.fullmatch(entry.temp) is None:
            raise garbled(f"an entry names {entry.name!r} / {entry.temp!r}")
        entries.append(entry)
    return Journal(gen, state, tuple(entries), data)


def read_journal(folder: str | os.PathLike[str]) -> Journal:
    """The folder's journal (no journal: generation 0, done)."""
    path = os.path.join(os.fspath(folder), JOURNAL)
    data = _read_nofollow(path, _JOURNAL_MAX, "folder journal")
    if data is None:
        return Journal(0, "done", (), None)
    return _parse_journal(path, data)


def _write_journal(
    folder: str, gen: int, state: str, entries: Iterable[Entry], *, sync: bool, sync_dir: bool
) -> None:
    path = os.path.join(folder, JOURNAL)
    st = _lstat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise StateWriteError(
            path,
            f"is {file_kind(st.st_mode)}, not the folder's journal; move it away",
            errno=errno.EINVAL,
        )
    tmp = _group_temp(folder, JOURNAL, gen)
    fd = os.open(tmp, _WRITE_FLAGS, 0o666)
    try:
        try:
            _write_all(fd, _journal_bytes(gen, state, entries))
            if sync:
                fsync_file(fd)
        finally:
            os.close(fd)
        if sync:
            # The names of the group's temporary files (and of this record) must be
            # on disk before the record's own name: a power loss may keep a later
            # change of names and lose an earlier one that no folder fsync covered.
            fsync_dir(folder)
        swapped = not sync and st is not None and _exchange(tmp, path)
        if not swapped:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if swapped:
        # The previous record, now under the temporary name. Left behind (a failure
        # here, or a kill), it is a group temporary file of this writer: swept once
        # the writer is gone; no reader or recovery ever reads it.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if sync_dir:
        fsync_dir(folder)


class _Exchange:
    """``renameat2(RENAME_EXCHANGE)`` through ``ctypes`` (Linux), or nothing."""

    unsupported = False

    def __init__(self) -> None:
        self._call: Any = None
        try:
            import ctypes

            # CDLL(None): the C library already loaded (no find_library, which runs programs).
            call = ctypes.CDLL(None, use_errno=True).renameat2
            c_int, c_str = ctypes.c_int, ctypes.c_char_p
            call.argtypes = [c_int, c_str, c_int, c_str, ctypes.c_uint]
            call.restype = ctypes.c_int
            self._call, self._errno = call, ctypes.get_errno
        except (ImportError, OSError, AttributeError):
            self.unsupported = True

    def __call__(self, src: str, dst: str) -> bool:
        """Swap the two names; False when this system or file system cannot."""
        if self.unsupported:
            return False
        if self._call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), 2) == 0:
            return True  # 2: RENAME_EXCHANGE
        err = self._errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            self.unsupported = True  # the file system (or kernel) has no exchange
            return False
        if err == errno.ENOENT:
            return False  # no journal to swap with (gone meanwhile): a plain rename
        raise OSError(err, os.strerror(err), dst)


_AT_FDCWD: Final = -100
_exchange_names: _Exchange | None = None


def _exchange(src: str, dst: str) -> bool:
    global _exchange_names
    if _exchange_names is None:
        _exchange_names = _Exchange()
    return _exchange_names(src, dst)


# ------------------------------------------------------------------------ names


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if name in (".", "..") or "/" in name or "\0" in name:
        return "is not a plain file name directly in the folder (no separators)"
    if os.altsep is not None and os.altsep in name:
        return "is not a plain file name directly in the folder (no separators)"
    if name in (MARKER, JOURNAL) or name.startswith(MARKER + ".") or name.startswith(JOURNAL + "."):
        return "is the folder's own marker or journal"
    if _GROUP_TEMP_RE.fullmatch(name) or _SINGLE_TEMP_RE.fullmatch(name):
        return "has the form of statestore's temporary files"
    return None


def _check_names(folder: str, names: Iterable[str], lock: str | None) -> None:
    for name in names:
        problem = _name_problem(name)
        if problem is None and lock is not None and (name == lock or name.startswith(lock + ".")):
            problem = "is the folder's lock"
        if problem is not None:
            raise StateWriteError(
                os.path.join(folder, str(name)),
                f"{name!r} {problem}: a document of a state folder is a plain file name in "
                "it. Nothing was written",
                errno=errno.EINVAL,
            )


def _lock_name(folder: str) -> str | None:
    try:
        return read_marker(folder).lock
    except StateNotFoundError:
        return None


# ----------------------------------------------------------------- group commit


def _sweep(folder: str, keep: set[str]) -> tuple[list[str], int]:
    """Remove group temporary files of gone writers; also the largest gen any names."""
    removed: list[str] = []
    top = 0
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed, top
    now = time.time()
    for name in names:
        m = _GROUP_TEMP_RE.fullmatch(name)
        if m is None:
            continue
        top = max(top, int(m["gen"]))
        full = os.path.join(folder, name)
        if name in keep or not temp_writer_gone(full, m["tag"], int(m["pid"]), now):
            continue
        st = _lstat(full)
        if st is None or not stat.S_ISREG(st.st_mode):
            continue  # not a file we made: a link or folder under our pattern is left alone
        with contextlib.suppress(OSError):
            os.unlink(full)
            removed.append(full)
    return removed, top


def _regular_or_absent(path: str) -> os.stat_result | None:
    st = _lstat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise StateWriteError(
            path,
            f"is {file_kind(st.st_mode)}, not a regular file: a document of a state folder must "
            "be one (a link is not followed). Move it away; nothing was written",
            errno=errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
        )
    return st


def recover(folder: str | os.PathLike[str]) -> Recovery | None:
    """Finish an unfinished group (the caller holds the lock); None when there was nothing to do."""
    folder = os.fspath(folder)
    journal = read_journal(folder)
    path = os.path.join(folder, JOURNAL)
    keep = {e.temp for e in journal.entries} if journal.state == "pending" else set()
    removed, top = _sweep(folder, keep)
    if journal.torn:
        gen = max(top, 0) + 1
        try:
            _write_journal(folder, gen, "done", (), sync=True, sync_dir=True)
        except OSError as e:
            raise write_error(path, e, "replace the torn journal") from e
        return Recovery(gen, [], [], removed, torn_journal=True)
    if journal.state != "pending":
        return Recovery(journal.gen, [], [], removed) if removed else None
    # Check every entry before renaming any: an inconsistency stops with nothing changed.
    todo: list[Entry] = []
    already: list[str] = []
    for entry in journal.entries:
        final = os.path.join(folder, entry.name)
        temp = os.path.join(folder, entry.temp)
        _regular_or_absent(final)
        data = _read_nofollow(temp, _JOURNAL_MAX * 64, "group's temporary file")
        if data is not None:
            if _digest(data) != entry.sha256:
                raise StateCorruptError(
                    temp,
                    f"group {journal.gen} cannot be completed: this temporary file of "
                    f"{entry.name!r} does not hold the content the journal recorded",
                    hint=_INCONSISTENT_HINT,
                )
            todo.append(entry)
            continue
        current = read_bytes(final)
        if current is None or _digest(current) != entry.sha256:
            raise StateCorruptError(
                final,
                f"group {journal.gen} cannot be completed: its temporary file {entry.temp!r} "
                "is gone and this document does not hold the content the journal recorded"
                + (" (it is missing)" if current is None else ""),
                hint=_INCONSISTENT_HINT,
            )
        already.append(entry.name)
    what = "rename a temporary file over its document"
    try:
        for entry in todo:
            os.replace(os.path.join(folder, entry.temp), os.path.join(folder, entry.name))
        what = "sync the folder"
        fsync_dir(folder)
        what = "mark the group done"
        _write_journal(folder, journal.gen, "done", journal.entries, sync=False, sync_dir=False)
    except OSError as e:
        raise DurabilityError(
            path,
            f"group {journal.gen} is committed but could not be completed ({what}: "
            f"{e.strerror or e}); the next recovery completes it",
            errno=e.errno,
        ) from e
    return Recovery(journal.gen, [e.name for e in todo], already, removed)


def group_commit(
    folder: str | os.PathLike[str],
    changes: Mapping[str, bytes],
    *,
    durable: bool = True,
    verify: Callable[[], None] | None = None,
) -> int:
    """Commit ``changes`` (name -> new bytes) as one group; returns its generation.

    The caller holds the folder's lock; ``verify`` (its fencing check) runs right
    before the commit point, and if it raises nothing is committed.
    """
    folder = os.fspath(folder)
    names = list(changes)
    _check_names(folder, names, _lock_name(folder))
    try:
        olds = {name: _regular_or_absent(os.path.join(folder, name)) for name in names}
    except OSError as e:
        if isinstance(e, StateWriteError):
            raise
        raise write_error(folder, e, "look at the documents") from e
    recover(folder)
    if not names:
        return read_journal(folder).gen
    gen = read_journal(folder).gen + 1
    entries: list[Entry] = []
    made: list[str] = []
    where = os.path.join(folder, names[0])
    what = "create a temporary file"
    try:
        for name in names:
            where = os.path.join(folder, name)
            data = changes[name]
            old = olds[name]
            tmp = _group_temp(folder, name, gen)
            what = "create a temporary file"
            fd = os.open(tmp, _WRITE_FLAGS, 0o666 if old is None else stat.S_IMODE(old.st_mode))
            made.append(tmp)
            try:
                if old is not None:
                    what = "set the owner and mode of the temporary file"
                    keep_owner_and_mode(fd, old)
                what = "write"
                _write_all(fd, data)
                if durable:
                    what = "fsync"
                    fsync_file(fd)
            finally:
                os.close(fd)
            entries.append(Entry(name, os.path.basename(tmp), _digest(data)))
        if verify is not None:
            verify()
        where = os.path.join(folder, JOURNAL)
        what = "write the journal's record"
        many = len(entries) > 1
        if many:
            # The rename of the journal is the commit point: once it is done, the group
            # is committed even if syncing the folder then fails (that is after, below).
            _write_journal(folder, gen, "pending", entries, sync=durable, sync_dir=False)
        else:
            # One document: its rename is atomic and is the commit point itself. The
            # generation moves first (a done record, not synced) so that the journal
            # changes between any two commits, which is what readers rely on.
            _write_journal(folder, gen, "done", entries, sync=False, sync_dir=False)
            what = "rename the temporary file over its document"
            where = os.path.join(folder, entries[0].name)
            os.replace(os.path.join(folder, entries[0].temp), where)
            made = []
    except BaseException as e:
        for tmp in made:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, (StateWriteError, StateReadError)):
            raise write_error(where, e, what) from e
        raise
    # The commit point is behind us: from here on the group is committed.
    what = "sync the folder after the commit record"
    try:
        if durable and many:
            fsync_dir(folder)
        what = "rename a temporary file over its document"
        for entry in entries if many else ():
            os.replace(os.path.join(folder, entry.temp), os.path.join(folder, entry.name))
        if durable:
            what = "sync the folder"
            fsync_dir(folder)
        if many:
            what = "mark the group done"
            _write_journal(folder, gen, "done", entries, sync=False, sync_dir=False)
    except OSError as e:
        raise DurabilityError(
            os.path.join(folder, JOURNAL),
            f"group {gen} is committed, but {what} failed ({e.strerror or e}): "
            + (
                "the next holder of the lock completes it (recover); every document will be new"
                if many
                else "the document is in place; it may not survive a power loss"
            ),
            errno=e.errno,
        ) from e
    return gen


# ------------------------------------------------------------------ lock-free side


def pending(folder: str | os.PathLike[str]) -> PendingGroup | None:
    """The unfinished group, if the journal says there is one (no lock taken, nothing written)."""
    folder = os.fspath(folder)
    journal = read_journal(folder)
    if journal.state != "pending":
        return None
    found: list[tuple[Entry, str]] = []
    for entry in journal.entries:
        temp = read_bytes(os.path.join(folder, entry.temp))
        if temp is not None and _digest(temp) == entry.sha256:
            found.append((entry, "temp"))
            continue
        final = read_bytes(os.path.join(folder, entry.name))
        ok = temp is None and final is not None and _digest(final) == entry.sha256
        found.append((entry, "final" if ok else "inconsistent"))
    return PendingGroup(journal.gen, tuple(found))


def _journal_raw(folder: str) -> bytes | None:
    path = os.path.join(folder, JOURNAL)
    st = _lstat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise StateReadError(
            path,
            f"is {file_kind(st.st_mode)}, not the folder's journal; move it away",
            errno=errno.EINVAL,
        )
    return read_bytes(path, _JOURNAL_MAX)


def read_consistent(
    folder: str | os.PathLike[str],
    names: Iterable[str],
    *,
    timeout: float = 5.0,
    max_size: int | None = None,
) -> dict[str, bytes | None]:
    """A consistent snapshot of ``names`` (None: no such document), without the lock."""
    folder = os.fspath(folder)
    names = list(names)
    _check_names(folder, names, _lock_name(folder))
    path = os.path.join(folder, JOURNAL)
    limit = {} if max_size is None else {"max_size": max_size}
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while True:
        raw1 = _journal_raw(folder)
        j1 = Journal(0, "done", (), None) if raw1 is None else _parse_journal(path, raw1)
        by_name = {e.name: e for e in j1.entries} if j1.state == "pending" else {}
        snapshot: dict[str, bytes | None] = {}
        ok = True
        for name in names:
            entry = by_name.get(name)
            if entry is None:
                snapshot[name] = read_bytes(os.path.join(folder, name), **limit)
                continue
            data = read_bytes(os.path.join(folder, entry.temp), **limit)
            if data is None or _digest(data) != entry.sha256:
                data = read_bytes(os.path.join(folder, name), **limit)
                if data is None or _digest(data) != entry.sha256:
                    ok = False
                    break
            snapshot[name] = data
        if ok and _journal_raw(folder) == raw1:
            return snapshot
        if time.monotonic() > deadline:
            raise StateReadError(
                folder,
                f"no consistent snapshot within {timeout} s: the folder is being written too "
                "fast to get one (or an unfinished group does not match its documents; "
                "`statestore doctor` shows it). Try again, or read under the folder's lock",
                errno=errno.EAGAIN,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
