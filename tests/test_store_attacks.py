"""Attacks on the store's rules from outside: model shapes, planted files, other users.

Each test is one attack; the ones that found a bug say which rule it broke.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from statestore import StateStore, StateWriteError
from statestore._doctor import doctor

# ------------------------------------------------------------ model shapes


class _B64(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64")
    blob: bytes = b""


class _HexInside(BaseModel):
    model_config = ConfigDict(ser_json_bytes="hex")
    blob: bytes | None = None


class _Outer(BaseModel):
    inner: list[_HexInside] = []


@pytest.mark.parametrize("model", [_B64, _Outer], ids=["top", "nested"])
def test_bytes_written_in_one_encoding_and_read_in_another_are_refused(
    tmp_path: Path, model: type[BaseModel]
) -> None:
    # Broke: the file held base64 text that loaded back as the bytes of that text,
    # so every save changed (and grew) the value.
    with pytest.raises(TypeError, match="val_json_bytes"):
        StateStore(model, tmp_path / "s.json", default=model)


@pytest.mark.parametrize("encoding", ["base64", "hex"])
def test_bytes_with_matching_encodings_round_trip(tmp_path: Path, encoding: str) -> None:
    class Blob(BaseModel):
        model_config = ConfigDict(ser_json_bytes=encoding, val_json_bytes=encoding)  # type: ignore[typeddict-item]
        blob: bytes = b""

    store = StateStore(Blob, tmp_path / "s.json", default=Blob)
    store.save(Blob(blob=b"\xff\x00abc"))
    for _ in range(3):
        store.update(lambda s: None)
    assert store.load().blob == b"\xff\x00abc"


def test_bytes_encoding_of_a_model_without_bytes_is_no_reason_to_refuse(tmp_path: Path) -> None:
    class NoBytes(BaseModel):
        model_config = ConfigDict(ser_json_bytes="base64")
        n: int = 0

    StateStore(NoBytes, tmp_path / "s.json", default=NoBytes).save(NoBytes(n=1))


# ------------------------------------------------------------ doctor's quarantine


def _doctor_fix(folder: Path) -> list[str]:
    lines: list[str] = []
    doctor(str(folder), repair=True, out=lines.append)
    return lines


def _typo(folder: Path) -> Path:
    state = folder / "state.json"
    state.write_text('{"count": 1,,}')
    return state


def test_doctor_does_not_quarantine_through_a_planted_symlink(tmp_path: Path) -> None:
    # Broke: a ".quarantine" symlink planted in a shared folder made --fix move the
    # state file out of its folder, into the folder the link pointed to.
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    state = _typo(app)
    (app / ".quarantine").symlink_to(elsewhere)
    lines = _doctor_fix(app)
    assert state.read_text() == '{"count": 1,,}'  # left where it was
    assert list(elsewhere.iterdir()) == []
    assert any("not a folder" in line for line in lines), lines


def test_doctor_does_not_quarantine_into_a_dangling_symlink_or_a_file(tmp_path: Path) -> None:
    state = _typo(tmp_path)
    (tmp_path / ".quarantine").symlink_to(tmp_path / "nowhere")
    _doctor_fix(tmp_path)
    assert state.exists() and not (tmp_path / "nowhere").exists()
    (tmp_path / ".quarantine").unlink()
    (tmp_path / ".quarantine").write_text("x")
    _doctor_fix(tmp_path)
    assert state.read_text() == '{"count": 1,,}'
    assert (tmp_path / ".quarantine").read_text() == "x"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_doctor_does_not_quarantine_into_another_users_folder(tmp_path: Path) -> None:
    state = _typo(tmp_path)
    qdir = tmp_path / ".quarantine"
    qdir.mkdir()
    os.chown(qdir, 65534, 65534)
    lines = _doctor_fix(tmp_path)
    assert state.exists() and list(qdir.iterdir()) == []
    assert any("another user" in line for line in lines), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act for the folder's owner")
def test_doctor_as_root_quarantines_into_the_folder_owners_quarantine(tmp_path: Path) -> None:
    # The folder and its quarantine are the app's (uid 65534); root's doctor may use it.
    os.chown(tmp_path, 65534, 65534)
    state = _typo(tmp_path)
    qdir = tmp_path / ".quarantine"
    qdir.mkdir()
    os.chown(qdir, 65534, 65534)
    _doctor_fix(tmp_path)
    assert not state.exists()
    assert [p.read_text() for p in qdir.iterdir()] == ['{"count": 1,,}']


def _as_nobody(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child as uid/gid 65534; its result (or exception name)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                out = fn()
            except Exception as e:
                out = type(e).__name__
            os.write(write, out.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    return got


class _Counter(BaseModel):
    count: int = 0


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="statestore-attacks-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_root_doctor_with_a_private_umask_leaves_a_quarantine_the_app_can_see(
    shared: Path,
) -> None:
    # Broke: root's doctor with umask 077 made .quarantine 0700 root:root; the app
    # could not list it, took the missing state file as new and started over.
    folder = shared / "app"
    folder.mkdir(mode=0o755)
    state = _typo(folder)
    os.chown(folder, 65534, 65534)
    os.chown(state, 65534, 65534)
    old = os.umask(0o077)
    try:
        _doctor_fix(folder)
    finally:
        os.umask(old)
    assert not state.exists()
    qdir = folder / ".quarantine"
    assert (qdir.stat().st_uid, qdir.stat().st_gid) == (65534, 65534)
    store = StateStore(_Counter, state, default=_Counter, missing_wait=0.0)
    assert _as_nobody(lambda: repr(store.load())) == "StateMissingError"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_quarantine_the_app_cannot_list_is_no_fresh_start(shared: Path) -> None:
    # Broke: a .quarantine/ the app could not list counted as "no copy", so a
    # missing state file was taken as new and the default used.
    folder = shared / "app"
    folder.mkdir(mode=0o777)
    qdir = folder / ".quarantine"
    qdir.mkdir(mode=0o700)  # root's
    (qdir / "state.json.20260101T000000Z").write_text('{"count": 5,,}')
    store = StateStore(_Counter, folder / "state.json", default=_Counter, missing_wait=0.0)
    assert _as_nobody(lambda: repr(store.load())) == "StateReadError"
    qdir.chmod(0o755)  # listable: the copy is seen
    assert _as_nobody(lambda: repr(store.load())) == "StateMissingError"
    (qdir / "state.json.20260101T000000Z").unlink()
    assert _as_nobody(lambda: repr(store.load())) == "_Counter(count=0)"  # now it is new


# ------------------------------------------------------------ planted backups


def _v1_then_v2(folder: Path) -> tuple[Path, StateStore[_Counter]]:
    path = folder / "s.json"
    StateStore(_Counter, path, default=_Counter).save(_Counter(count=3))
    v2 = StateStore(_Counter, path, default=_Counter, version=2, migrations={1: lambda d: d})
    return path, v2


@pytest.mark.parametrize("planted", ["symlink", "dangling", "folder", "fifo"])
def test_migrate_refuses_a_planted_backup_name_and_touches_nothing(
    tmp_path: Path, planted: str
) -> None:
    # Broke: a symlink (or folder...) at <file>.v1.bak counted as the backup: the
    # migration ran and reported "backup at ..." while no copy of v1 was kept.
    path, v2 = _v1_then_v2(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("victim")
    bak = tmp_path / "s.json.v1.bak"
    if planted == "symlink":
        bak.symlink_to(victim)
    elif planted == "dangling":
        bak.symlink_to(tmp_path / "nowhere")
    elif planted == "folder":
        bak.mkdir()
    else:
        os.mkfifo(bak)
    before = path.read_bytes()
    with pytest.raises(StateWriteError, match="backup"):
        v2.migrate()
    assert path.read_bytes() == before
    assert victim.read_text() == "victim"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's file")
def test_migrate_refuses_another_users_file_at_the_backup_name(tmp_path: Path) -> None:
    path, v2 = _v1_then_v2(tmp_path)
    bak = tmp_path / "s.json.v1.bak"
    bak.write_text('{"schema_version": 1, "count": 999}')
    os.chown(bak, 65534, 65534)
    with pytest.raises(StateWriteError, match="another user"):
        v2.migrate()
    assert json.loads(path.read_text())["count"] == 3


def test_migrate_keeps_its_own_earlier_backup(tmp_path: Path) -> None:
    path, v2 = _v1_then_v2(tmp_path)
    bak = tmp_path / "s.json.v1.bak"
    bak.write_text("first original")
    v2.migrate()
    assert bak.read_text() == "first original"  # never overwritten
    assert json.loads(path.read_text())["schema_version"] == 2
