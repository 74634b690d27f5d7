"""State folders attacked as a hostile or unusual world would, and as a new user would.

Real processes, real files, real fsync; the file system calls are only watched
or failed through ``faultfs``'s interposer. Each attack that found a defect has
its test here (with the rule it broke in the module docstring of the fix);
attacks that held are here too when they are cheap to keep.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from faultfs import Countdown, Recorder
from pydantic import BaseModel
from test_fs_edges import run_as_nobody

from statestore import (
    NestedTransactionError,
    StateFolder,
    StateReadError,
    StateStore,
    StateStoreError,
    StateWriteError,
)
from statestore._folder_journal import (
    JOURNAL,
    MARKER,
    Entry,
    _write_journal,
    declare,
    group_commit,
    read_consistent,
    read_journal,
    read_marker,
    recover,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


class Tick(BaseModel):
    n: int = 0


def _fork(fn: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException as e:
            with open(f"/tmp/statestore-attack-child-{os.getpid()}.err", "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
        finally:
            os._exit(code)
    return pid


def _wait_ok(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    err = Path(f"/tmp/statestore-attack-child-{pid}.err")
    assert os.waitstatus_to_exitcode(status) == 0, err.read_text() if err.exists() else status


def _group_temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------- single-document saves and lock-free readers


def _alternate_forever(path: str, pause: float) -> None:
    """Single-document saves, a.json then b.json in turn: a - b is always 0 or 1."""
    folder = StateFolder(path)
    a = folder.store(Tick, "a.json", default=Tick)
    b = folder.store(Tick, "b.json", default=Tick)
    n = a.load().n
    while True:
        n += 1
        a.save(Tick(n=n))
        b.save(Tick(n=n))
        time.sleep(pause)  # leave readers room between the pairs of saves


def _read_pairs(path: str, out: str, deadline: float, consistent: bool) -> None:
    """Read (a, b) until ``deadline``; write how many pairs and how many broke a - b in {0, 1}."""
    module = importlib.import_module("statestore._folder_journal")
    real = module.read_bytes

    def slow(p: str, *args: Any, **kwargs: Any) -> bytes | None:
        data = real(p, *args, **kwargs)
        if p.endswith("a.json"):
            time.sleep(0.03)  # widen the window between the two documents
        return data

    module.read_bytes = slow  # the module's own reads, slowed, not replaced
    folder = StateFolder(path)
    a = folder.store(Tick, "a.json", default=Tick)
    b = folder.store(Tick, "b.json", default=Tick)
    pairs = broken = 0
    seen: set[int] = set()
    # Until the deadline, and on a loaded machine on until a few pairs were read (and,
    # for the naive reader, until it saw a broken one), within a hard bound.
    while time.monotonic() < deadline or (
        time.monotonic() < deadline + 10 and (pairs < 5 or (not consistent and not broken))
    ):
        if consistent:
            snap = folder.read(a, b)
            x, y = snap[a].n, snap[b].n
        else:
            x = json.loads(slow(os.path.join(path, "a.json")) or b"{}")["n"]
            y = json.loads(slow(os.path.join(path, "b.json")) or b"{}")["n"]
        pairs += 1
        broken += (x - y) not in (0, 1)
        seen.add(x)
    Path(out).write_text(json.dumps({"pairs": pairs, "broken": broken, "values": len(seen)}))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_readers_see_single_document_saves_to_two_documents_in_order(tmp_path: Path) -> None:
    """The writer saves a.json then b.json, one document at a time, in turn; readers in
    other processes check a - b in {0, 1} (a mixed pair from two commits breaks it)."""
    path = str(tmp_path / "f")
    folder = StateFolder(path)
    folder.store(Tick, "a.json", default=Tick).save(Tick(n=0))
    folder.store(Tick, "b.json", default=Tick).save(Tick(n=0))
    writer = _fork(_alternate_forever, path, 0.03)
    try:
        deadline = time.monotonic() + 2.0
        outs = [str(tmp_path / f"reader{i}.json") for i in range(3)]
        readers = [
            _fork(_read_pairs, path, out, deadline, i < 2)  # the third: naive per-file reads
            for i, out in enumerate(outs)
        ]
        for pid in readers:
            _wait_ok(pid)
    finally:
        os.kill(writer, signal.SIGKILL)
        os.waitpid(writer, 0)
    results = [json.loads(Path(out).read_text()) for out in outs]
    for r in results[:2]:
        assert r["pairs"] >= 3 and r["broken"] == 0, r
        assert r["values"] >= 2, r  # the writer really committed meanwhile
    # The positive control: reading the two documents one by one does see broken pairs.
    assert results[2]["broken"] > 0, results[2]


def test_a_single_document_save_moves_the_generation_by_an_exchange_of_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal of a one-document save changes by one atomic step, before the
    document's rename, not by a rename over the journal; no temporary file is left."""
    folder = tmp_path / "f"
    folder.mkdir()
    declare(folder)
    group_commit(folder, {"a.json": b'{"n": 1}'})  # a journal is there now
    before = read_journal(folder)
    rec = Recorder(str(folder), ignore_prefix=".statestore.lock")
    rec.install(monkeypatch)
    rec.start(os.listdir(folder))
    with rec.active():
        group_commit(folder, {"a.json": b'{"n": 2}'})
    monkeypatch.undo()
    assert not rec.ignored
    names = [(op.kind, op.name, op.target) for op in rec.ops if op.kind != "write"]
    swaps = [i for i, (kind, _, target) in enumerate(names) if kind == "exchange"]
    assert len(swaps) == 1 and names[swaps[0]][2] == JOURNAL, names
    doc = next(i for i, (k, _, t) in enumerate(names) if k == "rename" and t == "a.json")
    assert swaps[0] < doc, names  # the generation moves before the document does
    assert not [n for n in names if n[0] == "rename" and n[2] == JOURNAL], names
    after = read_journal(folder)
    assert after.gen == before.gen + 1 and after.state == "done"
    assert _group_temps(folder) == []
    assert (folder / "a.json").read_bytes() == b'{"n": 2}'


