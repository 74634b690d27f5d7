"""The folder journal's group commit: every system call failed in turn, the power-loss
model across documents, and a hostile folder (links, pipes, folders, another user's
marker, garbled journals, bad names, temporary files of live processes).

The invariant across documents: three counters whose sum is 300; a group moves
some amount from one to another, so every state is all-old (sum 300, the old
values) or all-new.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultfs import Countdown, Interposer, Op, Recorder

from statestore import (
    DurabilityError,
    SchemaVersionError,
    StateCorruptError,
    StateNotFoundError,
    StateReadError,
    StateStoreError,
    StateWriteError,
)
from statestore._atomic import host_tag, sweep_temp_files
from statestore._folder_journal import (
    JOURNAL,
    MARKER,
    Entry,
    Journal,
    Marker,
    PendingGroup,
    Recovery,
    declare,
    find_folder,
    group_commit,
    pending,
    read_consistent,
    read_journal,
    read_marker,
    recover,
)

pytestmark = pytest.mark.timeout(180)

NAMES = ("a.json", "b.json", "c.json")
OLD = {"a.json": 100, "b.json": 100, "c.json": 100}
NEW = {"a.json": 70, "b.json": 110, "c.json": 120}


def doc(n: int) -> bytes:
    return json.dumps({"count": n}).encode()


def values(folder: Path) -> dict[str, int]:
    return {n: json.loads((folder / n).read_bytes())["count"] for n in NAMES}


def setup(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    declare(folder)
    for n, v in OLD.items():
        (folder / n).write_bytes(doc(v))
    return folder


def group_temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def everything(folder: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.iterdir()):
        out[p.name] = p.read_bytes() if p.is_file() and not p.is_symlink() else "other"
    return out


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# ------------------------------------------------------------------ the basics


def test_a_group_commits_every_document_and_moves_the_generation(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    assert read_journal(folder).gen == 0
    gen = group_commit(folder, {n: doc(v) for n, v in NEW.items()}, durable=True)
    assert gen == 1 and values(folder) == NEW
    j = read_journal(folder)
    assert (j.gen, j.state, [e.name for e in j.entries]) == (1, "done", list(NAMES))
    assert group_temps(folder) == []
    assert group_commit(folder, {"a.json": doc(1)}, durable=True) == 2  # k = 1 moves it too
    assert read_journal(folder).gen == 2
    assert read_consistent(folder, [*NAMES, "new.json"]) == {
        "a.json": doc(1),
        "b.json": doc(110),
        "c.json": doc(120),
        "new.json": None,
    }
    assert recover(folder) is None and pending(folder) is None


def test_new_documents_get_the_default_mode_and_old_ones_keep_theirs(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    os.chmod(folder / "a.json", 0o600)
    old = os.umask(0o022)
    try:
        group_commit(folder, {"a.json": doc(1), "new.json": doc(2)}, durable=True)
    finally:
        os.umask(old)
    assert (folder / "a.json").stat().st_mode & 0o777 == 0o600
    assert (folder / "new.json").stat().st_mode & 0o777 == 0o644


def test_verify_raising_commits_nothing_and_leaves_no_temp(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    before = everything(folder)

    def lost() -> None:
        raise StateWriteError(folder, "the lock was lost")

    with pytest.raises(StateWriteError, match="lock was lost"):
        group_commit(folder, {n: doc(v) for n, v in NEW.items()}, durable=True, verify=lost)
    assert everything(folder) == before


def test_marker_declare_is_idempotent_and_never_replaces(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    assert find_folder(folder / "a.json") is None
    with pytest.raises(StateNotFoundError):
        read_marker(folder)
    m = declare(folder)
    assert m == Marker(str(folder), ".statestore.lock") == declare(folder)
    assert m.lock_path == str(folder / ".statestore.lock")
    assert find_folder(folder / "a.json") == str(folder)
    sub = folder / "sub"
    sub.mkdir()
    assert find_folder(sub / "a.json") is None  # only the direct parent counts
    before = (folder / MARKER).read_bytes()
    with pytest.raises(StateWriteError, match="already declared"):
        declare(folder, lock="other.lock")
    assert (folder / MARKER).read_bytes() == before
    assert group_temps(folder) == []
    for bad in ("a/b", "..", "", MARKER):
        with pytest.raises(StateWriteError):
            declare(tmp_path / "g", lock=bad)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"{not json", StateCorruptError),
        (b'{"format": "other", "format_version": 1, "lock": "x"}', StateCorruptError),
        (
            b'{"format": "statestore.folder", "format_version": 1, "lock": "../x"}',
            StateCorruptError,
        ),
        (
            b'{"format": "statestore.folder", "format_version": 1, "lock": "/tmp/x"}',
            StateCorruptError,
        ),
        (b'{"format": "statestore.folder", "format_version": 2, "lock": "x"}', SchemaVersionError),
        (b'{"format": "statestore.folder", "lock": "x"}', StateCorruptError),
    ],
)
def test_a_bad_marker_is_a_typed_error_and_is_left_alone(
    tmp_path: Path, content: bytes, error: type[Exception]
) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / MARKER).write_bytes(content)
    with pytest.raises(error) as info:
        read_marker(folder)
    assert str(folder / MARKER) in str(info.value)
    with pytest.raises(StateStoreError):
        declare(folder)
    with pytest.raises(StateStoreError):
        find_folder(folder / "a.json")
    assert (folder / MARKER).read_bytes() == content


# ------------------------------------------------------------------ hostile world


def _plant(path: Path, kind: str, elsewhere: Path) -> None:
    if kind == "symlink":
        elsewhere.write_bytes(b'{"count": 5}')
        path.symlink_to(elsewhere)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


KINDS = ["symlink", "fifo", "dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_anything_but_a_regular_file_at_a_final_name_writes_nothing(
    tmp_path: Path, kind: str
) -> None:
    folder = setup(tmp_path / "f")
    (folder / "b.json").unlink()
    _plant(folder / "b.json", kind, tmp_path / "target")
    before = everything(folder)
    with pytest.raises(StateWriteError, match="not a regular file") as info:
        group_commit(folder, {n: doc(v) for n, v in NEW.items()}, durable=True)
    assert str(folder / "b.json") in str(info.value)
    assert everything(folder) == before
    if kind == "symlink":
        assert (tmp_path / "target").read_bytes() == b'{"count": 5}'


@pytest.mark.parametrize("kind", KINDS)
def test_anything_but_a_regular_file_at_the_journal_is_refused(tmp_path: Path, kind: str) -> None:
    folder = setup(tmp_path / "f")
    _plant(folder / JOURNAL, kind, tmp_path / "target")
    before = everything(folder)
    with pytest.raises(StateReadError) as info:
        group_commit(folder, {"a.json": doc(1)}, durable=True)
    assert str(folder / JOURNAL) in str(info.value)
    for call in (recover, pending, lambda f: read_consistent(f, NAMES)):
        with pytest.raises(StateReadError):
            call(folder)
    assert everything(folder) == before
    if kind == "symlink":
        assert (tmp_path / "target").read_bytes() == b'{"count": 5}'


@pytest.mark.parametrize("kind", KINDS)
def test_anything_but_a_regular_file_at_the_marker_is_refused(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    target = tmp_path / "target"
    _plant(folder / MARKER, kind, target)
    if kind == "symlink":  # a link to a perfectly good marker is still not one
        target.write_bytes(b'{"format": "statestore.folder", "format_version": 1, "lock": "x"}')
    before = everything(folder)
    for call in (read_marker, declare, lambda f: find_folder(f / "a.json")):
        with pytest.raises(StateReadError, match="not the folder marker"):
            call(folder)
    assert everything(folder) == before


def _nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user 'nobody'")


def _as_user(uid: int, gid: int, fn: object) -> int:
    """Run ``fn()`` in a forked child as ``uid``; its exit status (0: it returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fn()  # type: ignore[operator]
            code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user can reach (pytest's own is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="statestore-folder-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_another_users_marker_is_not_trusted(open_dir: Path) -> None:
    nobody = _nobody()
    tmp_path = open_dir
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: anyone may create, the folder is root's
    assert _as_user(nobody.pw_uid, nobody.pw_gid, lambda: declare(shared, lock="theirs")) == 0
    assert (shared / MARKER).stat().st_uid == nobody.pw_uid
    with pytest.raises(StateReadError, match="owned by uid") as info:
        read_marker(shared)
    assert str(shared / MARKER) in str(info.value)
    with pytest.raises(StateReadError):
        find_folder(shared / "a.json")
    # The folder's owner's marker is trusted by others (and root's by everyone).
    own = tmp_path / "own"
    own.mkdir()
    os.chown(own, nobody.pw_uid, nobody.pw_gid)
    assert _as_user(nobody.pw_uid, nobody.pw_gid, lambda: declare(own)) == 0
    assert read_marker(own).lock == ".statestore.lock"
    mine = tmp_path / "mine"
    mine.mkdir()
    declare(mine)
    os.chown(mine, nobody.pw_uid, nobody.pw_gid)
    assert _as_user(nobody.pw_uid, nobody.pw_gid, lambda: read_marker(mine)) == 0


@pytest.mark.parametrize(
    "name",
    [
        "a/b.json",
        "../a.json",
        "/etc/passwd",
        "",
        ".",
        "..",
        "a\0b",
        MARKER,
        JOURNAL,
        ".statestore.lock",
        ".statestore.lock.x",
        ".a.json.abcd1234-12-ab12cd.tmp",
        ".a.json.abcd1234-12-ab12cd.g3.tmp",
    ],
)
def test_a_bad_name_writes_nothing(tmp_path: Path, name: str) -> None:
    folder = setup(tmp_path / "f")
    before = everything(folder)
    with pytest.raises(StateWriteError, match="Nothing was written"):
        group_commit(folder, {"a.json": doc(1), name: doc(2)}, durable=True)
    with pytest.raises(StateWriteError):
        read_consistent(folder, [name])
    assert everything(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["f"]


def _journal(folder: Path, record: dict[str, object]) -> None:
    from statestore._folder_journal import _canonical, _digest  # the checksum as written

    body = {k: v for k, v in record.items() if k != "sha256"}
    (folder / JOURNAL).write_bytes(
        json.dumps({**body, "sha256": _digest(_canonical(body))}).encode()
    )


@pytest.mark.parametrize(
    "content",
    [
        b"{garbage",
        b'{"format": "statestore.folder-journal", "gen": 3}',
        b"[1, 2]",
        b'{"format":"statestore.folder-journal","gen":1,"state":"done","entries":[],"sha256":"00"}',
    ],
)
def test_a_garbled_journal_stops_everything(tmp_path: Path, content: bytes) -> None:
    folder = setup(tmp_path / "f")
    (folder / JOURNAL).write_bytes(content)
    before = everything(folder)
    for call in (
        recover,
        pending,
        lambda f: read_consistent(f, NAMES),
        lambda f: group_commit(f, {"a.json": doc(1)}, durable=True),
    ):
        with pytest.raises(StateCorruptError, match="garbled") as info:
            call(folder)
        assert str(folder / JOURNAL) in str(info.value)
    assert everything(folder) == before


def test_a_journal_edited_by_hand_fails_its_checksum(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    group_commit(folder, {"a.json": doc(1), "b.json": doc(2)}, durable=True)
    text = (folder / JOURNAL).read_text().replace('"gen":1', '"gen":7')
    (folder / JOURNAL).write_text(text)
    with pytest.raises(StateCorruptError, match="checksum"):
        recover(folder)


def test_a_journal_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    _journal(folder, {"format": "statestore.folder-journal", "format_version": 2})
    with pytest.raises(SchemaVersionError):
        recover(folder)


@pytest.mark.parametrize(
    "torn",
    [
        b"",
        b"\0" * 180,
        b'{"format":"statestore.folder-jour',
        b'{"format":"statestore.folder-journal","gen":4,"sta',
    ],
)
def test_a_torn_journal_is_replaced_and_the_generation_continues(
    tmp_path: Path, torn: bytes
) -> None:
    folder = setup(tmp_path / "f")
    (folder / f".a.json.{host_tag()}-{dead_pid()}-abc.g9.tmp").write_bytes(b"x")
    (folder / JOURNAL).write_bytes(torn)
    report = recover(folder)
    assert isinstance(report, Recovery) and report.torn_journal and report.gen == 10
    assert group_temps(folder) == []
    assert read_journal(folder).gen == 10
    assert values(folder) == OLD


class FailFirstDocumentRename(Interposer):
    """The first rename onto a document fails: the writer stops right after the commit point."""

    def __init__(self) -> None:
        super().__init__()
        self.fired = False

    def call(self, name: str, real: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name == "replace" and not self.fired and str(args[1]).endswith(".json"):
            self.fired = True
            raise OSError(errno.EIO, "injected")
        return real(*args, **kwargs)


def _pending_group(folder: Path) -> Journal:
    """A committed group whose renames did not happen (the writer died after the commit point)."""
    fs = FailFirstDocumentRename()
    mp = pytest.MonkeyPatch()
    fs.install(mp)
    try:
        with fs.active(), pytest.raises(DurabilityError, match="is committed"):
            group_commit(folder, {n: doc(v) for n, v in NEW.items()}, durable=True)
    finally:
        mp.undo()
    journal = read_journal(folder)
    assert journal.state == "pending"
    return journal


def test_a_pending_group_is_seen_by_readers_and_doctor_and_completed_by_recover(
    tmp_path: Path,
) -> None:
    folder = setup(tmp_path / "f")
    journal = _pending_group(folder)
    assert values(folder) == OLD  # the first rename failed
    seen = pending(folder)
    assert isinstance(seen, PendingGroup) and seen.gen == journal.gen
    assert [state for _, state in seen.entries] == ["temp", "temp", "temp"]
    got = read_consistent(folder, NAMES)
    assert {n: json.loads(b or b"")["count"] for n, b in got.items()} == NEW
    # Half done by hand (as a crash between two renames leaves it):
    entry = journal.entries[0]
    os.replace(folder / entry.temp, folder / entry.name)
    assert [state for _, state in pending(folder).entries] == ["final", "temp", "temp"]  # type: ignore[union-attr]
    report = recover(folder)
    assert report is not None and report.completed == ["b.json", "c.json"]
    assert report.already == ["a.json"] and values(folder) == NEW
    assert read_journal(folder).state == "done" and group_temps(folder) == []


@pytest.mark.parametrize("damage", ["temp-changed", "final-changed", "both-gone"])
def test_recover_refuses_a_group_that_does_not_match_and_changes_nothing(
    tmp_path: Path, damage: str
) -> None:
    folder = setup(tmp_path / "f")
    journal = _pending_group(folder)
    first, second = journal.entries[0], journal.entries[1]
    os.replace(folder / first.temp, folder / first.name)
    if damage == "temp-changed":
        (folder / second.temp).write_bytes(b'{"count": 999}')
        culprit = second.temp
    elif damage == "final-changed":
        (folder / first.name).write_bytes(b'{"count": 999}')
        culprit = first.name
    else:
        (folder / second.temp).unlink()
        culprit = second.name
    before = everything(folder)
    with pytest.raises(StateCorruptError, match="cannot be completed") as info:
        recover(folder)
    assert culprit in str(info.value)
    assert everything(folder) == before
    with pytest.raises(StateCorruptError):
        group_commit(folder, {"a.json": doc(1)}, durable=True)
    assert everything(folder) == before
    assert "inconsistent" in [s for _, s in pending(folder).entries]  # type: ignore[union-attr]
    with pytest.raises(StateReadError, match="too fast"):
        read_consistent(folder, NAMES, timeout=0.05)


def test_temps_of_live_processes_are_kept_and_of_dead_ones_removed(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        tag = host_tag()
        live = folder / f".a.json.{tag}-{child}-aa11.g1.tmp"
        dead = folder / f".a.json.{tag}-{dead_pid()}-bb22.g1.tmp"
        fresh_foreign = folder / ".a.json.0000ffff-1-cc33.g1.tmp"
        old_foreign = folder / ".a.json.0000ffff-1-dd44.g1.tmp"
        link = folder / f".b.json.{tag}-{dead_pid()}-ee55.g1.tmp"
        journal_temp = folder / f".{JOURNAL}.{tag}-{dead_pid()}-ff66.g1.tmp"
        for p in (live, dead, fresh_foreign, old_foreign, journal_temp):
            p.write_bytes(b"x")
        link.symlink_to(folder / "a.json")
        hour_ago = time.time() - 7200
        os.utime(old_foreign, (hour_ago, hour_ago))
        # The single-file sweep never takes a group's temporary files.
        assert sweep_temp_files(str(folder / "a.json")) == []
        report = recover(folder)
        assert report is not None
        assert sorted(report.removed) == sorted(map(str, (dead, old_foreign, journal_temp)))
        assert live.exists() and fresh_foreign.exists() and link.is_symlink()
        group_commit(folder, {"a.json": doc(1)}, durable=True)
        assert live.exists()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    recover(folder)
    assert not live.exists()
    assert values(folder)["a.json"] == 1 and (folder / "a.json").read_bytes() == doc(1)


def test_entries_and_journal_round_trip(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    group_commit(folder, {"a.json": doc(1), "b.json": doc(2)}, durable=False)
    j = read_journal(folder)
    assert all(isinstance(e, Entry) for e in j.entries)
    assert json.loads(j.raw or b"")["written_by"]["pid"] == os.getpid()


# ------------------------------------------------------------------ countdown faults


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("durable", [True, False])
def test_countdown_fault_at_every_call_of_a_group_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, durable: bool
) -> None:
    fs = Countdown(code)
    fs.install(monkeypatch)
    outcomes: dict[str, int] = {}
    for n in itertools.count(1):
        assert n < 400, "the group commit never completed"
        folder = setup(tmp_path / str(n))
        fs.arm(n)
        error: BaseException | None = None
        try:
            with fs.active():
                group_commit(folder, {k: doc(v) for k, v in NEW.items()}, durable=durable)
        except StateStoreError as e:
            error = e
        assert fs.fired is not None or error is None
        kind = "ok" if error is None else type(error).__name__
        outcomes[kind] = outcomes.get(kind, 0) + 1
        if isinstance(error, StateWriteError):
            assert values(folder) == OLD, fs.fired
            assert group_temps(folder) == [] or (fs.fired or "").startswith("unlink"), fs.fired
        assert error is None or isinstance(
            error, (StateWriteError, StateReadError, DurabilityError)
        ), error
        recover(folder)
        got = values(folder)
        assert got in (OLD, NEW), (fs.fired, got)
        assert sum(got.values()) == 300
        if isinstance(error, DurabilityError) or error is None:
            assert got == NEW, fs.fired
        assert read_journal(folder).state == "done"
        assert group_temps(folder) == [] or (fs.fired or "").startswith("unlink"), fs.fired
        if fs.fired is None:
            break
    assert outcomes.get("StateWriteError", 0) > 5 and outcomes.get("DurabilityError", 0) >= 3


# ------------------------------------------------------------------ power loss


def _record(folder: Path, monkeypatch: pytest.MonkeyPatch, *, durable: bool) -> list[Op]:
    rec = Recorder(str(folder), ignore_prefix=".statestore.lock")
    rec.install(monkeypatch)
    inodes = rec.start(os.listdir(folder))
    assert inodes
    with rec.active():
        group_commit(folder, {k: doc(v) for k, v in NEW.items()}, durable=durable)
    monkeypatch.undo()
    assert not rec.ignored
    return rec.ops


def _outcomes(data: bytes) -> list[bytes | None]:
    """What of one un-synced write may reach the disk (None: nothing)."""
    return [None, data[: len(data) // 2], data, bytes(len(data))]


def _states(initial: dict[str, bytes], ops: list[Op]) -> set[frozenset[tuple[str, bytes]]]:
    """Every folder (name -> content) a power loss at any point of ``ops`` may leave.

    The model of ``faultfs.crash_outcomes``, for every name at once: un-synced data
    may be lost, torn or zeros; un-synced name changes may each be lost.
    """
    ino_of = {n: i + 1000 for i, n in enumerate(sorted(initial))}
    synced: dict[int, bytes] = {ino_of[n]: d for n, d in initial.items()}
    unsynced: dict[int, list[tuple[int, bytes]]] = {}
    names = dict(ino_of)
    pending_names: list[Op] = []
    found: set[frozenset[tuple[str, bytes]]] = set()

    def apply(base: dict[str, int], kept: list[Op]) -> dict[str, int]:
        out = dict(base)
        for op in kept:
            if op.kind == "create":
                out.setdefault(op.name, op.ino)
            elif op.kind == "rename" and op.name in out:
                out[op.target] = out.pop(op.name)
            elif op.kind == "exchange" and op.name in out and op.target in out:
                out[op.name], out[op.target] = out[op.target], out[op.name]
            elif op.kind == "unlink":
                out.pop(op.name, None)
        return out

    for point in range(len(ops) + 1):
        for keep in itertools.product((False, True), repeat=len(pending_names)):
            view = apply(names, [o for o, k in zip(pending_names, keep, strict=True) if k])
            inos = sorted({i for i in view.values() if unsynced.get(i)})
            choices = [
                [(i, c) for c in _outcomes(b"".join(d for _, d in unsynced[i]))] for i in inos
            ]
            for pick in itertools.product(*choices):
                got = dict(pick)
                content = {}
                for name, ino in view.items():
                    base = synced.get(ino, b"")
                    extra = got.get(ino)
                    content[name] = base + extra if ino in got and extra is not None else base
                found.add(frozenset(content.items()))
        if point == len(ops):
            break
        op = ops[point]
        if op.kind == "create":
            synced.setdefault(op.ino, b"")
            pending_names.append(op)
        elif op.kind == "write":
            unsynced.setdefault(op.ino, []).append((op.offset, op.data))
        elif op.kind == "fsync":
            synced[op.ino] = synced.get(op.ino, b"") + b"".join(
                d for _, d in unsynced.pop(op.ino, [])
            )
        elif op.kind == "fsync-dir":
            names = apply(names, pending_names)
            pending_names = []
        else:
            pending_names.append(op)
    return found


def _check_after_power_loss(
    tmp_path: Path, states: set[frozenset[tuple[str, bytes]]]
) -> dict[str, int]:
    tally = {"old": 0, "new": 0}
    for i, state in enumerate(sorted(states, key=sorted)):
        folder = tmp_path / f"crash{i}"
        folder.mkdir()
        for name, data in state:
            (folder / name).write_bytes(data)
        recover(folder)
        got = values(folder)
        assert got in (OLD, NEW), (got, sorted(n for n, _ in state))
        tally["old" if got == OLD else "new"] += 1
        assert read_journal(folder).state == "done"
    return tally


def test_power_loss_at_any_point_of_a_durable_group_commit_leaves_all_old_or_all_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = setup(tmp_path / "f")
    group_commit(folder, {"a.json": doc(100)}, durable=True)  # a journal is there already
    initial = {p.name: p.read_bytes() for p in folder.iterdir()}
    ops = _record(folder, monkeypatch, durable=True)
    kinds = [op.kind for op in ops]
    # Every temp fsynced before the journal; the journal fsynced; renames; one fsync.
    # and the folder before the journal's rename, after it, and after the renames.
    assert kinds.count("fsync") == 4 and kinds.count("fsync-dir") == 3
    states = _states(initial, ops)
    assert len(states) > 20
    tally = _check_after_power_loss(tmp_path, states)
    assert tally["old"] and tally["new"]


def test_power_loss_model_catches_a_group_commit_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The positive control: without the fsyncs the model finds a broken folder."""
    folder = setup(tmp_path / "f")
    initial = {p.name: p.read_bytes() for p in folder.iterdir()}
    ops = _record(folder, monkeypatch, durable=False)
    with pytest.raises((AssertionError, StateStoreError, ValueError)):
        _check_after_power_loss(tmp_path, _states(initial, ops))


def test_power_loss_of_a_single_document_group_is_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = setup(tmp_path / "f")
    initial = {p.name: p.read_bytes() for p in folder.iterdir()}
    rec = Recorder(str(folder), ignore_prefix=".statestore.lock")
    rec.install(monkeypatch)
    rec.start(os.listdir(folder))
    with rec.active():
        group_commit(folder, {"a.json": doc(55)}, durable=True)
    monkeypatch.undo()
    kinds = [op.kind for op in rec.ops]
    assert kinds.count("fsync") == 1 and kinds.count("fsync-dir") == 1  # no more than one save
    for i, state in enumerate(sorted(_states(initial, rec.ops), key=sorted)):
        case = tmp_path / f"one{i}"
        case.mkdir()
        for name, data in state:
            (case / name).write_bytes(data)
        recover(case)
        assert values(case)["a.json"] in (100, 55)
        assert read_journal(case).state == "done"
