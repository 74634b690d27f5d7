"""I/O errors at every step of a save, and what a power loss could leave behind.

Faults are injected through the real code path: the ``os`` functions that
``statestore._atomic`` and ``statestore._lock`` call are wrapped in place
(``faultfs``), so the store, the lock and the atomic write run unchanged.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import time
import traceback
from pathlib import Path

import pytest
from conftest import Counter
from faultfs import Countdown, Op, Recorder, crash_outcomes

from statestore import (
    CrossDeviceError,
    DirectoryLock,
    DurabilityError,
    StateStore,
    StateStoreError,
    StateWriteError,
    _atomic,
)
from statestore._document import strip_stamp
from statestore._lock import create
from statestore._lock.handoff import WaitQueue
from statestore._lock.paths import canonical as _canonical
from statestore._lock.record import new_owner

pytestmark = pytest.mark.timeout(300)

ERRNOS = [errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS, errno.EXDEV, errno.EBUSY]
OLD = Counter(count=1, note="old")


def _bump(s: Counter) -> Counter:
    return s.model_copy(update={"count": s.count + 1, "note": "new"})


NEW = _bump(OLD)


def _encoded(model: Counter) -> bytes:
    """The exact bytes the store writes for ``model``, the commit stamp left out
    (it differs from one commit to the next: compare with :func:`_doc`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        StateStore(Counter, os.path.join(d, "s.json")).save(model)
        return strip_stamp(Path(d, "s.json").read_bytes())


def _doc(content: bytes | None) -> bytes | None:
    return None if content is None else strip_stamp(content)


def _docs(outcomes: dict[bytes | None, str]) -> dict[bytes | None, str]:
    return {_doc(c): how for c, how in outcomes.items()}


OLD_BYTES = _encoded(OLD)
NEW_BYTES = _encoded(NEW)


def _everything(*folders: Path) -> list[str]:
    return sorted(
        f"{folder.name}/{p.relative_to(folder)}" for folder in folders for p in folder.rglob("*")
    )


SCENARIOS = [
    "update",
    "save",
    "update-new-file",
    "save-new-file",
    "update-through-symlink",
    "update-after-crash",  # a dead writer's lock and temporary file are in the way
    "update-with-a-waiter",  # another waiter on this host, woken by the release
]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _leave_crash_debris(folder: Path, dead: int) -> bytes:
    """What a writer killed mid-save leaves: its lock and its temporary file."""
    record = dataclasses.replace(new_owner(30.0), pid=dead).to_json()
    (folder / "state.json.lock").mkdir()
    (folder / "state.json.lock" / "owner.json").write_bytes(record)
    (folder / f".state.json.{_atomic._host_tag()}-{dead}-0123456789ab.tmp").write_bytes(b"{")
    return record


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("code", ERRNOS, ids=lambda c: errno.errorcode[c])
def test_countdown_fault_at_every_call_of_a_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, scenario: str
) -> None:
    fs = Countdown(code)
    fs.install(monkeypatch)
    dead = _dead_pid()
    outcomes: dict[str, int] = {}
    fail_at = 0
    while True:
        fail_at += 1
        assert fail_at < 500, "the save never completed"
        case = tmp_path / str(fail_at)
        folder = case / "data"
        folder.mkdir(parents=True)
        path = folder / "state.json"
        target = path
        folders = [folder]
        if scenario.endswith("symlink"):
            elsewhere = case / "real"
            elsewhere.mkdir()
            target = elsewhere / "state.json"
            path.symlink_to("../real/state.json")
            folders.append(elsewhere)
        old = None if scenario.endswith("new-file") else OLD_BYTES
        if old is not None:
            target.write_bytes(old)
        record = _leave_crash_debris(folder, dead) if scenario.endswith("crash") else None
        waiter = None
        if scenario.endswith("waiter"):
            # A waiter queued on this host (it is this process, holding its pipe open):
            # the store does not wait its turn (no patience), and its release wakes it.
            monkeypatch.setattr(create, "QUEUE_PATIENCE", 0.0)
            waiter = WaitQueue(_canonical(f"{path}.lock")).join()
            assert waiter is not None
        before = _everything(*folders)
        store = StateStore(Counter, path, default=OLD if old is None else None)

        fs.arm(fail_at)
        error: BaseException | None = None
        with fs.active():
            try:
                if scenario.startswith("save"):
                    store.save(NEW)
                else:
                    store.update(_bump)
            except BaseException as e:  # judged below, whatever it is
                error = e
        if waiter is not None:
            waiter.leave()
        where = f"fault {fail_at} ({fs.fired}) after calls {fs.calls[-8:]}"
        if error is not None and not isinstance(error, StateStoreError):
            pytest.fail(
                f"{where}: {type(error).__name__} leaked instead of a typed error:\n"
                + "".join(traceback.format_exception(error))
            )
        content = _doc(target.read_bytes()) if target.exists() else None

        if fs.fired is None:  # every call went through: the save completed
            assert error is None, where
            assert content == NEW_BYTES
            # The dead writer's lock was broken and its temporary file swept.
            files = {n for n in before if ".lock" not in n and not n.endswith(".tmp")}
            assert set(_everything(*folders)) == files | {f"{target.parent.name}/state.json"}
            break
        outcomes[type(error).__name__ if error else "saved"] = (
            outcomes.get(type(error).__name__ if error else "saved", 0) + 1
        )
        # Old or new, never anything else; a save that reports success saved.
        assert content in (old, NEW_BYTES), where
        if error is None or isinstance(error, DurabilityError):
            assert content == NEW_BYTES, where
        elif isinstance(error, StateWriteError):
            assert content == old, f"{where}: StateWriteError promises the old file is intact"
        if isinstance(error, OSError):
            assert error.errno == code, f"{where}: {error!r} lost the errno"
        if fs.fired.startswith("replace(") and error is not None:
            expected = CrossDeviceError if code in (errno.EXDEV, errno.EBUSY) else StateWriteError
            assert type(error) is expected, where
        if scenario.endswith("symlink"):
            assert path.is_symlink() and os.readlink(path) == "../real/state.json", where
        # The lock is released: its folder is gone (or, when breaking the dead writer's
        # lock failed, still that untouched lock) and the next acquire succeeds at once.
        lock_dir = Path(f"{path}.lock")
        if record is not None and lock_dir.exists():
            assert os.listdir(lock_dir) == ["owner.json"], where
            assert (lock_dir / "owner.json").read_bytes() == record, where
        else:
            assert not os.path.lexists(lock_dir), f"{where}: {error!r} left the lock behind"
        started = time.monotonic()
        lock = DirectoryLock(f"{path}.lock")
        lock.acquire(timeout=5)
        waited = time.monotonic() - started
        lock.release()
        assert waited < 0.5, where
        # No temporary file (or any other debris) remains; the dead writer's may.
        expected_files = set(before) | ({f"{target.parent.name}/state.json"} if content else set())
        if record is None:
            assert set(_everything(*folders)) == expected_files, where
        else:
            assert set(_everything(*folders)) <= expected_files, where
    # Every step of the save was hit: the fault was fired at least once per call.
    assert fail_at > 10, fs.calls
    assert sum(outcomes.values()) == fail_at - 1


