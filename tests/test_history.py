"""History: the last N versions, bounded under long runs and kill -9, private,
ordered, and never following or removing what it did not make."""

from __future__ import annotations

import errno
import itertools
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from statestore._errors import StateReadError, StateStoreError, StateWriteError
from statestore._history import HISTORY_FOLDER, History, HistoryEntry

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".version"))


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_bounded_at_keep_and_newest_first(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    h = History(state, keep=5)
    assert h.entries() == []
    for i in range(120):
        h.record(b'{"n": %d}' % i, f"{i}-rev", {"pid": os.getpid(), "i": i})
        assert len(versions(h_folder(tmp_path))) == min(i + 1, 5)
    entries = h.entries()
    assert all(isinstance(e, HistoryEntry) for e in entries)
    assert [e.revision for e in entries] == [f"{i}-rev" for i in (119, 118, 117, 116, 115)]
    assert [e.written_by for e in entries] == [
        {"pid": os.getpid(), "i": i} for i in range(119, 114, -1)
    ]
    assert all(a.time >= b.time for a, b in itertools.pairwise(entries))
    assert [e.size for e in entries] == [len(b'{"n": %d}' % i) for i in range(119, 114, -1)]
    assert h.read("117-rev") == b'{"n": 117}'
    assert not state.exists(), "history wrote the state file"


def h_folder(tmp_path: Path, name: str = "state.json") -> Path:
    return tmp_path / HISTORY_FOLDER / name


def test_reading_a_pruned_revision_is_a_typed_error(tmp_path: Path) -> None:
    h = History(tmp_path / "state.json", keep=2)
    with pytest.raises(StateReadError):
        h.read("1-a")  # nothing recorded yet
    for i in range(4):
        h.record(b"{}", f"{i}-a")
    with pytest.raises(StateReadError) as info:
        h.read("1-a")
    e = info.value
    assert isinstance(e, StateStoreError) and e.errno == errno.ENOENT
    assert str(tmp_path / "state.json") in str(e)
    assert "'1-a'" in str(e) and "3-a" in str(e) and "newest 2" in str(e)


def test_the_same_revision_twice_reads_the_newest(tmp_path: Path) -> None:
    h = History(tmp_path / "s.json", keep=3)
    h.record(b"old", "r")
    h.record(b"new", "r")
    assert h.read("r") == b"new"


def test_bad_arguments(tmp_path: Path) -> None:
    for keep in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            History(tmp_path / "s.json", keep=keep)  # type: ignore[arg-type]
    h = History(tmp_path / "s.json", keep=1)
    with pytest.raises(ValueError):
        h.record(b"{}", "")
    with pytest.raises(ValueError):
        h.record(b"{}", "r", {"x": "y" * 70000})


def test_private_whatever_the_umask_and_the_state_files_mode(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(b"{}")
    state.chmod(0o644)
    for umask in (0, 0o022, 0o277):
        old = os.umask(umask)
        try:
            name = f"s{umask:o}.json"
            History(tmp_path / name, keep=2).record(b"secret", "1")
            History(tmp_path / name, keep=2).record(b"secret", "2")
        finally:
            os.umask(old)
        folder = h_folder(tmp_path, name)
        assert stat.S_IMODE((tmp_path / HISTORY_FOLDER).stat().st_mode) == 0o700
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for p in folder.iterdir():
            assert stat.S_IMODE(p.lstat().st_mode) == 0o600, (umask, p)


def test_only_its_own_files_are_pruned(tmp_path: Path) -> None:
    h = History(tmp_path / "state.json", keep=2)
    h.record(b"{}", "0")
    folder = h_folder(tmp_path)
    mine = {
        "notes.txt": b"a person's notes",
        "000000000001-xyz.version": b"not our pattern",
        "000000000001-0123456789ab.version.bak": b"a copy",
        ".state.json.tmp": b"someone's temp",
    }
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    (folder / "keep-me").mkdir()
    for i in range(10):
        h.record(b"{}", f"{i + 1}")
    for name, data in mine.items():
        assert (folder / name).read_bytes() == data
    assert (folder / "keep-me").is_dir()
    assert len(versions(folder)) == 2 + 1  # the two kept and the look-alike


RECORDER = textwrap.dedent(
    """
    import os, sys
    from statestore._history import History
    h = History(sys.argv[1], keep=int(sys.argv[2]))
    data = os.urandom(4 * 1024 * 1024)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        h.record(data, f"{os.getpid()}-{i}", {"pid": os.getpid()})
    """
)


def test_bounded_under_kill_9_mid_record(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    folder = h_folder(tmp_path)
    keep = 3
    for round_ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", RECORDER, str(state), str(keep)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * round_)  # somewhere inside a record
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if not folder.exists():
            continue
        # Between two records: at most keep + 1 versions, and only the temp file
        # of the record just killed (earlier ones were swept by later records).
        assert len(versions(folder)) <= keep + 1, versions(folder)
        assert len(temps(folder)) <= 1, temps(folder)
    h = History(state, keep=keep)
    h.record(b"{}", "last")
    assert len(versions(folder)) == keep
    assert temps(folder) == [], "a dead record's temporary file was not swept"
    for entry in h.entries():  # every kept version is whole
        assert len(h.read(entry.revision)) == entry.size


def test_a_symlink_at_the_history_folder_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / HISTORY_FOLDER).symlink_to(elsewhere)
    h = History(tmp_path / "state.json", keep=2)
    with pytest.raises(StateWriteError) as info:
        h.record(b"{}", "1")
    assert "symbolic link" in str(info.value) and HISTORY_FOLDER in str(info.value)
    with pytest.raises(StateReadError):
        h.entries()
    assert list(elsewhere.iterdir()) == []
    assert (tmp_path / HISTORY_FOLDER).is_symlink()


def test_a_symlink_at_the_documents_folder_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / HISTORY_FOLDER).mkdir(mode=0o700)
    h_folder(tmp_path).symlink_to(elsewhere)
    with pytest.raises(StateWriteError):
        History(tmp_path / "state.json", keep=2).record(b"{}", "1")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_an_impostor_under_a_versions_name_is_refused(tmp_path: Path, kind: str) -> None:
    h = History(tmp_path / "state.json", keep=1)
    h.record(b"first", "1")
    folder = h_folder(tmp_path)
    victim = tmp_path / "victim.json"
    victim.write_bytes(b"do not touch")
    planted = folder / "000000000000-0123456789ab.version"
    if kind == "symlink":
        planted.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.mkdir()
    with pytest.raises(StateWriteError) as info:
        h.record(b"second", "2")
    assert str(planted) in str(info.value)
    with pytest.raises(StateReadError):
        h.entries()
    with pytest.raises(StateReadError):
        h.read("1")
    assert victim.read_bytes() == b"do not touch"
    assert planted.is_symlink() if kind == "symlink" else planted.exists()


def test_a_file_at_the_history_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / HISTORY_FOLDER).write_bytes(b"a person's file")
    with pytest.raises(StateWriteError) as info:
        History(tmp_path / "state.json", keep=2).record(b"{}", "1")
    assert "not a folder" in str(info.value)
    assert (tmp_path / HISTORY_FOLDER).read_bytes() == b"a person's file"