def test_power_loss_at_any_point_of_a_single_document_save_with_a_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The power-loss model of faultfs over a one-document save whose journal is swapped:
    the document is old or new, the journal is usable (or torn and recognised)."""
    folder = tmp_path / "f"
    folder.mkdir()
    declare(folder)
    group_commit(folder, {"a.json": b'{"n": 1}', "b.json": b'{"n": 1}'})
    import test_folder_journal as tj  # the model of every name at once

    initial = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    rec = Recorder(str(folder), ignore_prefix=".statestore.lock")
    rec.install(monkeypatch)
    rec.start(initial)
    with rec.active():
        group_commit(folder, {"a.json": b'{"n": 2}'})
    monkeypatch.undo()
    assert "exchange" in [op.kind for op in rec.ops]
    states = tj._states(initial, rec.ops)
    assert len(states) > 4
    seen = set()
    for i, state in enumerate(sorted(states, key=sorted)):
        case = tmp_path / f"crash{i}"
        case.mkdir()
        for name, data in state:
            (case / name).write_bytes(data)
        recover(case)
        got = (case / "a.json").read_bytes()
        assert got in (b'{"n": 1}', b'{"n": 2}'), sorted(n for n, _ in state)
        assert (case / "b.json").read_bytes() == b'{"n": 1}'
        assert read_journal(case).state == "done"
        seen.add(got)
        assert read_consistent(case, ["a.json", "b.json"])["a.json"] == got
    assert len(seen) == 2


def _commit_with_unlink_failing(path: str) -> None:
    real = os.unlink

    def refuse(p: Any, *args: Any, **kwargs: Any) -> None:
        if JOURNAL in os.fsdecode(p):
            raise OSError(errno.EIO, "injected")
        real(p, *args, **kwargs)

    os.unlink = refuse
    group_commit(path, {"a.json": b'{"n": 3}'})


def test_the_old_journal_left_by_a_failed_unlink_is_swept_once_its_writer_is_gone(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    declare(folder)
    group_commit(folder, {"a.json": b'{"n": 1}'})
    group_commit(folder, {"a.json": b'{"n": 2}'})
    gen = read_journal(folder).gen
    pid = _fork(_commit_with_unlink_failing, str(folder))
    _wait_ok(pid)  # the save succeeded: the unlink of the old record is not its business
    left = _group_temps(folder)
    assert len(left) == 1 and left[0].startswith("." + JOURNAL + ".") and f"-{pid}-" in left[0]
    assert read_journal(folder).gen == gen + 1
    assert read_consistent(folder, ["a.json"]) == {"a.json": b'{"n": 3}'}
    recover(folder)  # its writer is dead: swept
    assert _group_temps(folder) == []
    assert (folder / "a.json").read_bytes() == b'{"n": 3}'


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_every_call_of_a_single_document_save_failing_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Countdown fault injection at each call of a one-document save whose journal
    exists (the exchange included): a typed error, the document old or new, and the
    next save (the disk has room again) works."""
    fs = Countdown(code)
    fs.install(monkeypatch)
    calls: set[str] = set()
    for n in range(1, 200):
        folder = tmp_path / str(n)
        folder.mkdir()
        declare(folder)
        group_commit(folder, {"a.json": b'{"n": 1}'})
        fs.arm(n)
        error: BaseException | None = None
        try:
            with fs.active():
                group_commit(folder, {"a.json": b'{"n": 2}'})
        except StateStoreError as e:
            error = e
        calls.update(fs.calls)
        got = (folder / "a.json").read_bytes()
        if isinstance(error, (StateWriteError, StateReadError)):
            assert got == b'{"n": 1}', fs.fired
        else:
            assert got == b'{"n": 2}', (fs.fired, error)
        recover(folder)
        assert read_journal(folder).state == "done"
        assert read_consistent(folder, ["a.json"])["a.json"] == got
        group_commit(folder, {"a.json": b'{"n": 3}', "b.json": b'{"n": 3}'})
        assert read_consistent(folder, ["a.json", "b.json"]) == {
            "a.json": b'{"n": 3}',
            "b.json": b'{"n": 3}',
        }
        assert _group_temps(folder) == [] or (fs.fired or "").startswith("unlink"), fs.fired
        if fs.fired is None:
            break
    else:
        raise AssertionError("the save never completed")
    assert "exchange" in calls


