"""Who holds a lock, and whether that process is still alive.

The owner record is a small JSON document written inside the lock directory.
It identifies the holder well enough to tell, from the same host, whether it
is still running: a pid alone is not enough (pids are reused), so the record
also carries the process start time and the boot id, and the pid namespace so
that a lock held inside a container is not mistaken for a dead one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "OWNER_FILE",
    "LockOwner",
    "holder_alive",
    "identity",
    "read_owner_at",
    "write_owner",
]

FORMAT: Final = "statestore.lock-owner"
FORMAT_VERSION: Final = 1
#: The owner record's name inside a lock directory.
OWNER_FILE: Final = "owner.json"


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
        """Parse an owner record; raises ValueError on anything malformed."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a statestore lock owner record")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported owner record version {doc.get('format_version')!r}")
        try:
            owner = cls(
                token=_typed(doc, "token", str),
                pid=_typed(doc, "pid", int),
                host=_typed(doc, "host", str),
                boot_id=_optional(doc, "boot_id", str),
                start_time=_optional(doc, "start_time", int),
                pid_ns=_optional(doc, "pid_ns", int),
                acquired_at=float(_typed(doc, "acquired_at", (int, float))),
                expires_at=float(_typed(doc, "expires_at", (int, float))),
                lease=float(_typed(doc, "lease", (int, float))),
            )
        except KeyError as e:
            raise ValueError(f"owner record lacks {e}") from None
        if owner.pid <= 0 or not owner.token:
            raise ValueError("owner record has no valid pid or token")
        return owner

    def describe(self) -> dict[str, Any]:
        """A plain dict for messages and the command line."""
        return {**asdict(self), "age": self.age}


def _typed(doc: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"owner record field {key!r} has the wrong type")
    return value


def _optional(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    return None if value is None else _typed(doc, key, kind)


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
    """True or False on this host; None when the holder is on another host or
    in another pid namespace (only its lease can tell then)."""
    return process_alive(owner.host, owner.boot_id, owner.pid, owner.start_time, owner.pid_ns)


def claim_tag() -> str:
    """This process's identity, as the target of a claim symlink (made atomically)."""
    me = identity()
    return json.dumps([me.host, me.boot_id, me.pid, me.start_time, me.pid_ns])


def claim_maker_alive(tag: str) -> bool | None:
    """Whether the maker of a claim is alive (None: cannot be told from here)."""
    try:
        host, boot_id, pid, start_time, pid_ns = json.loads(tag)
        if not isinstance(pid, int):
            return None
        return process_alive(str(host), boot_id, pid, start_time, pid_ns)
    except (ValueError, TypeError):
        return None


def process_alive(
    host: str, boot_id: str | None, pid: int, start_time: int | None, pid_ns: int | None
) -> bool | None:
    """True or False for a process on this host; None for one on another host or
    in another pid namespace."""
    me = identity()
    if host != me.host:
        return None
    if boot_id and me.boot_id and boot_id != me.boot_id:
        return False
    if pid_ns and me.pid_ns and pid_ns != me.pid_ns:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        # No /proc (not Linux): the pid exists, and that is all we can know.
        return True if not os.path.isdir("/proc/self") else False
    state, start = stat
    if state in ("Z", "X"):  # a zombie has finished running: it will never release
        return False
    return not (start_time is not None and start != start_time)


def reset_after_fork() -> None:
    global _identity
    _identity = None


with contextlib.suppress(AttributeError):  # not every platform forks
    os.register_at_fork(after_in_child=reset_after_fork)


def read_owner_at(path: str) -> bytes:
    # os.open and one read, not open(): this runs twice per update (the pre-commit
    # check and the release), and a buffered file object costs four more system calls.
    fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDONLY | os.O_CLOEXEC)
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
