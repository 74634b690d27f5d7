"""Who holds a lock, and whether that process is still alive.

The owner record is a small JSON document written inside the lock directory.
It identifies the holder well enough to tell, from the same host, whether it
is still running: a pid alone is not enough (pids are reused), so the record
also carries the process start time, the boot id and the pid namespace.

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
* **Every field is checked on read.** An owner record or a claim tag whose
  fields have the wrong type or are out of range (a pid that is not a valid
  ``pid_t``, a non-finite or absurd time, an oversized string) is unusable,
  exactly like one that does not parse: :meth:`LockOwner.from_json` raises
  ``ValueError``, and the lock judges it by its age, like garbage. No such
  value ever reaches a system call.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LIMITS",
    "OWNER_FILE",
    "RECORD_HEAD",
    "LockOwner",
    "claim_maker_alive",
    "claim_tag",
    "holder_alive",
    "identity",
    "new_owner",
    "process_alive",
    "read_owner_at",
    "write_owner",
]

FORMAT: Final = "statestore.lock-owner"
FORMAT_VERSION: Final = 1
#: The owner record's name inside a lock directory.
OWNER_FILE: Final = "owner.json"
#: How the owner record starts, as this library writes it (see :meth:`LockOwner.to_json`).
RECORD_HEAD: Final = b'{"format": "statestore.lock-owner"'
#: Largest pid any supported system hands out (Linux: PID_MAX_LIMIT is 2**22);
#: a larger one would not fit the system's pid_t, or overflow os.kill().
PID_MAX: Final = 2**22
#: Bounds of the other fields: a start time or namespace inode is an unsigned
#: 64-bit number; times are seconds since the epoch, before the year 33658.
_U64: Final = 2**64 - 1
_TIME_MAX: Final = 10**12
_TEXT_MAX: Final = 255
#: What :meth:`LockOwner.from_json` insists on beyond the types, in JSON Schema terms
#: (``schemas/lock-owner.v1.schema.json`` carries the same).
LIMITS: Final[dict[str, dict[str, float]]] = {
    "token": {"minLength": 1, "maxLength": 128},
    "pid": {"minimum": 1, "maximum": PID_MAX},
    "host": {"maxLength": _TEXT_MAX},
    "boot_id": {"maxLength": 64},
    "start_time": {"minimum": 0, "maximum": _U64},
    "pid_ns": {"minimum": 1, "maximum": _U64},
    "acquired_at": {"minimum": 0, "maximum": _TIME_MAX},
    "expires_at": {"minimum": 0, "maximum": _TIME_MAX},
    "lease": {"exclusiveMinimum": 0, "maximum": _TIME_MAX},
}


@dataclass(frozen=True)
class LockOwner:
    """The owner record of a lock: which process holds it, since when, until when.

    ``expires_at`` is the end of the holder's lease (wall-clock seconds since
    the epoch); the holder pushes it forward while it is alive.
    """

    token: str
    pid: int
    host: str
    boot_id: str | None
    start_time: int | None
    pid_ns: int | None
    acquired_at: float
    expires_at: float
    lease: float

    @property
    def age(self) -> float:
        """Seconds since the lock was acquired (by this host's clock)."""
        return max(0.0, time.time() - self.acquired_at)

    def to_json(self) -> bytes:
        # Built by hand rather than with asdict(), which deep-copies: this runs on
        # every acquire.
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "token": self.token,
            "pid": self.pid,
            "host": self.host,
            "boot_id": self.boot_id,
            "start_time": self.start_time,
            "pid_ns": self.pid_ns,
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
            "lease": self.lease,
        }
        return json.dumps(doc).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> LockOwner:
        """Parse an owner record; raises ValueError on anything malformed or out of range."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a statestore lock owner record")
        version = doc.get("format_version")
        if not _in_range(version, FORMAT_VERSION, FORMAT_VERSION):  # True == 1, but not a version
            raise ValueError(f"unsupported owner record version {_short(version)}")
        try:
            owner = cls(
                token=_text(doc, "token", 1, 128),
                pid=_number(doc, "pid", int, 1, PID_MAX),
                host=_text(doc, "host", 0, _TEXT_MAX),
                boot_id=_optional(doc, "boot_id", lambda: _text(doc, "boot_id", 0, 64)),
                start_time=_optional(
                    doc, "start_time", lambda: _number(doc, "start_time", int, 0, _U64)
                ),
                pid_ns=_optional(doc, "pid_ns", lambda: _number(doc, "pid_ns", int, 1, _U64)),
                acquired_at=_number(doc, "acquired_at", float, 0, _TIME_MAX),
                expires_at=_number(doc, "expires_at", float, 0, _TIME_MAX),
                lease=_number(doc, "lease", float, 5e-324, _TIME_MAX),  # > 0
            )
        except KeyError as e:
            raise ValueError(f"owner record lacks {e}") from None
        return owner

    def describe(self) -> dict[str, Any]:
        """A plain dict for messages and the command line."""
        return {**asdict(self), "age": self.age}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(doc: dict[str, Any], key: str, least: int, most: int) -> str:
    value = doc[key]
    if not isinstance(value, str) or not least <= len(value) <= most:
        raise ValueError(
            f"owner record field {key!r} is not a string of {least} to {most} "
            f"characters: {_short(value)}"
        )
    return value


def _number(doc: dict[str, Any], key: str, kind: type, least: float, most: float) -> Any:
    """An int (``kind`` int) or a finite number (``kind`` float) in [least, most]."""
    value = doc[key]
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    if not ok or not least <= value <= most:
        raise ValueError(f"owner record field {key!r} is out of range: {_short(value)}")
    return float(value) if kind is float else value


def _optional(doc: dict[str, Any], key: str, check: Callable[[], Any]) -> Any:
    return None if doc.get(key) is None else check()


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


def new_owner(lease: float) -> LockOwner:
    me = identity()
    now = time.time()
    return LockOwner(
        token=secrets.token_hex(16),
        pid=me.pid,
        host=me.host,
        boot_id=me.boot_id,
        start_time=me.start_time,
        pid_ns=me.pid_ns,
        acquired_at=now,
        expires_at=now + lease,
        lease=lease,
    )


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
        and _in_range(pid, 1, PID_MAX)
        and (start_time is None or _in_range(start_time, 0, _U64))
        and (pid_ns is None or _in_range(pid_ns, 1, _U64))
    ):
        return None
    return process_alive(host, boot_id, pid, start_time, pid_ns)


def _in_range(value: object, least: int, most: int) -> bool:
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


def read_owner_at(path: str) -> bytes:
    """The first 64 KiB of the owner record in the lock directory ``path``.

    ``O_NOFOLLOW``: a symbolic link planted as the record is not followed;
    ``O_NONBLOCK``: a FIFO planted there reads as empty instead of blocking.
    """
    # os.open and one read, not open(): this runs twice per update (the pre-commit
    # check and the release), and a buffered file object costs four more system calls.
    fd = os.open(
        os.path.join(path, OWNER_FILE),
        os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
    )
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def write_owner(dirfd: int, owner: LockOwner) -> None:
    """Publish an owner record atomically inside the directory behind ``dirfd``."""
    tmp = f"{OWNER_FILE}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
    try:
        try:
            os.write(fd, owner.to_json())
        finally:
            os.close(fd)
        os.replace(tmp, OWNER_FILE, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        raise