# ---------------------------------------------------------- StateFolder(path) of a non-folder


def test_a_folder_path_that_is_a_file_or_under_one_is_a_typed_error(tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(afile)
    for path, code in (
        (afile, errno.ENOTDIR),
        (link, errno.ENOTDIR),
        (afile / "sub", errno.ENOTDIR),
    ):
        with pytest.raises(StateWriteError) as e:
            StateFolder(path)
        assert e.value.errno == code and str(path) in str(e.value)
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["link", "notes.txt"]


def test_a_link_to_a_folder_is_that_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    via_link = StateFolder(tmp_path / "link")
    via_link.store(Tick, "a.json", default=Tick).save(Tick(n=4))
    assert read_marker(real).lock == via_link.marker.lock
    direct = StateFolder(real)
    a = direct.store(Tick, "a.json", default=Tick)
    assert direct.read(a)[a].n == 4


@needs_root
def test_a_folder_another_user_cannot_write_is_a_typed_error(tmp_path: Path) -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="statestore-attack-"))
    try:
        base.chmod(0o755)
        (base / "roots").mkdir()
        (base / "ro").mkdir(mode=0o555)
        (base / "ro").chmod(0o555)
        results = run_as_nobody(
            """
            from statestore import StateFolder
            results["roots"] = attempt(lambda: StateFolder(os.path.join(BASE, "roots")))
            results["new"] = attempt(lambda: StateFolder(os.path.join(BASE, "roots", "sub")))
            results["ro"] = attempt(lambda: StateFolder(os.path.join(BASE, "ro")))
            """,
            BASE=str(base),
        )
        for key in ("roots", "new", "ro"):
            r = results[key]
            assert r.get("typed") and r["error"] in ("StateWriteError", "LockPermissionError"), r
            assert r["errno"] in (errno.EACCES, errno.EPERM), r
        assert os.listdir(base / "roots") == [] and os.listdir(base / "ro") == []
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ declaring the folder


def _declare(path: str, lock: str, out: str, go: Any) -> None:
    go.wait()
    try:
        declare(path, lock=lock)
        Path(out).write_text("ok")
    except StateWriteError as e:
        Path(out).write_text(f"refused {e.errno}")


