"""What the file store reads, who may see what it writes, and when a missing file is new.

* Only regular files are read, and at most ``max_size`` bytes: a named pipe, a
  socket, a device, a folder, a link loop, an endless or oversized file are each
  a typed error at once, for ``load()``, ``update()``, the CLI and ``doctor``.
* A temporary file (of a save, of a backup) has its final mode from the
  ``open`` call that creates it; a save by root keeps the file's owner and group.
* A missing file is "new" only when nothing says it existed: a copy quarantined
  by ``doctor --fix``, or an editor's ``<name>~`` while it saves (a real
  rename-then-write loop in another process runs beside real updaters).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter
from faultfs import Interposer
from pydantic import BaseModel

import statestore._atomic as atomic
from statestore import (
    StateMissingError,
    StateNotFoundError,
    StateReadError,
    StateStore,
    StateWriteError,
)
from statestore._cli import main
from statestore._doctor import doctor

HERE = Path(__file__).resolve().parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: to own files as another user")


def _bump(s: Counter) -> None:
    s.count += 1


def _write_state(path: Path, count: int, note: str = "") -> None:
    path.write_text(json.dumps({"schema_version": 1, "count": count, "note": note}, indent=2))


# ------------------------------------------------------- only regular files, bounded


#: How each kind of "not a state file" is made at ``path``; and the words the error uses.
def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _dev_null(path: Path) -> None:
    path.symlink_to("/dev/null")


def _folder(path: Path) -> None:
    path.mkdir()


def _socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the socket file stays


def _loop(path: Path) -> None:
    path.symlink_to(path.name + ".other")
    (path.parent / (path.name + ".other")).symlink_to(path.name)


def _huge(path: Path) -> None:
    # Sparse: larger than the default limit, without using the disk.
    with open(path, "wb") as f:
        f.truncate(atomic.DEFAULT_MAX_SIZE + 1)


KINDS: dict[str, tuple[Callable[[Path], None], str, int]] = {
    "fifo": (_fifo, "is a named pipe (FIFO), not a regular file", errno.EINVAL),
    "/dev/zero": (_dev_zero, "is a character device, not a regular file", errno.EINVAL),
    "/dev/null": (_dev_null, "is a character device, not a regular file", errno.EINVAL),
    "folder": (_folder, "is a folder", errno.EISDIR),
    "socket": (_socket, "is a socket, not a regular file", errno.EINVAL),
    "link loop": (_loop, "is a loop of symbolic links", errno.ELOOP),
    "too large": (
        _huge,
        f"more than the store's limit of {atomic.DEFAULT_MAX_SIZE} bytes",
        errno.EFBIG,
    ),
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.lstat().st_mode, p.lstat().st_size) for p in folder.iterdir()}


@pytest.fixture(params=sorted(KINDS))
def odd(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str, int]:
    make, words, code = KINDS[request.param]
    path = tmp_path / "state.json"
    make(path)
    return path, words, code


@pytest.mark.timeout(10)
def test_load_refuses_what_is_not_a_regular_file(odd: tuple[Path, str, int]) -> None:
    path, words, code = odd
    before = _snapshot(path.parent)
    store = StateStore(Counter, path, default=Counter)
    with pytest.raises(StateReadError) as info:
        store.load()
    assert str(path) in str(info.value) and words in str(info.value)
    assert info.value.errno == code
    assert not isinstance(info.value, StateNotFoundError)
    assert _snapshot(path.parent) == before


@pytest.mark.timeout(10)
def test_update_refuses_it_and_releases_the_lock(odd: tuple[Path, str, int]) -> None:
    path, words, code = odd
    before = _snapshot(path.parent)
    lock = path.parent / "state.lock"  # not next to /dev/zero, where a link points
    store = StateStore(Counter, path, default=Counter, timeout=2, lock=lock)
    for attempt in (lambda: store.update(_bump), lambda: store.save(Counter(count=1))):
        with pytest.raises(StateReadError, match=re.escape(words)) as info:
            attempt()
        assert info.value.errno == code
        assert _snapshot(path.parent) == before  # nothing replaced, no lock left behind
    # Another process is not kept waiting: the lock is free.
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from statestore import DirectoryLock\n"
            "DirectoryLock(sys.argv[1]).acquire(timeout=2); print('free')",
            str(lock),
        ],
        capture_output=True,
        text=True,
        timeout=8,
    )
    assert other.stdout == "free\n", other.stderr


@pytest.mark.timeout(10)
@pytest.mark.parametrize("command", ["show", "validate"])
def test_cli_refuses_it(
    odd: tuple[Path, str, int],
    command: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    path, words, _ = odd
    code = main([command, "cli_fixtures:counter", "--path", str(path)])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith(f"statestore: error: {path}: ") and words in err, err
    assert len(err.splitlines()) == 1


@pytest.mark.timeout(10)
def test_doctor_reports_it_without_reading_it(odd: tuple[Path, str, int]) -> None:
    path, words, _ = odd
    if path.is_dir() and not path.is_symlink():
        pytest.skip("a folder named like a state file is not a state file to the doctor")
    before = _snapshot(path.parent)
    for repair in (False, True):
        lines: list[str] = []
        assert doctor(str(path.parent), repair=repair, out=lines.append) == 1
        assert lines[0].startswith("problem   state.json: unreadable: is") and words in lines[0]
        if repair:
            assert "not fixed state.json: cannot be fixed automatically" in lines
        assert _snapshot(path.parent) == before


@pytest.mark.timeout(10)
def test_the_limit_bounds_what_is_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _write_state(path, 7, note="x" * 500)
    size = path.stat().st_size
    assert StateStore(Counter, path, max_size=size).load().count == 7
    small = StateStore(Counter, path, max_size=size - 1, default=Counter)
    with pytest.raises(StateReadError, match=rf"is {size} bytes, more than .* {size - 1} bytes"):
        small.load()
    with pytest.raises(StateReadError):
        small.update(_bump)
    assert json.loads(path.read_text())["count"] == 7


@pytest.mark.timeout(10)
def test_a_file_whose_size_lies_is_still_bounded(tmp_path: Path) -> None:
    # /proc files are regular with st_size 0, and go on past it: the loop stops at the limit.
    link = tmp_path / "state.json"
    link.symlink_to("/proc/self/maps")
    assert os.stat(link).st_size == 0 and stat.S_ISREG(os.stat(link).st_mode)
    more = "holds more than the store's limit of 64 bytes"
    with pytest.raises(StateReadError, match=more) as info:
        StateStore(Counter, link, max_size=64).load()
    assert info.value.errno == errno.EFBIG
    assert atomic.read_bytes(str(link), 1 << 20)  # within a larger limit it is read whole


def test_a_save_above_the_limit_is_refused(tmp_path: Path) -> None:
    # It could not be read again: the old file stays.
    path = tmp_path / "state.json"
    store = StateStore(Counter, path, default=Counter, max_size=400)
    store.update(_bump)
    before = path.read_bytes()
    with pytest.raises(StateWriteError, match="more than the store's limit of 400") as info:
        store.update(lambda s: Counter(count=2, note="y" * 300))
    assert info.value.errno == errno.EFBIG
    assert path.read_bytes() == before


def test_limits_are_checked_and_apply_to_files_only() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_size"):
            StateStore(Counter, "x.json", max_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing_wait"):
        StateStore(Counter, "x.json", missing_wait=-1)
    with pytest.raises(TypeError, match="file stores only"):
        StateStore(Counter, object(), max_size=10)  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_a_regular_file_swapped_for_a_fifo_after_the_stat_cannot_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the stat and the open a FIFO takes the file's place: O_NONBLOCK and
    # fstat still refuse it.
    path = tmp_path / "state.json"
    _write_state(path, 1)

    class Swap(Interposer):
        def call(
            self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            result = real(*args, **kwargs)
            if name == "stat" and os.fspath(args[0]) == str(path):
                path.unlink()
                os.mkfifo(path)
            return result

    swap = Swap()
    swap.install(monkeypatch)
    with swap.active(), pytest.raises(StateReadError, match="named pipe"):
        atomic.read_bytes(str(path))
    assert stat.S_ISFIFO(path.lstat().st_mode)


# ------------------------------------------------------------ modes of temp files


class CreationModes(Interposer):
    """The mode each file statestore creates has right after the open that creates it."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[str, int]] = []

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = real(*args, **kwargs)
        flags = args[1] if name == "open" and len(args) > 1 else kwargs.get("flags", 0)
        if name == "open" and flags & os.O_CREAT:
            born = stat.S_IMODE(os.fstat(result).st_mode)
            self.created.append((os.path.basename(args[0]), born))
        return result


