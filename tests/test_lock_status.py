"""``DirectoryLock.status()``: what is at a lock's path, as a frozen ``LockStatus``.

It only looks: each state a lock can be in (free, held, being created, stale)
comes back as such, something that is not a lock raises ``LockError`` like
every other call, and nothing at the path is changed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from statestore import DirectoryLock, LockError, LockStatus


def _tree(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.lstat().st_ino) for p in [path, *path.rglob("*")] if p.exists())


def test_a_free_lock(tmp_path: Path) -> None:
    status = DirectoryLock(tmp_path / "x.lock").status()
    assert status == LockStatus(str(tmp_path / "x.lock"), "free", "free")
    assert not status.stale and status.owner is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.state = "held"  # type: ignore[misc]


def test_a_held_lock_names_its_live_holder(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path / "x.lock")
    with lock:
        before = _tree(tmp_path / "x.lock")
        status = DirectoryLock(tmp_path / "x.lock").status()
        assert _tree(tmp_path / "x.lock") == before
    assert status.state == "held" and not status.stale
    assert status.owner is not None and status.owner.pid == os.getpid()
    assert status.alive is True
    assert status.path == lock.path
    assert f"pid {os.getpid()}" in status.reason


def test_an_empty_directory_is_being_created_then_stale(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.mkdir()
    status = DirectoryLock(path).status()
    assert (status.state, status.owner, status.stale) == ("being created", None, False)
    os.utime(path, (0, 0))  # made long ago: past the creation grace
    status = DirectoryLock(path).status()
    assert (status.state, status.owner, status.stale) == ("stale", None, True)
    assert path.is_dir()  # looked at, not broken


def test_a_dead_holder_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            DirectoryLock(path).acquire(timeout=5)
        finally:
            os._exit(0)  # dies holding it
    os.waitpid(pid, 0)
    status = DirectoryLock(path).status()
    assert status.state == "stale" and status.stale
    assert status.owner is not None and status.owner.pid == pid
    assert status.alive is False
    assert (path / "owner.json").exists()  # status() broke nothing
    assert DirectoryLock(path).break_lock() == status.owner  # what break_lock agrees with


@pytest.mark.parametrize("kind", ["file", "symlink", "foreign folder"])
def test_something_that_is_not_a_lock_is_an_error_and_left_alone(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.lock"
    if kind == "file":
        path.write_text("mine")
    elif kind == "symlink":
        (tmp_path / "target").mkdir()
        path.symlink_to(tmp_path / "target")
    else:
        path.mkdir()
        (path / "project.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(LockError) as e:
        DirectoryLock(path).status()
    assert e.value.path == str(path)
    assert _tree(tmp_path) == before


def test_status_follows_the_file_for_a_file_lock(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "real" / "state.json")
    with DirectoryLock(tmp_path / "real" / "state.json.lock"):
        status = DirectoryLock.for_file(tmp_path / "link.json").status()
    assert status.state == "held"
    assert status.path == str(tmp_path / "real" / "state.json.lock")