def test_processes_declaring_at_once_agree_on_one_marker(tmp_path: Path) -> None:
    for trial in range(3):
        path = tmp_path / f"f{trial}"
        path.mkdir()
        go = multiprocessing.get_context("fork").Event()
        locks = [".statestore.lock"] * 3 + [".other.lock"] * 3
        outs = [str(tmp_path / f"out{trial}-{i}") for i in range(len(locks))]
        pids = [
            _fork(_declare, str(path), lk, out, go) for lk, out in zip(locks, outs, strict=True)
        ]
        go.set()
        for pid in pids:
            _wait_ok(pid)
        won = read_marker(path).lock
        for lk, out in zip(locks, outs, strict=True):
            text = Path(out).read_text()
            assert text == ("ok" if lk == won else f"refused {errno.EEXIST}"), (lk, won, text)
        assert [p for p in os.listdir(path) if p != MARKER] == []  # no temporary file left


def _hold_plain_transaction(path: str, ready: str, release: str) -> None:
    store = StateStore(Tick, path, default=Tick)
    with store.transaction() as state:
        n = state.n
        Path(ready).write_text("1")
        while not os.path.exists(release):
            time.sleep(0.005)
        state.n = n + 10


def test_a_folder_declared_while_a_plain_store_is_mid_update_loses_no_update(
    tmp_path: Path,
) -> None:
    """A plain store holds its file's own lock inside a transaction; the folder is then
    declared, and a store of the folder updates the document: neither update is lost."""
    folder = tmp_path / "f"
    folder.mkdir()
    doc = folder / "a.json"
    StateStore(Tick, doc).save(Tick(n=0))
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = _fork(_hold_plain_transaction, str(doc), str(ready), str(release))
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        pid = os.fork()
        if pid == 0:
            time.sleep(0.3)  # the declaration and the folder's update below are under way
            Path(release).write_text("1")
            os._exit(0)
        sf = StateFolder(folder)
        sf.store(Tick, "a.json", default=Tick).update(lambda t: setattr(t, "n", t.n + 1))
        os.waitpid(pid, 0)
    finally:
        release.write_text("1")
        _wait_ok(holder)
    assert StateStore(Tick, doc).load().n == 11


