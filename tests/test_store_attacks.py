"""Attacks on the store's rules from outside: model shapes, planted files, other users.

Each test is one attack; the ones that found a bug say which rule it broke.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model

from statestore import StateReadError, StateStore, StateValidationError, StateWriteError
from statestore._atomic import write_atomic
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


# ------------------------------------------------------------ shapes that held


class _A(BaseModel):
    kind: Literal["a"] = "a"
    x: int = 0


class _B(BaseModel):
    kind: Literal["b"] = "b"
    y: str = ""


class _Ints(RootModel[list[int]]):
    pass


class _Color(enum.Enum):
    red = "red"
    blue = "blue"


class _Level(enum.IntEnum):
    low = 1
    high = 2


class _Shapes(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    item: Annotated[_A | _B, Field(discriminator="kind")] = _A()
    ints: _Ints = _Ints([])
    when: datetime.datetime = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    uid: uuid.UUID = uuid.UUID(int=0)
    price: decimal.Decimal = decimal.Decimal("0")
    where: pathlib.PurePosixPath = pathlib.PurePosixPath("/")
    color: _Color = _Color.red
    level: _Level = _Level.low
    pair: tuple[int, str] = (0, "")
    tags: frozenset[str] = frozenset()
    big: int = 0
    wait: datetime.timedelta = datetime.timedelta(0)
    aliased: int = Field(0, alias="Aliased")
    anything: Any = None


# Each assignment has another type than its field (pydantic does not validate
# assignments): the save must publish the validated value, which fits the schema.
_UTC = datetime.timezone.utc
_UID = "12345678-1234-5678-1234-567812345678"
_ASSIGNMENTS: list[tuple[str, Any, Any]] = [
    ("item", {"kind": "b", "y": "q"}, _B(y="q")),
    ("ints", [3, "1"], _Ints([3, 1])),
    (
        "when",
        "2021-02-03T04:05:06Z",
        datetime.datetime(2021, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
    ),
    (
        "uid",
        "12345678-1234-5678-1234-567812345678",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
    ),
    ("price", "1.50", decimal.Decimal("1.50")),
    ("where", "/etc/x", pathlib.PurePosixPath("/etc/x")),
    ("color", "blue", _Color.blue),
    ("level", 2, _Level.high),
    ("pair", [1, "a"], (1, "a")),
    ("tags", ["z", "a", "m"], frozenset({"a", "m", "z"})),
    ("big", 10**400, 10**400),  # far beyond a double's range: written as digits
    ("wait", "P1DT1S", datetime.timedelta(days=1, seconds=1)),
    ("aliased", "7", 7),
    ("anything", {"nested": [1, {"k": None}]}, {"nested": [1, {"k": None}]}),
]


@pytest.mark.parametrize(
    ("field", "value", "expected"), _ASSIGNMENTS, ids=[a[0] for a in _ASSIGNMENTS]
)
def test_held_every_field_type_is_saved_validated_and_fits_the_schema(
    tmp_path: Path, field: str, value: Any, expected: Any
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    store = StateStore(_Shapes, tmp_path / "s.json", default=_Shapes)
    with store.transaction() as state:
        setattr(state, field, value)
    doc = json.loads((tmp_path / "s.json").read_text())
    jsonschema.validate(doc, store.json_schema())
    assert getattr(store.load(), field) == expected


def test_held_odd_extra_keys_round_trip_and_fit_the_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    store = StateStore(_Shapes, tmp_path / "s.json", default=_Shapes)
    odd = {"": 1, "a b\n": 2, "\u2028": 3, ' "schema_version': 4, "$schema ": 5, "Aliased2": 6}
    store.save(_Shapes.model_validate(odd))
    jsonschema.validate(json.loads((tmp_path / "s.json").read_text()), store.json_schema())
    assert store.load().model_extra == odd


@pytest.mark.parametrize("key", ["schema_version", "$schema"])
def test_held_an_extra_key_named_like_the_stores_is_refused(tmp_path: Path, key: str) -> None:
    store = StateStore(_Shapes, tmp_path / "s.json", default=_Shapes)
    with pytest.raises(StateValidationError, match=re.escape(key)):
        store.save(_Shapes.model_validate({key: 9}))
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("depth", [250, 1200])
def test_held_nesting_too_deep_to_load_is_never_written(tmp_path: Path, depth: int) -> None:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    store = StateStore(_Shapes, tmp_path / "s.json", default=_Shapes)
    store.save(_Shapes(big=1))
    before = (tmp_path / "s.json").read_bytes()
    with pytest.raises(StateValidationError):
        store.update(lambda s: s.model_copy(update={"anything": nested}))
    assert (tmp_path / "s.json").read_bytes() == before


def test_held_an_int_too_long_for_pythons_json_is_never_written(tmp_path: Path) -> None:
    store = StateStore(_Shapes, tmp_path / "s.json", default=_Shapes)
    with pytest.raises(StateValidationError):
        store.save(_Shapes(big=10**5000))
    assert not (tmp_path / "s.json").exists()


def test_held_no_pydantic_warning_leaks_under_w_error(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import warnings
        warnings.simplefilter("error")
        from typing import Any
        from pydantic import BaseModel
        from statestore import StateStore, StateValidationError

        class Inner(BaseModel):
            n: int = 0

        class M(BaseModel):
            inner: list[Inner] = [Inner()]
            when: float = 0.0
            blob: bytes = b""

        store = StateStore(M, {str(tmp_path / "s.json")!r}, default=M)
        with store.transaction() as s:
            s.inner[0].n = "4"
            s.when = "1.5"
        assert store.load().inner[0].n == 4
        try:
            with store.transaction() as s:
                s.inner = [{{"n": "x"}}]
        except StateValidationError as e:
            assert "inner" in str(e), e
        else:
            raise AssertionError("saved")
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# ------------------------------------------------------------ max_size boundaries


def test_held_max_size_is_inclusive_on_both_paths(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    probe = StateStore(_Counter, path, default=_Counter)
    probe.save(_Counter(count=1))
    size = path.stat().st_size
    exact = StateStore(_Counter, path, default=_Counter, max_size=size)
    assert exact.load().count == 1
    exact.save(_Counter(count=2))  # same size: allowed
    with pytest.raises(StateWriteError):
        exact.save(_Counter(count=10))  # one byte more: refused, file kept
    assert exact.load().count == 2
    with pytest.raises(StateReadError):
        StateStore(_Counter, path, default=_Counter, max_size=size - 1).load()


# ------------------------------------------------------------ dates written as numbers


@pytest.mark.parametrize(
    ("config", "annotation"),
    [
        ({"ser_json_timedelta": "float"}, datetime.timedelta),
        ({"ser_json_temporal": "seconds"}, datetime.time),
        ({"ser_json_temporal": "seconds"}, datetime.datetime),
        ({"ser_json_temporal": "milliseconds"}, datetime.datetime | None),
        ({"ser_json_temporal": "milliseconds"}, list[datetime.date]),
    ],
    ids=["timedelta-float", "time-seconds", "datetime-seconds", "optional-ms", "dates-ms"],
)
def test_dates_written_as_numbers_are_refused(
    tmp_path: Path, config: dict[str, str], annotation: Any
) -> None:
    # Broke: ser_json_timedelta="float" wrote numbers the store's JSON Schema
    # refuses (it describes ISO 8601 text); ser_json_temporal="seconds" loaded a
    # naive time back as UTC, and "milliseconds" read small datetimes as seconds.
    model = create_model("Dated", __config__=ConfigDict(**config), when=(annotation, None))  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="iso8601"):
        StateStore(model, tmp_path / "s.json")
    nested = create_model("Outer", inner=(list[model], []))  # type: ignore[valid-type]
    with pytest.raises(TypeError, match="iso8601"):
        StateStore(nested, tmp_path / "s.json")


def test_temporal_settings_of_a_model_without_dates_are_no_reason_to_refuse(
    tmp_path: Path,
) -> None:
    class Plain(BaseModel):
        model_config = ConfigDict(ser_json_temporal="seconds", ser_json_timedelta="float")
        n: int = 0

    store = StateStore(Plain, tmp_path / "s.json", default=Plain)
    store.save(Plain(n=1))
    assert store.load().n == 1


def test_a_write_that_does_not_follow_links_replaces_a_planted_link_not_its_target(
    tmp_path: Path,
) -> None:
    # The backup's write: a link planted at its name between the look and the
    # write (a race no test can time) must not send the bytes to the link's target.
    victim = tmp_path / "victim"
    victim.write_text("victim")
    bak = tmp_path / "s.json.v1.bak"
    bak.symlink_to(victim)
    write_atomic(str(bak), b"backup", durable=False, follow_links=False)
    assert victim.read_text() == "victim"
    assert not bak.is_symlink() and bak.read_bytes() == b"backup"
    # The default for a state file is unchanged: the link's target is written.
    state = tmp_path / "s.json"
    state.symlink_to(victim)
    write_atomic(str(state), b"state", durable=False)
    assert state.is_symlink() and victim.read_bytes() == b"state"
