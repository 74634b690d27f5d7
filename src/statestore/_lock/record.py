"""The owner record: the small JSON document inside a lock directory that says who holds it.

It identifies the holder well enough to tell, from the same host, whether it is
still running (:mod:`.liveness` judges that): a pid alone is not enough (pids
are reused), so the record also carries the process start time, the boot id
and the pid namespace.

Rules:

* **Every field is checked on read.** An owner record whose fields have the
  wrong type or are out of range (a pid that is not a valid ``pid_t``, a
  non-finite or absurd time, an oversized string) is unusable, exactly like
  one that does not parse: :meth:`LockOwner.from_json` raises ``ValueError``,
  and the lock judges it by its age, like garbage. No such value ever reaches
  a system call.
* **A record is created with ``O_EXCL``, rewritten atomically.** The creator
  writes it with ``O_EXCL`` into the directory it made (``create.py``); the
  heartbeat replaces it through a temporary file and a rename
  (:func:`write_owner`), both through the instance's directory descriptor.
* **A record is read without following links or blocking**
  (:func:`read_owner_at`: ``O_NOFOLLOW | O_NONBLOCK``, at most 64 KiB).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

from .liveness import PID_MAX, U64, identity, in_range

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LIMITS",
    "OWNER_FILE",
    "RECORD_HEAD",
    "LockOwner",
    "new_owner",
    "read_owner_at",
    "write_owner",
]

FORMAT: Final = "statestore.lock-owner"
FORMAT_VERSION: Final = 1
#: The owner record's name inside a lock directory.
OWNER_FILE: Final = "owner.json"
#: How the owner record starts, as this library writes it (see :meth:`LockOwner.to_json`).
RECORD_HEAD: Final = b'{"format": "statestore.lock-owner"'
#: Bounds of the other fields (pids and 64-bit numbers: :mod:`.liveness`): times
#: are seconds since the epoch, before the year 33658.
_TIME_MAX: Final = 10**12
_TEXT_MAX: Final = 255
#: What :meth:`LockOwner.from_json` insists on beyond the types, in JSON Schema terms
#: (``schemas/lock-owner.v1.schema.json`` carries the same).
LIMITS: Final[dict[str, dict[str, float]]] = {
    "token": {"minLength": 1, "maxLength": 128},
    "pid": {"minimum": 1, "maximum": PID_MAX},
    "host": {"maxLength": _TEXT_MAX},
    "boot_id": {"maxLength": 64},
    "start_time": {"minimum": 0, "maximum": U64},
    "pid_ns": {"minimum": 1, "maximum": U64},
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
        if not in_range(version, FORMAT_VERSION, FORMAT_VERSION):  # True == 1, but not a version
            raise ValueError(f"unsupported owner record version {_short(version)}")
        try:
            owner = cls(
                token=_text(doc, "token", 1, 128),
                pid=_number(doc, "pid", int, 1, PID_MAX),
                host=_text(doc, "host", 0, _TEXT_MAX),
                boot_id=_optional(doc, "boot_id", lambda: _text(doc, "boot_id", 0, 64)),
                start_time=_optional(
                    doc, "start_time", lambda: _number(doc, "start_time", int, 0, U64)
                ),
                pid_ns=_optional(doc, "pid_ns", lambda: _number(doc, "pid_ns", int, 1, U64)),
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