@pytest.fixture
def creation(monkeypatch: pytest.MonkeyPatch) -> CreationModes:
    rec = CreationModes()
    rec.install(monkeypatch)
    return rec


class V2(BaseModel):
    count: int = 0
    note: str = ""
    extra: int = 0


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o077])
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o666])
def test_temp_files_are_born_with_their_final_mode(
    tmp_path: Path, creation: CreationModes, umask: int, mode: int
) -> None:
    path = tmp_path / "state.json"
    _write_state(path, 1)
    path.chmod(mode)
    store = StateStore(Counter, path, default=Counter)
    v2 = StateStore(V2, path, version=2, migrations={1: lambda d: d})
    old = os.umask(umask)
    try:
        with creation.active():
            store.update(_bump)
            store.save(Counter(count=5))
            with store.transaction() as s:
                s.count += 1
            v2.migrate()  # a backup, then the upgraded file
    finally:
        os.umask(old)
    temps = [(n, m) for n, m in creation.created if n.startswith(".state.json.")]
    assert len(temps) == 5, creation.created
    assert {n.startswith(".state.json.v1.bak.") for n, _ in temps} == {True, False}
    for name, born in temps:
        # Never more open than the state file, not even for a moment ...
        assert born & ~mode == 0, (name, oct(born), oct(mode))
        # ... and exactly its mode when the umask allows it.
        assert born == mode & ~umask, (name, oct(born))
    for final in (path, tmp_path / "state.json.v1.bak"):
        assert stat.S_IMODE(final.stat().st_mode) == mode, final


