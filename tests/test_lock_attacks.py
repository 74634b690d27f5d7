"""Attacks on the directory lock from outside: odd arguments, odd files, odd processes.

Each test pins one rule of ``src/statestore/_lock.py``'s module docstring (or of
``docs/locking.md``) against an input a hostile or unusual world produces. Attacks
that broke the lock come with the fix; the rest pin behaviour that held.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from statestore import DirectoryLock
from statestore._lock import MAX_LEASE
from statestore._owner import LockOwner, read_owner_at

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ odd leases


@pytest.mark.parametrize("lease", [math.nan, math.inf, 10**13, 10**400, MAX_LEASE * 2, -1.0, 0])
def test_a_lease_no_owner_record_can_carry_is_refused(tmp_path: Path, lease: float) -> None:
    """A NaN, infinite or huge lease used to be written into the owner record, which
    every other process then read as garbage and broke after the creation grace:
    two holders. It is refused when the lock is built."""
    with pytest.raises(ValueError, match="lease"):
        DirectoryLock(tmp_path / "l.lock", lease=lease)
    with pytest.raises(ValueError, match="lease"):
        DirectoryLock.for_file(tmp_path / "s.json", lease=lease)
    assert not (tmp_path / "l.lock").exists()


def test_the_longest_lease_writes_a_record_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "l.lock"
    with DirectoryLock(path, lease=MAX_LEASE):
        owner = LockOwner.from_json(read_owner_at(str(path)))
        assert owner.lease == MAX_LEASE
        # Another process sees a live holder, not garbage to break.
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from statestore import DirectoryLock, LockTimeout\n"
                "try:\n"
                f"    DirectoryLock({str(path)!r}).acquire(timeout=0)\n"
                "except LockTimeout: sys.exit(0)\n"
                "sys.exit(1)",
            ],
            check=False,
        )
        assert r.returncode == 0


# ---------------------------------------------------------------- odd timeouts


@pytest.mark.parametrize("timeout", [10**400, -(10**400)])
def test_a_timeout_too_large_for_a_float_waits_forever(tmp_path: Path, timeout: int) -> None:
    """``timeout=10**400`` used to raise OverflowError: it waits forever, like inf."""
    path = tmp_path / "l.lock"
    DirectoryLock(path, timeout=timeout)  # the constructor accepts it too
    holder = DirectoryLock(path).acquire()
    got: list[object] = []

    def wait() -> None:
        try:
            DirectoryLock(path).acquire(timeout=timeout).release()
            got.append("acquired")
        except Exception as e:  # pragma: no cover - the failure being tested
            got.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    holder.release()
    t.join(10)
    assert got == ["acquired"]


def test_a_negative_zero_timeout_tries_once_and_says_zero(tmp_path: Path) -> None:
    path = tmp_path / "l.lock"
    with DirectoryLock(path):
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from statestore import DirectoryLock, LockTimeout\n"
                "try:\n"
                f"    DirectoryLock({str(path)!r}).acquire(timeout=-0.0)\n"
                "except LockTimeout as e: print(e)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    assert "within 0 s" in r.stdout, r.stdout
    assert "-0" not in r.stdout.split("within")[1][:4]