def _async_plain_add_late(path: str, declared: str) -> None:
    """The asyncio face of :func:`_plain_add_late`."""
    import asyncio

    from statestore import AsyncStateStore
    from statestore._lock import AsyncDirectoryLock

    real = AsyncDirectoryLock.acquire
    calls = []

    async def late(self: AsyncDirectoryLock, *args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(self.path)
            while not os.path.exists(declared):
                await asyncio.sleep(0.002)
        return await real(self, *args, **kwargs)

    AsyncDirectoryLock.acquire = late  # type: ignore[method-assign]

    async def main() -> None:
        store = AsyncStateStore(Tick, path, default=Tick, timeout=30)
        async with store.transaction() as state:
            n = state.n
            await asyncio.sleep(0.2)
            state.n = n + 100

    asyncio.run(main())
    assert calls[0].endswith("a.json.lock"), calls  # it did choose its own lock first


def _plain_add_late(path: str, declared: str) -> None:
    """A plain store's update that stalls between choosing its lock and acquiring it
    (a process descheduled there) until the folder has been declared."""
    from statestore._lock import DirectoryLock

    real = DirectoryLock.acquire
    calls = []

    def late(self: DirectoryLock, *args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(self.path)
            while not os.path.exists(declared):
                time.sleep(0.002)
        return real(self, *args, **kwargs)

    DirectoryLock.acquire = late  # type: ignore[method-assign]
    store = StateStore(Tick, path, default=Tick, timeout=30)
    with store.transaction() as state:
        n = state.n
        time.sleep(0.2)
        state.n = n + 100
    assert calls[0].endswith("a.json.lock"), calls  # it did choose its own lock first


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_plain_store_that_chose_its_lock_before_the_folder_was_declared_takes_the_folders(
    tmp_path: Path, face: str
) -> None:
    """A plain store chose the document's own lock, then the folder is declared before it
    acquires it; a store of the folder updates during the plain store's transaction: no
    update is lost (the plain store, holding its own lock, sees the marker and takes the
    folder's lock instead)."""
    folder = tmp_path / "f"
    folder.mkdir()
    doc = folder / "a.json"
    StateStore(Tick, doc).save(Tick(n=0))
    declared = tmp_path / "declared"
    late = _fork(
        _async_plain_add_late if face == "async" else _plain_add_late, str(doc), str(declared)
    )
    time.sleep(0.05)  # it has chosen its lock and stalls
    sf = StateFolder(folder)
    declared.write_text("1")
    time.sleep(0.05)  # it is inside its transaction now (under whichever lock)
    sf.store(Tick, "a.json", default=Tick).update(lambda t: setattr(t, "n", t.n + 1))
    _wait_ok(late)
    assert StateStore(Tick, doc).load().n == 101


# ------------------------------------------------------------------------------ nesting


def test_a_folder_transaction_inside_a_stores_transaction_cannot_touch_its_document(
    tmp_path: Path,
) -> None:
    folder = StateFolder(tmp_path / "f", timeout=2)
    a = folder.store(Tick, "a.json", default=Tick)
    b = folder.store(Tick, "b.json", default=Tick)
    a.save(Tick(n=1))
    with pytest.raises(NestedTransactionError):
        with a.transaction() as outer:
            outer.n = 2
            with folder.transaction() as tx:
                tx[a].n = 50  # would be overwritten by the outer commit
    assert a.load().n == 1 and not b.exists()  # nothing written, by either
    # Through another store of the same file (another spelling of its path) too.
    other = StateStore(Tick, str(tmp_path / "f" / "." / "a.json"))
    with pytest.raises(NestedTransactionError):
        with other.transaction():
            with folder.transaction() as tx:
                tx[a].n = 50
    # Touching only other documents is fine: each commits its own.
    with a.transaction() as outer:
        outer.n = 3
        with folder.transaction() as tx:
            tx[b].n = 7
    assert (a.load().n, b.load().n) == (3, 7)
    # The reverse: a store's call inside a folder transaction is refused as before.
    with pytest.raises(NestedTransactionError):
        with folder.transaction() as tx:
            tx[b].n = 8
            a.save(Tick(n=9))
    assert (a.load().n, b.load().n) == (3, 7)


# ------------------------------------------------------------- readers and the journal


def test_a_reader_that_gets_no_snapshot_gets_a_typed_actionable_error(tmp_path: Path) -> None:
    """A pending group whose documents match neither side (edited by hand, say) keeps a
    lock-free reader from a snapshot: after its bound, a StateReadError naming the
    folder and what to do, not a hang and not a mixed snapshot."""
    folder = tmp_path / "f"
    folder.mkdir()
    declare(folder)
    group_commit(folder, {"a.json": b'{"n": 1}', "b.json": b'{"n": 1}'})
    bogus = Entry("a.json", ".a.json.0e56630b-1-abcdef.g9.tmp", "0" * 64)
    _write_journal(str(folder), 9, "pending", [bogus], sync=False, sync_dir=False)
    started = time.monotonic()
    with pytest.raises(StateReadError) as e:
        read_consistent(folder, ["a.json", "b.json"], timeout=0.3)
    assert time.monotonic() - started < 5
    assert e.value.errno == errno.EAGAIN and str(folder) in str(e.value)
    assert "doctor" in str(e.value) and "lock" in str(e.value)
    assert (folder / "a.json").read_bytes() == b'{"n": 1}'  # a reader changes nothing


def test_a_journal_deleted_by_hand_is_generation_zero_and_saves_go_on(tmp_path: Path) -> None:
    folder = StateFolder(tmp_path / "f")
    a = folder.store(Tick, "a.json", default=Tick)
    b = folder.store(Tick, "b.json", default=Tick)
    with folder.transaction() as tx:
        tx[a].n, tx[b].n = 1, 1
    old = (tmp_path / "f" / JOURNAL).read_bytes()
    (tmp_path / "f" / JOURNAL).unlink()
    snap = folder.read(a, b)
    assert (snap[a].n, snap[b].n) == (1, 1)
    a.save(Tick(n=2))  # generation 1 again, but never the bytes of the deleted record
    with folder.transaction() as tx:
        tx[a].n, tx[b].n = 3, 3
    assert (tmp_path / "f" / JOURNAL).read_bytes() != old
    snap = folder.read(a, b)
    assert (snap[a].n, snap[b].n) == (3, 3) and read_journal(tmp_path / "f").state == "done"


def test_a_link_from_outside_into_the_folder_writes_under_the_folders_lock(
    tmp_path: Path,
) -> None:
    folder = StateFolder(tmp_path / "f")
    a = folder.store(Tick, "a.json", default=Tick)
    a.save(Tick(n=1))
    gen = read_journal(tmp_path / "f").gen
    (tmp_path / "elsewhere.json").symlink_to(tmp_path / "f" / "a.json")
    via = StateStore(Tick, tmp_path / "elsewhere.json")
    assert via.storage.lock.path == folder.lock.path  # type: ignore[attr-defined]
    via.save(Tick(n=2))
    assert read_journal(tmp_path / "f").gen == gen + 1  # through the journal
    assert (tmp_path / "elsewhere.json").is_symlink()  # the link is left as it is
    assert folder.read(a)[a].n == 2


# ------------------------------------------------------------------ tools against a writer


def _transfer_pausing_after_the_commit_point(path: str, paused: str) -> None:
    real = os.replace

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real(src, dst, *args, **kwargs)
        if str(dst).endswith(JOURNAL) and b'"pending"' in Path(dst).read_bytes():
            Path(paused).write_text("1")
            time.sleep(0.8)  # alive, holding the lock, the group committed but not renamed

    os.replace = rename
    folder = StateFolder(path)
    a, b = folder.store(Tick, "a.json", default=Tick), folder.store(Tick, "b.json", default=Tick)
    with folder.transaction() as tx:
        tx[a].n, tx[b].n = 5, 5


def test_doctor_fix_racing_a_live_writer_waits_for_its_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``doctor --fix`` while a live writer is between its commit point and its renames:
    the unfinished group is reported, and the fix completes nothing under the writer's
    feet (it takes the folder's lock: the writer finishes first)."""
    from statestore._cli import main as cli

    path = tmp_path / "f"
    folder = StateFolder(path)
    a, b = folder.store(Tick, "a.json", default=Tick), folder.store(Tick, "b.json", default=Tick)
    with folder.transaction() as tx:
        tx[a].n, tx[b].n = 1, 1
    paused = tmp_path / "paused"
    writer = _fork(_transfer_pausing_after_the_commit_point, str(path), str(paused))
    deadline = time.monotonic() + 20
    while not paused.exists():
        assert time.monotonic() < deadline
        time.sleep(0.002)
    code = cli(["doctor", str(path), "--fix"])
    out = capsys.readouterr().out
    _wait_ok(writer)
    assert code in (0, 1), out
    assert "unfinished group" in out and "finished meanwhile" in out, out
    snap = folder.read(a, b)
    assert (snap[a].n, snap[b].n) == (5, 5)
    assert read_journal(path).state == "done" and _group_temps(path) == []


# ------------------------------------------------------------------------------ asyncio


def test_cancelling_an_async_folder_transaction_at_any_await_keeps_the_sum(
    tmp_path: Path,
) -> None:
    """Cancelled at a random instant (waiting for the lock, loading, committing): each
    group is whole or absent, and the lock is free afterwards."""
    import asyncio
    import random

    from statestore import AsyncStateFolder

    class Bal(BaseModel):
        n: int = 100

    async def main() -> tuple[int, str]:
        af = AsyncStateFolder(tmp_path / "f", timeout=5)
        a = af.sync.store(Bal, "a.json", default=Bal)
        b = af.sync.store(Bal, "b.json", default=Bal)

        async def move() -> None:
            async with af.transaction() as tx:
                x, y = await tx.load(a), await tx.load(b)
                x.n, y.n = x.n - 1, y.n + 1

        rng = random.Random(5)
        for _ in range(60):
            task = asyncio.ensure_future(move())
            await asyncio.sleep(rng.uniform(0, 0.008))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            snap = await af.read(a, b)  # the sync stores, as tx.load takes them
            assert snap[a].n + snap[b].n == 200, (snap[a], snap[b])
        moved = 100 - (await af.read(a, b))[a].n
        return moved, af.sync.lock.status().state

    moved, state = asyncio.run(main())
    assert state == "free"
    assert 0 <= moved <= 60  # a cancel during the commit finishes it first