def test_a_new_file_gets_the_umask(tmp_path: Path, creation: CreationModes) -> None:
    path = tmp_path / "state.json"
    old = os.umask(0o027)
    try:
        with creation.active():
            StateStore(Counter, path, default=Counter).update(_bump)
    finally:
        os.umask(old)
    ((_, born),) = [c for c in creation.created if c[0].startswith(".state.json.")]
    assert born == 0o640 == stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------- owners stay


def _nobody() -> tuple[int, int]:
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("there is no user 'nobody' on this machine")
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:  # pragma: no cover
        gid = user.pw_gid
    return user.pw_uid, gid


def _owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _as_user(uid: int, gid: int, groups: list[int], fn: Callable[[], object]) -> str:
    """Run ``fn`` in a forked child as ``uid``; returns "ok" or the error it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            fn()
            text = "ok"
        except BaseException as e:
            text = f"{type(e).__name__}: {e}"
        os.write(w, text.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="statestore-owners-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@needs_root
def test_a_save_by_root_keeps_owner_and_group(shared: Path) -> None:
    uid, gid = _nobody()
    path = shared / "state.json"
    _write_state(path, 1, note="the app's")
    os.chown(path, uid, gid)
    path.chmod(0o600)
    store = StateStore(Counter, path, default=Counter)
    store.update(_bump)
    assert _owner(path) == (uid, gid, 0o600)
    store.save(Counter(count=10))
    assert _owner(path) == (uid, gid, 0o600)
    with store.transaction() as s:
        s.count += 1
    assert _owner(path) == (uid, gid, 0o600)
    report = StateStore(V2, path, version=2, migrations={1: lambda d: d}).migrate()
    assert report.written and report.backup is not None
    assert _owner(path) == (uid, gid, 0o600)
    assert _owner(Path(report.backup)) == (uid, gid, 0o600)
    # The app, as itself, still reads and updates its own file.
    app = StateStore(V2, path, version=2, lock=shared / "app.lock")
    assert (
        _as_user(
            uid, gid, [], lambda: app.update(lambda s: s.model_copy(update={"count": s.count + 1}))
        )
        == "ok"
    )
    assert json.loads(path.read_text())["count"] == 12
    assert _owner(path) == (uid, gid, 0o600)


@needs_root
def test_a_set_id_bit_survives_the_chown(shared: Path) -> None:
    uid, gid = _nobody()
    path = shared / "state.json"
    _write_state(path, 1)
    os.chown(path, uid, gid)
    # chown clears set-user-ID and set-group-ID (of a group-executable file): the mode
    # is set after it.
    path.chmod(0o6750)
    StateStore(Counter, path).update(_bump)
    assert _owner(path) == (uid, gid, 0o6750)


@needs_root
def test_a_user_who_may_not_chown_still_saves_and_keeps_the_group(shared: Path) -> None:
    uid, gid = _nobody()
    users = grp.getgrnam("users").gr_gid if "users" in {g.gr_name for g in grp.getgrall()} else 100
    path = shared / "state.json"
    _write_state(path, 1)
    os.chown(path, 0, users)
    path.chmod(0o666)
    store = StateStore(Counter, path, lock=shared / "state.lock")
    # A member of the file's group: the owner becomes the saver, the group stays.
    assert _as_user(uid, gid, [users], lambda: store.update(_bump)) == "ok"
    assert _owner(path) == (uid, users, 0o666)
    # Not a member: the save still works (EPERM is not an error), in the saver's group.
    os.chown(path, 0, users)
    assert _as_user(uid, gid, [], lambda: store.update(_bump)) == "ok"
    assert _owner(path) == (uid, gid, 0o666)
    assert json.loads(path.read_text())["count"] == 3


# ------------------------------------------------- quarantine: not a fresh start


def _hand_edit_with_a_typo(path: Path) -> None:
    path.write_text('{\n  "schema_version": 1,\n  "count": 41,\n  "note": "mine",\n}\n')


@pytest.mark.timeout(20)
def test_after_doctor_quarantines_a_file_the_store_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _hand_edit_with_a_typo(path)
    lines: list[str] = []
    assert doctor(str(tmp_path), repair=True, out=lines.append) == 1
    (copy,) = (tmp_path / ".quarantine").iterdir()
    assert any(
        line.startswith("next      state.json: a store of state.json now refuses") for line in lines
    ), lines
    store = StateStore(Counter, path, default=Counter)
    before = sorted(p.name for p in tmp_path.iterdir())

    def refused(attempt: Callable[[], object]) -> StateMissingError:
        with pytest.raises(StateMissingError) as info:
            attempt()
        return info.value

    def in_transaction() -> None:
        with store.transaction():
            pass

    for attempt in (
        store.load,
        lambda: store.update(_bump),
        in_transaction,
        lambda: store.save(Counter()),
        StateStore(Counter, path).load,
    ):  # without a default too
        e = refused(attempt)
        assert e.path == str(path) and str(copy) in e.message and "mv " in e.message
        assert e.errno == errno.ENOENT
        assert not isinstance(e, FileNotFoundError)  # "not found -> fresh state" code skips it
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    # Repaired and moved back, as the message says: the user's state, not the default.
    _write_state(copy, 41, "mine")
    copy.rename(path)
    assert store.load() == Counter(count=41, note="mine")


@pytest.mark.timeout(20)
def test_deleting_the_quarantined_copy_is_the_deliberate_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _hand_edit_with_a_typo(path)
    doctor(str(tmp_path), repair=True, out=lambda line: None)
    store = StateStore(Counter, path, default=Counter)
    with pytest.raises(StateMissingError):
        store.load()
    (copy,) = (tmp_path / ".quarantine").iterdir()
    copy.unlink()
    assert store.update(_bump) == Counter(count=1)
    lines: list[str] = []
    assert doctor(str(tmp_path), repair=False, out=lines.append) == 0, lines


def test_a_quarantined_copy_of_another_file_does_not_count(tmp_path: Path) -> None:
    (tmp_path / ".quarantine").mkdir()
    for name in (
        "other.json.20260101T000000Z",
        "state.json.bak",
        "state.jsonx.20260101T000000Z",
        "state.json.20260101T000000",
    ):
        (tmp_path / ".quarantine" / name).write_text("{")
    store = StateStore(Counter, tmp_path / "state.json", default=Counter, missing_wait=60)
    assert store.load() == Counter()
    (tmp_path / ".quarantine" / "state.json.20260101T000000Z-2").write_text("{")
    with pytest.raises(StateMissingError, match=r"state\.json\.20260101T000000Z-2"):
        store.load()


def test_a_restored_file_makes_the_copy_history(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _hand_edit_with_a_typo(path)
    doctor(str(tmp_path), repair=True, out=lambda line: None)
    _write_state(path, 3)
    lines: list[str] = []
    assert doctor(str(tmp_path), repair=False, out=lines.append) == 0
    assert re.fullmatch(
        r"kept      \.quarantine/state\.json\.[0-9T]+Z: a quarantined copy of "
        r"state\.json, which is back",
        lines[0],
    ), lines


# --------------------------------------------- an editor's save is not a fresh start


@pytest.mark.timeout(10)
def test_no_traces_means_new_at_once(tmp_path: Path) -> None:
    # A wait of a minute would time the test out: a new file does not wait at all.
    (tmp_path / "state.json.v1.bak").write_text("{}")  # statestore's own backups do not count
    store = StateStore(Counter, tmp_path / "state.json", default=Counter, missing_wait=60)
    assert store.load() == Counter()
    assert store.update(_bump) == Counter(count=1)


@pytest.mark.timeout(10)
def test_an_editor_backup_left_alone_is_an_error_not_a_reset(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _write_state(path, 9)
    path.rename(tmp_path / "state.json~")  # the editor's first step; it never wrote the new file
    store = StateStore(Counter, path, default=Counter, missing_wait=0.2)
    for attempt in (store.load, lambda: store.update(_bump)):
        with pytest.raises(StateMissingError, match=r"state\.json~ is there") as info:
            attempt()
        assert "mv " in info.value.message and "within 0.2 s" in info.value.message
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json~"]


@pytest.mark.timeout(10)
def test_the_file_an_editor_writes_is_read_when_it_comes(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _write_state(path, 9)
    path.rename(tmp_path / "state.json~")
    store = StateStore(Counter, path, default=Counter, missing_wait=30)

    def finish_the_save() -> None:
        time.sleep(0.1)
        _write_state(path, 10, "edited")
        (tmp_path / "state.json~").unlink()

    t = threading.Thread(target=finish_the_save)
    t.start()
    try:
        assert store.update(_bump) == Counter(count=11, note="edited")
    finally:
        t.join()


@pytest.mark.timeout(10)
def test_an_editor_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    _write_state(real, 4)
    link = tmp_path / "state.json"
    link.symlink_to("real.json")
    real.rename(tmp_path / "real.json~")
    with pytest.raises(StateMissingError, match=r"real\.json~"):
        StateStore(Counter, link, default=Counter, missing_wait=0.1).load()


class EditorBetweenCalls(Interposer):
    """An editor that takes one step of its save between system calls of the store.

    Its save is vim's: rename the file to ``<name>~``, write the new file, remove
    the backup; ``burst`` steps every ``every`` calls (an editor faster than the
    store, as when the store is descheduled), from the ``start``-th call on, for
    ``saves`` saves. Every moment of a save falls between two calls of the
    store for some of these: none may look like "no file".
    """

    def __init__(self, path: Path, every: int, start: int, burst: int, saves: int) -> None:
        super().__init__()
        self.path, self.aside = path, path.with_name(path.name + "~")
        self.every, self.start, self.burst, self.saves = every, start, burst, saves
        self.calls = self.step = 0

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.calls += 1
        due = self.calls >= self.start and (self.calls - self.start) % self.every == 0
        for _ in range(self.burst if due else 0):
            if not self.saves:
                break
            if self.step == 0:
                os.rename(self.path, self.aside)
            elif self.step == 1:
                # Keeping a newer file that a save of the store put there meanwhile
                # (O_EXCL), so that an increment lost would be the store's doing.
                with contextlib.suppress(FileExistsError), open(self.path, "xb") as f:
                    f.write(self.aside.read_bytes())
            else:
                os.unlink(self.aside)
                self.saves -= 1
            self.step = (self.step + 1) % 3
        return real(*args, **kwargs)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("start", range(1, 7))
@pytest.mark.parametrize("burst", [1, 2])
@pytest.mark.parametrize("every", [1, 2, 3])
def test_an_editor_step_between_any_two_calls_is_not_a_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int, start: int, burst: int
) -> None:
    path = tmp_path / "state.json"
    _write_state(path, 7, "mine")
    store = StateStore(Counter, path, default=Counter, missing_wait=10)
    editor = EditorBetweenCalls(path, every, start, burst, saves=20)
    editor.install(monkeypatch)
    with editor.active():
        assert store.load() == Counter(count=7, note="mine")
        assert store.update(_bump) == Counter(count=8, note="mine")
        assert store.load().count == 8
    assert editor.calls > 0


class ScheduledEditor(Interposer):
    """vim's save, taken ``schedule[i]`` steps at a time before the store's i-th call.

    Once the schedule is over, the editor finishes the save it is in. Trying every
    schedule of a few calls puts every pair of the editor's states around every
    pair of the store's calls, including an editor that finishes a save and
    starts the next between two calls of the store.
    """

    def __init__(self, path: Path, schedule: tuple[int, ...]) -> None:
        super().__init__()
        self.path, self.aside = path, path.with_name(path.name + "~")
        self.schedule = schedule
        self.calls = self.step = 0

    def _advance(self) -> None:
        if self.step == 0:
            os.rename(self.path, self.aside)
        elif self.step == 1:
            self.path.write_bytes(self.aside.read_bytes())
        else:
            os.unlink(self.aside)
        self.step = (self.step + 1) % 3

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.calls < len(self.schedule):
            for _ in range(self.schedule[self.calls]):
                self._advance()
        else:
            while self.step:
                self._advance()
        self.calls += 1
        return real(*args, **kwargs)


@pytest.mark.timeout(60)
def test_no_schedule_of_an_editor_makes_a_missing_file_look_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itertools

    path = tmp_path / "state.json"
    _write_state(path, 7, "mine")
    store = StateStore(Counter, path, default=Counter, missing_wait=10)
    tried = 0
    for schedule in itertools.product((0, 1, 2), repeat=7):
        if schedule[0] == 0:
            continue  # the file must be missing at the first look for this to matter
        editor = ScheduledEditor(path, schedule)
        with monkeypatch.context() as m:
            editor.install(m)
            with editor.active():
                assert store.load() == Counter(count=7, note="mine"), schedule
        while editor.step:  # finish the save the store's last call left it in
            editor._advance()
        assert path.exists() and not editor.aside.exists()
        tried += 1
    assert tried == 2 * 3**6


EDITOR = textwrap.dedent("""
    import os, sys, time
    path, stop, exclusive = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    aside = path + "~"
    saves = clobbered = 0
    while not os.path.exists(stop):
        # vim's and Emacs's save: rename the file aside, write the new one, drop the backup.
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        with open(aside, "rb") as f:
            data = f.read()
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            clobbered += 1  # a save of the store came in between: leave the newer file
        else:
            os.write(fd, data)
            os.close(fd)
            saves += 1
        os.unlink(aside)
    print(saves, clobbered)
