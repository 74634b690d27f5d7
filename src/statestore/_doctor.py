"""``statestore doctor``: look over a state folder after a crash, and tidy it up.

What it finds in one folder (not its subfolders):

* state files that do not parse: every ``*.json`` file, and any other file with
  a lock directory or a backup next to it, read by the store's own rules
  (UTF-8, one JSON object). ``--fix`` moves them into ``.quarantine/`` with a
  UTC timestamp; nothing is ever deleted (daintreehq/daintree#6035). Only into
  a real folder of the doctor's user or of the state folder's owner: a symbolic
  link or another user's folder at that name is refused (it would move the
  file out of its folder, to where someone else chose). A ``.quarantine/`` it
  makes gets the state folder's owner, group and mode (at most 0o775), so the
  folder's programs can see the copy, whatever the doctor's umask;
* stale locks (``*.lock`` directories whose holder is dead or whose lease has
  expired, as the lock itself judges them), and lock directories left renamed
  aside by a release or a break that crashed half-way. ``--fix`` breaks or
  removes them;
* temporary files of writers that died. ``--fix`` removes them;
* backups (``<file>.v<N>.bak``): listed, not problems;
* quarantined copies (``.quarantine/<file>.<UTC time>``) whose state file is
  missing: a problem that needs a person. A store does not start over from its
  default while such a copy is kept (``backends/file.py``): it refuses to start
  and names the copy. So quarantining never turns into a silent reset: after
  ``--fix`` moves a file into quarantine, the doctor says what the program will
  do next (refuse to start) and how to repair the copy and move it back, or
  how to start from the default deliberately (remove the copy).

A state file that is not a regular file (a named pipe, a socket, a device, a
link to one) or is larger than the default ``max_size`` is reported as
unreadable, without being opened or read to the end.

Every change to a state file or its temporary files is made under that file's
lock (``<file>.lock``, beside the file a symlink points to: the store's own
lock), so a doctor never races a live writer; a file whose lock stays busy is
left alone and reported.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Final

from ._atomic import abandoned_temp_files, read_bytes, sweep_temp_files
from ._document import decode
from ._errors import LockError, LockTimeout, StateCorruptError, StateReadError, StateStoreError
from ._folder_journal import JOURNAL, MARKER, pending, read_marker, recover
from ._lock import DirectoryLock, remove_leftover
from .backends.file import QUARANTINE, FileStorage, quarantined_copies

__all__ = ["doctor", "scan"]

#: How long --fix waits for a state file's lock before leaving the file alone.
LOCK_WAIT: Final = 2.0
_BACKUP_RE: Final = re.compile(r"(?P<target>.+)\.v(?P<version>[0-9]+)\.bak", re.DOTALL)
# A lock directory renamed aside ("<lock>.<hex>.broken" / ".released") whose removal crashed.
_ASIDE_RE: Final = re.compile(r".+\.lock\.[0-9a-f]+\.(?:broken|released)", re.DOTALL)
_ORDER: Final = (
    "unfinished group",
    "unparseable",
    "unreadable",
    "quarantined",
    "stale lock",
    "leftover",
    "temp file",
    "lock",
    "backup",
    "kept",
)
_FIX_ORDER: Final = (
    "stale lock",
    "leftover",
    "unfinished group",
    "temp file",
    "unparseable",
    "unreadable",
    "quarantined",
    "lock",
    "backup",
    "kept",
)
#: Problems that --fix cannot repair: a person decides.
_FOR_A_PERSON: Final = ("unreadable", "quarantined")


@dataclass(frozen=True)
class Finding:
    """One thing the doctor noticed in the folder."""

    kind: str  # one of _ORDER
    name: str  # the entry's name in the folder
    detail: str
    problem: bool
    target: str | None = None  # for temp files: the state file they belong to


def _parse_problem(path: str) -> Finding | None:
    name = os.path.basename(path)
    try:
        raw = read_bytes(path)
    except StateReadError as e:
        return Finding("unreadable", name, e.message, True)
    if raw is None:
        return None  # gone since the listing
    try:
        # The store's own reading rules (and messages), without a model to validate against.
        decode(raw, path)
    except StateCorruptError as e:
        where = f"line {e.line}, column {e.column}: " if e.line is not None else ""
        detail = e.message.removesuffix("; the file was left untouched")
        return Finding("unparseable", name, where + detail, True)
    return None


def _lock_finding(path: str) -> Finding | None:
    name = os.path.basename(path)
    try:
        seen = DirectoryLock(path).status()
    except LockError as e:
        return Finding("lock", name, e.message, True)
    if seen.state == "free":
        return None  # released since the listing
    if seen.stale:
        return Finding("stale lock", name, seen.reason, True)
    return Finding("lock", name, seen.reason, False)


def scan(folder: str) -> list[Finding]:
    """Everything worth reporting in ``folder``, problems first."""
    names = sorted(os.listdir(folder))
    temps = abandoned_temp_files(folder)
    temp_names = {os.path.basename(t.path) for t in temps}
    backups = {m.string: m for m in map(_BACKUP_RE.fullmatch, names) if m}
    backed_up = {m["target"] for m in backups.values()}
    found: list[Finding] = []
    for name in names:
        full = os.path.join(folder, name)
        if name == QUARANTINE or name in temp_names:
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            if name.endswith(".lock"):
                found += filter(None, [_lock_finding(full)])
            elif _ASIDE_RE.fullmatch(name):
                found.append(
                    Finding(
                        "leftover",
                        name,
                        "a lock directory set aside by a release or break that did not finish",
                        True,
                    )
                )
            continue
        m = backups.get(name)
        if m is not None:
            detail = f"backup of {m['target']} at schema version {m['version']}"
            found.append(Finding("backup", name, detail, False))
            continue
        state_like = name.endswith(".json") or f"{name}.lock" in names or name in backed_up
        if state_like:
            # Whatever it is (a FIFO, a link to a device): read by the store's rules,
            # which refuse anything but a regular file without opening it.
            found += filter(None, [_parse_problem(full)])
    found += _quarantine_findings(folder)
    if MARKER in names:
        found += _group_findings(folder)
    for t in temps:
        why = (
            f"left by pid {t.pid}, which is no longer running"
            if t.local
            else "left over an hour ago by a process on another host or before a reboot"
        )
        found.append(Finding("temp file", os.path.basename(t.path), why, True, t.target))
    return sorted(found, key=lambda f: (_ORDER.index(f.kind), f.name))


def _group_findings(folder: str) -> list[Finding]:
    """A group commit a crashed writer left unfinished in a declared state folder."""
    try:
        group = pending(folder)
    except StateStoreError as e:
        return [Finding("unreadable", JOURNAL, e.message, True)]
    if group is None:
        return []
    waiting = [e.name for e, where in group.entries if where == "temp"]
    done = [e.name for e, where in group.entries if where == "final"]
    odd = [e.name for e, where in group.entries if where == "inconsistent"]
    if odd:
        detail = (
            f"group {group.gen} is unfinished and {', '.join(odd)} match neither its old "
            "nor its new content (changed by hand meanwhile?): a person must look; "
            "--fix leaves it"
        )
        return [Finding("unreadable", JOURNAL, detail, True)]
    detail = (
        f"group {group.gen} was committed but not finished: --fix renames the new "
        f"{', '.join(waiting) or 'documents'} into place"
        + (f" ({', '.join(done)} already are)" if done else "")
        + "; the next store or folder to take the lock does the same"
    )
    return [Finding("unfinished group", JOURNAL, detail, True)]


def _next_step(folder: str, name: str, copy: str) -> str:
    """What a store of ``name`` does while ``copy`` is quarantined, and what to do about it."""
    here = os.path.join(folder, name)
    return (
        f"a store of {name} now refuses to start (StateMissingError) rather than start over "
        f"from its default; repair the copy, then move it back: mv {shlex.quote(copy)} "
        f"{shlex.quote(here)}; or, to start from the default, delete the copy"
    )


def _quarantine_findings(folder: str) -> list[Finding]:
    """Quarantined copies; a problem when their state file is missing."""
    try:
        kept = os.listdir(os.path.join(folder, QUARANTINE))
    except OSError:
        return []
    found: list[Finding] = []
    originals = sorted({m["target"] for m in map(_QUARANTINED_RE.fullmatch, kept) if m is not None})
    for name in originals:
        copies = quarantined_copies(os.path.join(folder, name))
        if not copies:
            continue
        newest = os.path.join(QUARANTINE, os.path.basename(copies[-1]))
        more = f" (and {len(copies) - 1} older)" if len(copies) > 1 else ""
        if os.path.lexists(os.path.join(folder, name)):
            found.append(
                Finding("kept", newest, f"a quarantined copy of {name}{more}, which is back", False)
            )
        else:
            detail = f"{name} is missing{more}: " + _next_step(folder, name, copies[-1])
            found.append(Finding("quarantined", newest, detail, True, name))
    return found


_QUARANTINED_RE: Final = re.compile(r"(?P<target>.+)\.[0-9]{8}T[0-9]{6}Z(?:-[0-9]+)?", re.DOTALL)


@contextmanager
def _locked(folder: str, target: str) -> Iterator[None]:
    # The store's lock of that file: beside the file a symlink points to.
    # (or, in a declared state folder, the folder's lock)
    with FileStorage(os.path.join(folder, target), timeout=LOCK_WAIT).lock:
        yield


def _quarantine(folder: str, name: str, now: float) -> str:
    qdir = os.path.join(folder, QUARANTINE)
    try:
        os.mkdir(qdir)
    except FileExistsError:
        pass
    else:
        # Made here: it takes the state folder's owner, group and mode (never wider
        # than 0o775), so that the folder's programs can list it (a store looks there
        # before it starts from its default) even when a root with umask 077 made it.
        made = os.stat(folder)
        with suppress(PermissionError):
            os.chown(qdir, made.st_uid, made.st_gid)
        os.chmod(qdir, stat.S_IMODE(made.st_mode) & 0o775)
    # Only into a real folder here, of ours or of the state folder's owner: a symbolic
    # link (or a folder another user made) at that name would move the state file
    # out of its folder, into a place that user chose and controls.
    st = os.lstat(qdir)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(
            f"{qdir} is not a folder (a symbolic link or another file): not moving "
            "the state file there; remove it, or move the file aside by hand"
        )
    if st.st_uid not in (os.geteuid(), os.stat(folder).st_uid):
        raise OSError(
            f"{qdir} belongs to another user (uid {st.st_uid}): not moving the state "
            "file there; remove it, or move the file aside by hand"
        )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    dest, n = f"{name}.{stamp}", 1
    while os.path.lexists(os.path.join(qdir, dest)):
        dest, n = f"{name}.{stamp}-{n}", n + 1
    os.rename(os.path.join(folder, name), os.path.join(qdir, dest))
    return f"{QUARANTINE}/{dest}"


def _fix_one(folder: str, f: Finding, now: float) -> str:
    """Repair one problem; returns what was done. Raises to report a failure."""
    full = os.path.join(folder, f.name)
    if f.kind == "stale lock":
        DirectoryLock(full).break_lock()
        return f"broke the stale lock ({f.detail})"
    if f.kind == "unfinished group":
        with DirectoryLock(read_marker(folder).lock_path, timeout=LOCK_WAIT):
            done = recover(folder)
        return f"completed group {done.gen}" if done else "finished meanwhile"
    if f.kind == "leftover":
        remove_leftover(full)  # only a proven lock instance, never a recursive delete
        return "removed"
    if f.kind == "temp file":
        assert f.target is not None
        with _locked(folder, f.target):
            sweep_temp_files(os.path.join(folder, f.target))
        if os.path.lexists(full):
            raise OSError("still there (its writer may be alive after all)")
        return "removed"
    if f.kind == "unparseable":
        with _locked(folder, f.name):
            if _parse_problem(full) is None:
                return "parses now (rewritten meanwhile): left in place"
            return f"moved to {_quarantine(folder, f.name, now)}"
    if f.kind == "quarantined":
        raise OSError("needs a person: repair the copy and move it back, or delete it")
    raise OSError("cannot be fixed automatically")


def fix(folder: str, findings: list[Finding], out: Callable[[str], None]) -> int:
    """Repair what can be repaired, printing one line per problem; returns how many were fixed."""
    now = time.time()
    fixed = 0
    # Locks first: the files behind them are then free to be tidied under their lock.
    for f in sorted(findings, key=lambda f: _FIX_ORDER.index(f.kind)):
        if not f.problem:
            continue
        try:
            did = _fix_one(folder, f, now)
        except LockTimeout as e:
            holder = f" by pid {e.holder.get('pid')}" if e.holder else ""
            out(
                f"{'not fixed':<10}{f.name}: {f.target or f.name} is locked{holder}; "
                "run doctor again later"
            )
        except (LockError, OSError) as e:
            reason = e.message if isinstance(e, LockError) else (e.strerror or str(e))
            out(f"{'not fixed':<10}{f.name}: {reason}")
        else:
            fixed += 1
            out(f"{'fixed':<10}{f.name}: {did}")
    return fixed


def doctor(folder: str, *, repair: bool, out: Callable[[str], None]) -> int:
    """Scan ``folder`` (and with ``repair``, fix it); print a report; return the exit code."""
    findings = scan(folder)
    for f in findings:
        if f.problem:
            out(f"{'problem':<10}{f.name}: {f.kind}: {f.detail}")
        else:
            out(f"{f.kind:<10}{f.name}: {f.detail}")
    problems = sum(f.problem for f in findings)
    if not problems:
        out("no problems found")
        return 0
    if not repair:
        fixable = sum(f.problem and f.kind not in _FOR_A_PERSON for f in findings)
        if fixable:
            out(
                f"{problems} problem(s); run 'statestore doctor {folder} --fix' to repair "
                + ("them" if fixable == problems else f"{fixable} of them")
            )
        else:
            out(f"{problems} problem(s), which need a person (see above)")
        return 1
    fixed = fix(folder, findings, out)
    after = scan(folder)
    remaining = sum(f.problem for f in after)
    out(f"fixed {fixed} of {problems} problem(s); {remaining or 'none'} remain")
    # Say what the programs will do next: a quarantined file is not a fresh start.
    for f in after:
        if f.kind == "quarantined" and f.problem and f.target is not None:
            out(
                f"{'next':<10}{f.target}: "
                + _next_step(folder, f.target, os.path.join(folder, f.name))
            )
    return 1 if remaining else 0
