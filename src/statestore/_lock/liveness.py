"""Process identity and liveness: who this process is, and whether another one runs.

A lock's owner record and a claim's tag carry their maker's identity
(:func:`identity`): pid, host, boot id, pid namespace and start time, read from
``/proc`` once per process. :func:`process_alive` judges another process by it.

Rules:

* **Only evidence that cannot collide says "dead".** A host name is not
  unique (cloned images, containers started with the same ``--hostname``,
  "localhost"), so a record is judged from here only when it carries this
  kernel's boot id *and* this process's pid namespace. Then its holder is dead
  when its pid is gone, is a zombie, or now belongs to a process with another
  start time. Anything else (another boot id, another or unknown namespace, no
  boot id at all) is *unknown*: the lease decides.
* **A process we cannot see is not dead.** ``kill(pid, 0)`` failing with
  ``EPERM`` means the process exists. With ``/proc`` mounted ``hidepid=1|2``
  (systemd's ``ProtectProc=invisible``), ``/proc/<pid>`` of another user's
  process is unreadable although the process runs: that is unknown, not dead.
* **A claim tag is checked like an owner record**: a field of the wrong type
  or out of range makes it say nothing (unknown); no such value reaches
  ``kill()``.
* **A forked child is another process**: its cached identity is dropped at
  ``fork()`` and read again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .record import LockOwner

__all__ = [
    "PID_MAX",
    "U64",
    "claim_maker_alive",
    "claim_tag",
    "holder_alive",
    "identity",
    "in_range",
    "process_alive",
]

#: Largest pid any supported system hands out (Linux: PID_MAX_LIMIT is 2**22);
#: a larger one would not fit the system's pid_t, or overflow os.kill().
PID_MAX: Final = 2**22
#: A start time or namespace inode is an unsigned 64-bit number.
U64: Final = 2**64 - 1


@dataclass(frozen=True)
class _Identity:
    pid: int
    host: str
    boot_id: str | None
    start_time: int | None
    pid_ns: int | None


_identity: _Identity | None = None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces
    # or parentheses: split after the last ')'.
    rest = text[text.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[19])  # field 3 is the state, field 22 the start time
    except (IndexError, ValueError):
        return None


def _pid_ns(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def identity() -> _Identity:
    """This process's identity (recomputed after fork)."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity.pid != pid:
        boot = _read_text("/proc/sys/kernel/random/boot_id")
        stat = _proc_stat(pid)
        _identity = _Identity(
            pid=pid,
            host=socket.gethostname(),
            boot_id=boot.strip() if boot else None,
            start_time=stat[1] if stat else None,
            pid_ns=_pid_ns("self"),
        )
    return _identity


def holder_alive(owner: LockOwner) -> bool | None:
    """True or False when it can be told from here; None otherwise (see the module doc)."""
    return process_alive(owner.host, owner.boot_id, owner.pid, owner.start_time, owner.pid_ns)


def claim_tag() -> str:
    """This process's identity, as the target of a claim symlink (made atomically)."""
    me = identity()
    return json.dumps([me.host, me.boot_id, me.pid, me.start_time, me.pid_ns])


def claim_maker_alive(tag: str) -> bool | None:
    """Whether the maker of a claim is alive (None: cannot be told from here).

    The tag is checked like an owner record: a field of the wrong type or out of
    range makes it unusable, and an unusable tag says nothing (None).
    """
    try:
        host, boot_id, pid, start_time, pid_ns = json.loads(tag)
    except (ValueError, TypeError):
        return None
    if not (
        isinstance(host, str)
        and (boot_id is None or isinstance(boot_id, str))
        and in_range(pid, 1, PID_MAX)
        and (start_time is None or in_range(start_time, 0, U64))
        and (pid_ns is None or in_range(pid_ns, 1, U64))
    ):
        return None
    return process_alive(host, boot_id, pid, start_time, pid_ns)


def in_range(value: object, least: int, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def process_alive(
    host: str, boot_id: str | None, pid: int, start_time: int | None, pid_ns: int | None
) -> bool | None:
    """True or False for a process of this kernel and pid namespace; None when that
    cannot be told from here (the module doc has the rules)."""
    me = identity()
    # Only a boot id and a pid namespace that both match make a pid meaningful here:
    # a host name collides, and a record without them cannot be placed at all.
    if host != me.host or not (boot_id and boot_id == me.boot_id):
        return None
    if not (pid_ns and pid_ns == me.pid_ns):
        return None
    if not 1 <= pid <= PID_MAX:
        return None  # never reaches kill(): -1 and 0 address groups, big ones overflow
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return None
    stat = _proc_stat(pid)
    if stat is None:
        # The pid exists (kill said so) but /proc does not show it: /proc mounted with
        # hidepid, or the process ended a moment ago. Unknown: the lease decides.
        return None
    state, start = stat
    if state in ("Z", "X"):  # a zombie has finished running: it will never release
        return False
    if start_time is None:
        return None  # a pid without its start time may have been reused
    return start == start_time


def reset_after_fork() -> None:
    global _identity
    _identity = None


with contextlib.suppress(AttributeError):  # not every platform forks
    os.register_at_fork(after_in_child=reset_after_fork)
