"""``statestore doctor``: look over a state folder after a crash, and tidy it up.

What it finds in one folder (not its subfolders):

* state files that do not parse: every ``*.json`` file, and any other file with
  a lock directory or a backup next to it, read by the store's own rules
  (UTF-8, one JSON object). ``--fix`` moves them into ``.quarantine/`` with a
  UTC timestamp; nothing is ever deleted (daintreehq/daintree#6035);
* stale locks (``*.lock`` directories whose holder is dead or whose lease has
  expired, as the lock itself judges them), and lock directories left renamed
  aside by a release or a break that crashed half-way. ``--fix`` breaks or
  removes them;
* temporary files of writers that died. ``--fix`` removes them;
* backups (``<file>.v<N>.bak``): listed, not problems.

Every change to a state file or its temporary files is made under that file's
lock (``<file>.lock``, beside the file a symlink points to: the store's own
lock), so a doctor never races a live writer; a file whose lock stays busy is
left alone and reported.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel, ConfigDict

from ._atomic import abandoned_temp_files, read_bytes, sweep_temp_files
from ._errors import LockError, LockTimeout, StateCorruptError, StateReadError
from ._lock import DirectoryLock
from ._store import StateStore

__all__ = ["QUARANTINE", "Finding", "doctor", "fix", "scan"]

QUARANTINE: Final = ".quarantine"
#: How long --fix waits for a state file's lock before leaving the file alone.
LOCK_WAIT: Final = 2.0
_BACKUP_RE: Final = re.compile(r"(?P<target>.+)\.v(?P<version>[0-9]+)\.bak", re.DOTALL)
# A lock directory renamed aside ("<lock>.<hex>.broken" / ".released") whose removal crashed.
_ASIDE_RE: Final = re.compile(r".+\.lock\.[0-9a-f]+\.(?:broken|released)", re.DOTALL)
_ORDER: Final = (
    "unparseable", "unreadable", "stale lock", "leftover", "temp file", "lock", "backup",
)
_FIX_ORDER: Final = (
    "stale lock", "leftover", "temp file", "unparseable", "unreadable", "lock", "backup",
)


class _AnyDocument(BaseModel):
    model_config = ConfigDict(extra="allow")


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
        StateStore(_AnyDocument, path)._decode(raw)
    except StateCorruptError as e:
        where = f"line {e.line}, column {e.column}: " if e.line is not None else ""
        detail = e.message.removesuffix("; the file was left untouched")
        return Finding("unparseable", name, where + detail, True)
    return None


def _lock_finding(path: str) -> Finding | None:
    name = os.path.basename(path)
    try:
        seen = DirectoryLock(path)._observe()
    except LockError as e:
        return Finding("lock", name, e.message, True)
    if seen.ino is None:
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
                        "leftover", name,
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
        if state_like and os.path.isfile(full):
            found += filter(None, [_parse_problem(full)])
    for t in temps:
        why = (
            f"left by pid {t.pid}, which is no longer running"
            if t.local
            else "left over an hour ago by a process on another host or before a reboot"
        )
        found.append(Finding("temp file", os.path.basename(t.path), why, True, t.target))
    return sorted(found, key=lambda f: (_ORDER.index(f.kind), f.name))


@contextmanager
def _locked(folder: str, target: str) -> Iterator[None]:
    # The store's lock of that file: beside the file a symlink points to.
    lock = DirectoryLock.for_file(os.path.join(folder, target), timeout=LOCK_WAIT)
    with lock:
        yield


def _quarantine(folder: str, name: str, now: float) -> str:
    qdir = os.path.join(folder, QUARANTINE)
    os.makedirs(qdir, exist_ok=True)
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
    if f.kind == "leftover":
        shutil.rmtree(full)
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
            out(f"{'not fixed':<10}{f.name}: {f.target or f.name} is locked{holder}; "
                "run doctor again later")
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
        out(f"{problems} problem(s); run 'statestore doctor {folder} --fix' to repair them")
        return 1
    fixed = fix(folder, findings, out)
    remaining = sum(f.problem for f in scan(folder))
    out(f"fixed {fixed} of {problems} problem(s); {remaining or 'none'} remain")
    return 1 if remaining else 0
