"""Errors about a document a person edits: where (line, column), what next, and by which name.

``StateCorruptError`` and ``StateValidationError`` carry the positions the
command line shows, in their attributes and their message, end with a next
step, show as ``statestore.<Name>`` in tracebacks, and keep all of it across
pickling and process pools.
"""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import textwrap
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from statestore import AsyncStateStore, StateCorruptError, StateStore, StateValidationError
from statestore._cli import main as cli_main


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int = Field(default=1, ge=1)
    tags: list[str] = []


# (document, line, column): the first byte the reader stopped at.
CORRUPT = [
    ('{\n  "name": "a",,\n}', 2, 15),
    ('{\n  "name": "a"\n  "size": 2\n}', 3, 3),
    ("", 1, 1),
    ("  \n", 1, 1),
    ("[1, 2]", 1, 1),
    ('"text"', 1, 1),
    ('\ufeff{\n "name": tru}', 2, 10),
]


@pytest.mark.parametrize(("text", "line", "column"), CORRUPT)
def test_corrupt_documents_say_where_and_what_next(
    tmp_path: Path, text: str, line: int, column: int
) -> None:
    path = tmp_path / "s.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(StateCorruptError) as info:
        StateStore(Settings, path, read_attempts=1).load()
    e = info.value
    assert (e.line, e.column) == (line, column)
    assert str(e).startswith(f"{path}:{line}:{column}: ")
    assert e.hint and str(e).endswith(e.hint)
    assert "put back a copy" in e.hint
    assert path.read_text(encoding="utf-8") == text


def test_bytes_that_are_not_utf8_are_located_too(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(b'{\n  "name": "caf\xe9"\n}')
    with pytest.raises(StateCorruptError) as info:
        StateStore(Settings, path, read_attempts=1).load()
    assert (info.value.line, info.value.column) == (2, 15)
    assert info.value.hint


INVALID = (
    '{\n  "schema_version": 1,\n  "size": 0,\n  "tags": ["a", 3],\n'
    '  "extra": {"deep": [1, {"x": null}]}\n}\n'
)
#: Each error of INVALID against Settings, and where its field is in the text.
INVALID_AT = {
    ("name",): (1, 1),  # missing: the object that lacks it
    ("size",): (3, 3),
    ("tags", 1): (4, 17),
    ("extra",): (5, 3),
}


def _check_invalid(e: StateValidationError, path: Path) -> None:
    found = {tuple(err["loc"]): at for err, at in zip(e.errors, e.positions, strict=True)}
    assert found == INVALID_AT
    assert len(e.positions) == len(e.errors)
    first = e.positions[0]
    assert first is not None and (e.line, e.column) == first
    text = str(e)
    assert text.startswith(f"{path}: 4 validation error(s)")
    for loc, (line, column) in INVALID_AT.items():
        assert f"  {'.'.join(map(str, loc))} (line {line}, column {column}): " in text
    assert e.hint and text.endswith(e.hint)
    assert "migration" in e.hint


def test_invalid_documents_carry_each_error_s_position(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(INVALID)
    with pytest.raises(StateValidationError) as info:
        StateStore(Settings, path).load()
    _check_invalid(info.value, path)
    # update() reads the same way, under the lock, and writes nothing.
    with pytest.raises(StateValidationError) as again:
        StateStore(Settings, path).update(lambda s: s)
    _check_invalid(again.value, path)
    assert path.read_text() == INVALID


def test_the_async_store_gives_the_same_positions(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(INVALID)

    async def load() -> None:
        await AsyncStateStore(Settings, path).load()

    with pytest.raises(StateValidationError) as info:
        asyncio.run(load())
    _check_invalid(info.value, path)


def test_columns_count_characters_after_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes('\ufeff{"name": "ünïcödé", "size": 0}'.encode())
    with pytest.raises(StateValidationError) as info:
        StateStore(Settings, path).load()
    # "size" is the 21st character of the line: the mark is not counted, each
    # accented letter counts once (not as its two UTF-8 bytes).
    assert info.value.positions == [(1, 21)]
    assert (info.value.line, info.value.column) == (1, 21)


def test_the_cli_shows_the_positions_the_error_carries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.json"
    path.write_text(INVALID)
    with pytest.raises(StateValidationError) as info:
        StateStore(Settings, path).load()
    capsys.readouterr()
    assert cli_main(["validate", "test_error_details:settings_store", "--path", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    expected = [
        f"{path}:{at[0]}:{at[1]}: {'.'.join(map(str, err['loc']))}: {err['msg']}"
        for err, at in zip(info.value.errors, info.value.positions, strict=True)
        if at is not None
    ]
    assert out == expected
    assert len(out) == len(INVALID_AT)


settings_store = StateStore(Settings, "placeholder.json")


class Loose(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")
    ratio: float = 0.5


def test_errors_of_a_save_have_no_reading_hint(tmp_path: Path) -> None:
    store = StateStore(Loose, tmp_path / "s.json", default=Loose)
    with pytest.raises(StateValidationError) as info:
        store.save(Loose(ratio=float("inf")))
    # The next step of a stored document does not apply to a state being saved.
    assert "migration" not in str(info.value)
    assert info.value.hint is None


def _errors(path: Path) -> list[BaseException]:
    found: list[BaseException] = []
    for text in ('{"name": "a",,}', INVALID):
        path.write_text(text)
        try:
            StateStore(Settings, path, read_attempts=1).load()
        except (StateCorruptError, StateValidationError) as e:
            found.append(e)
    assert len(found) == 2
    return found


def test_errors_keep_their_details_through_pickling(tmp_path: Path) -> None:
    for e in _errors(tmp_path / "s.json"):
        data = pickle.dumps(e)
        assert b"statestore._errors" not in data, "pickled under the private module's name"
        clone = pickle.loads(data)
        assert type(clone) is type(e)
        assert vars(clone) == vars(e)
        assert str(clone) == str(e)


def _load_in_child(path: str) -> None:
    StateStore(Settings, path, read_attempts=1).load()


@pytest.mark.parametrize("text", ['{"name": "a",,}', INVALID], ids=["corrupt", "invalid"])
def test_errors_cross_a_process_pool_intact(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises((StateCorruptError, StateValidationError)) as local:
        _load_in_child(str(path))
    with ProcessPoolExecutor(1) as pool, pytest.raises(type(local.value)) as remote:
        pool.submit(_load_in_child, str(path)).result()
    assert vars(remote.value) == vars(local.value)
    assert str(remote.value) == str(local.value)


def test_tracebacks_name_the_public_module(tmp_path: Path) -> None:
    for e in _errors(tmp_path / "s.json"):
        shown = "".join(traceback.format_exception_only(type(e), e))
        assert shown.startswith(f"statestore.{type(e).__name__}: "), shown
        assert "_errors" not in shown


@pytest.mark.parametrize(
    ("text", "name"),
    [('{"count": 1,,}', "StateCorruptError"), ('{"count": "many"}', "StateValidationError")],
)
def test_an_uncaught_error_shows_its_public_name(tmp_path: Path, text: str, name: str) -> None:
    # What a person running a program sees: the interpreter's own traceback.
    path = tmp_path / "s.json"
    path.write_text(text)
    program = textwrap.dedent(
        f"""
        from pydantic import BaseModel
        from statestore import StateStore
        class Counter(BaseModel):
            count: int = 0
        StateStore(Counter, {str(path)!r}, read_attempts=1).load()
        """
    )
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()
    header = next(line for line in last if line.startswith(f"statestore.{name}"))
    assert header.startswith(f"statestore.{name}: {path}"), run.stderr
    assert "statestore._errors" not in run.stderr