""")

UPDATER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[3])
    from conftest import Counter
    from statestore import StateStore
    # read_attempts: the editor's new file may be seen before its bytes are in.
    store = StateStore(Counter, sys.argv[1], default=Counter, durable=False, missing_wait=30,
                       timeout=60, read_attempts=500, read_delay=0.002)
    seen = []
    for _ in range(int(sys.argv[2])):
        def bump(s):
            s.count += 1
        seen.append(store.update(bump).count)
        seen.append(store.load().count)
    print(json.dumps(seen))
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("exclusive", [True, False], ids=["editor-keeps-newer", "editor-truncates"])
def test_updates_beside_a_rename_then_write_editor_loop(tmp_path: Path, exclusive: bool) -> None:
    """Two updaters and an editor saving in a loop: the count never goes back to the default.

    The file starts at 1000 and the default is 0, so a reset shows as a count
    below 1000. The editor writes back what it found, so it changes nothing by
    itself; when it keeps a newer file it finds in its way (O_EXCL), not one
    increment may be lost. An editor that truncates whatever is there may
    overwrite an update that came in between (an edit outside the lock always
    can), but that loses an increment, never the whole state.
    """
    path = tmp_path / "state.json"
    _write_state(path, 1000)
    stop = tmp_path / "stop"
    n = 150
    editor = subprocess.Popen(
        [sys.executable, "-c", EDITOR, str(path), str(stop), "1" if exclusive else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.05)
        updaters = [
            subprocess.Popen(
                [sys.executable, "-c", UPDATER, str(path), str(n), str(HERE)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [p.communicate(timeout=100) for p in updaters]
    finally:
        stop.touch()
        saves_out, _ = editor.communicate(timeout=20)
    for p, (_, err) in zip(updaters, results, strict=True):
        assert p.returncode == 0, err
    seen = [v for out, _ in results for v in json.loads(out)]
    saves, kept_newer = map(int, saves_out.split())
    assert saves > 50, "the editor did not save alongside the updates"
    if not exclusive:
        assert kept_newer == 0
    assert min(seen) >= 1000, f"reset to the default: {sorted(seen)[:10]}"
    final = json.loads(path.read_text())["count"]
    if exclusive:
        assert final == 1000 + 2 * n
        updates = [v for out, _ in results for v in json.loads(out)[::2]]
        assert sorted(updates) == list(range(1001, 1001 + 2 * n))
    else:
        assert 1000 < final <= 1000 + 2 * n