def test_a_folder_open_to_others_is_refused(tmp_path: Path) -> None:
    (tmp_path / HISTORY_FOLDER).mkdir()
    (tmp_path / HISTORY_FOLDER).chmod(0o755)
    with pytest.raises(StateWriteError) as info:
        History(tmp_path / "state.json", keep=2).record(b"{}", "1")
    assert "755" in str(info.value)
    assert list((tmp_path / HISTORY_FOLDER).iterdir()) == []


@needs_root
def test_another_users_folder_is_refused(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    root = tmp_path / HISTORY_FOLDER
    root.mkdir(mode=0o700)
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(StateWriteError) as info:
        History(tmp_path / "state.json", keep=2).record(b"{}", "1")
    assert f"uid {nobody.pw_uid}" in str(info.value) and info.value.errno == 1
    assert list(root.iterdir()) == []


@needs_root
def test_as_another_user_a_roots_history_is_refused(tmp_path: Path) -> None:
    """A shared (sticky, world-writable) folder: the other user gets a typed error
    for root's history, and keeps its own history in its own folder elsewhere."""
    nobody = pwd.getpwnam("nobody")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    tmp_path.chmod(0o755)
    History(shared / "state.json", keep=2).record(b"root's", "1")
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        result: dict[str, object] = {}
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            for call in ("record", "entries"):
                try:
                    h = History(shared / "state.json", keep=2)
                    h.record(b"nobody's", "2") if call == "record" else h.entries()
                    result[call] = "no error"
                except StateStoreError as e:
                    result[call] = [type(e).__name__, e.errno, str(e)]
        finally:
            os.write(out_w, json.dumps(result).encode())
            os._exit(0)
    os.close(out_w)
    os.waitpid(pid, 0)
    result = json.loads(os.read(out_r, 65536))
    os.close(out_r)
    assert result["record"][0] == "StateWriteError", result
    assert result["entries"][0] == "StateReadError", result
    assert [e.revision for e in History(shared / "state.json", keep=2).entries()] == ["1"]