# ------------------------------------------------------------------ power loss


def _record(
    folder: Path, monkeypatch: pytest.MonkeyPatch, *, durable: bool, old: bytes | None
) -> tuple[dict[str, bytes], dict[str, int], list[Op]]:
    """The operations one update makes on the state folder, recorded as they happen."""
    path = folder / "state.json"
    if old is not None:
        path.write_bytes(old)
    store = StateStore(Counter, path, default=OLD, durable=durable)
    store.load()  # nothing to record in reading
    rec = Recorder(str(folder), ignore_prefix="state.json.lock")
    rec.install(monkeypatch)
    inodes = rec.start(os.listdir(folder))
    with rec.active():
        store.update(_bump)
    monkeypatch.undo()
    assert strip_stamp(path.read_bytes()) == NEW_BYTES
    initial = {"state.json": old} if old is not None else {}
    return initial, inodes, rec.ops


def _kinds(ops: list[Op]) -> list[str]:
    return [op.kind for op in ops]


@pytest.mark.parametrize("old", [OLD_BYTES, None], ids=["replace", "first-save"])
def test_power_loss_at_any_point_of_a_durable_save_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: bytes | None
) -> None:
    initial, inodes, ops = _record(tmp_path, monkeypatch, durable=True, old=old)
    # The recorder saw the whole write path, in this order.
    assert _kinds(ops) == ["create", "write", "fsync", "rename", "fsync-dir"], ops
    prefix, suffix = _atomic.temp_pattern(str(tmp_path / "state.json"))
    assert ops[0].name.startswith(prefix) and ops[0].name.endswith(suffix)
    assert ops[3].target == "state.json"

    points = [(p, _docs(o)) for p, o in crash_outcomes(initial, ops, inodes, "state.json")]
    assert len(points) == len(ops) + 1
    for point, outcomes in points:
        bad = {c: how for c, how in outcomes.items() if c not in (old, NEW_BYTES)}
        assert not bad, f"a power loss after {point} operations may leave {bad}"
    # Before the rename nothing changed; after the folder fsync (the save has
    # returned) only the new document can be found.
    assert set(points[0][1]) == {old}
    assert set(points[-1][1]) == {NEW_BYTES}
    # In between, the rename may or may not have reached the disk.
    assert set(points[4][1]) == {old, NEW_BYTES}
    # A torn temporary file was considered (and never reached the state file's name).
    assert sum(len(o) for _, o in points) >= 5


def test_power_loss_model_catches_a_save_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checker can fail: with durable=False the model finds torn and empty files."""
    initial, inodes, ops = _record(tmp_path, monkeypatch, durable=False, old=OLD_BYTES)
    assert _kinds(ops) == ["create", "write", "rename"], ops
    found = {
        content: how
        for _, outcomes in crash_outcomes(initial, ops, inodes, "state.json")
        for content, how in _docs(outcomes).items()
        if content not in (OLD_BYTES, NEW_BYTES)
    }
    written = (tmp_path / "state.json").read_bytes()
    assert b"" in found  # the rename reached the disk, the data did not
    assert written[:10] in found  # torn
    assert bytes(len(written)) in found  # the size reached the disk, the data did not
    # Each of these is a file the store refuses to load: a broken state, not old or new.
    for content in (b"", written[:10]):
        (tmp_path / "state.json").write_bytes(content)
        with pytest.raises(StateStoreError):
            StateStore(Counter, tmp_path / "state.json", read_attempts=1).load()


def test_power_loss_model_catches_a_save_without_the_folder_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the fsync of the folder a save that returned can still be lost."""
    monkeypatch.setattr(_atomic, "_fsync_dir", lambda folder: None)
    initial, inodes, ops = _record(tmp_path, monkeypatch, durable=True, old=OLD_BYTES)
    assert _kinds(ops) == ["create", "write", "fsync", "rename"], ops
    after_return = _docs(crash_outcomes(initial, ops, inodes, "state.json")[-1][1])
    assert OLD_BYTES in after_return, "the model should lose the un-synced rename"
    assert "none of the un-synced changes" in after_return[OLD_BYTES]
