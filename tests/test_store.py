"""The core: StateStore load, save, update, transaction and their errors."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter, Strict, listing
from pydantic import BaseModel, ConfigDict, field_validator

from statestore import (
    NestedTransactionError,
    StateCorruptError,
    StateNotFoundError,
    StateReadError,
    StateStore,
    StateStoreError,
    StateValidationError,
)


def test_save_then_load_round_trips(state_path: Path) -> None:
    store = StateStore(Counter, state_path)
    store.save(Counter(count=3, note="héllo"))
    assert store.load() == Counter(count=3, note="héllo")
    assert store.exists()
    assert store.path == state_path
    assert store.location == str(state_path)
    assert store.durable is True


def test_file_format_diffs_well(state_path: Path) -> None:
    store = StateStore(Counter, state_path)
    store.save(Counter(count=3, note="héllo"))
    text = state_path.read_text(encoding="utf-8")
    # One line of the store's commit stamp (the one line every commit changes), then
    # one line per field.
    stamp, rest = text.split("\n", 2)[1], text.split("\n", 2)[2]
    assert stamp.startswith('  "$commit": {"revision": 1, ') and stamp.endswith("},")
    assert "{\n" + rest == '{\n  "schema_version": 1,\n  "count": 3,\n  "note": "héllo"\n}\n'


def test_empty_model_is_written_as_an_object(tmp_path: Path) -> None:
    class Empty(BaseModel):
        pass

    store = StateStore(Empty, tmp_path / "e.json")
    store.save(Empty())
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc.pop("$commit")["revision"] == 1
    assert doc == {"schema_version": 1}
    assert store.load() == Empty()


def test_missing_file_without_default_is_a_typed_error(state_path: Path) -> None:
    store = StateStore(Counter, state_path)
    with pytest.raises(StateNotFoundError) as info:
        store.load()
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path == str(state_path)
    assert str(state_path) in str(info.value)
    assert not store.exists()


@pytest.mark.parametrize("kind", ["instance", "callable"])
def test_default_is_used_but_not_written(state_path: Path, kind: str) -> None:
    default = Counter(count=7) if kind == "instance" else (lambda: Counter(count=7))
    store = StateStore(Counter, state_path, default=default)
    first = store.load()
    assert first == Counter(count=7)
    first.count = 100  # must not leak into the next default
    assert store.load() == Counter(count=7)
    assert not state_path.exists()
    assert listing(state_path.parent) == []


def test_default_of_the_wrong_type_is_refused(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=lambda: Strict(name="x"))  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="Counter"):
        store.load()


def test_missing_parent_folders_are_created_on_first_save(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.json"
    store = StateStore(Counter, path, default=Counter)
    assert store.load() == Counter()
    assert not (tmp_path / "a").exists()
    store.update(lambda s: Counter(count=1))
    assert store.load().count == 1


def test_update_by_mutation_and_by_return(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)

    def mutate(s: Counter) -> None:
        s.count += 1

    saved = store.update(mutate)
    assert saved == Counter(count=1)
    saved = store.update(lambda s: Counter(count=s.count + 10, note="x"))
    assert saved == Counter(count=11, note="x")
    assert store.load() == saved


def test_transaction_saves_on_exit_and_discards_on_error(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    with store.transaction() as state:
        state.count = 5
    assert store.load().count == 5
    before = state_path.read_bytes()
    with pytest.raises(KeyError), store.transaction() as state:
        state.count = 99
        raise KeyError("boom")
    assert state_path.read_bytes() == before
    assert listing(state_path.parent) == ["state.json"]


def test_exception_in_fn_leaves_file_and_lock_alone(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    store.save(Counter(count=1))
    before = state_path.read_bytes()

    def fail(s: Counter) -> None:
        s.count = 1000
        raise RuntimeError("nope")

    with pytest.raises(RuntimeError, match="nope"):
        store.update(fail)
    assert state_path.read_bytes() == before
    assert listing(state_path.parent) == ["state.json"]  # no lock dir, no temp file
    assert store.update(lambda s: Counter(count=s.count + 1)).count == 2  # lock is free


def test_fn_returning_something_else_is_a_type_error(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    store.save(Counter(count=1))
    before = state_path.read_bytes()
    with pytest.raises(TypeError, match=r"returned dict, expected a Counter"):
        store.update(lambda s: {"count": 2})  # type: ignore[arg-type, return-value]
    assert state_path.read_bytes() == before
    assert listing(state_path.parent) == ["state.json"]


def test_a_mutated_model_that_would_not_load_never_reaches_disk(state_path: Path) -> None:
    class Positive(BaseModel):
        n: int = 1

        @field_validator("n")
        @classmethod
        def positive(cls, v: int) -> int:
            if v <= 0:
                raise ValueError("must be positive")
            return v

    store = StateStore(Positive, state_path, default=Positive)
    store.save(Positive(n=2))
    before = state_path.read_bytes()

    def break_it(s: Positive) -> None:
        s.n = -5  # assignment is not validated by pydantic by default

    with pytest.raises(StateValidationError) as info:
        store.update(break_it)
    assert info.value.errors[0]["loc"] == ["n"]
    assert state_path.read_bytes() == before
    with pytest.raises(StateValidationError), store.transaction() as s:
        s.n = 0
    assert state_path.read_bytes() == before


def test_unchanged_state_is_not_rewritten(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    store.save(Counter(count=1))
    inode = state_path.stat().st_ino
    store.update(lambda s: None)
    store.save(Counter(count=1))
    assert state_path.stat().st_ino == inode
    store.update(lambda s: Counter(count=2))
    assert state_path.stat().st_ino != inode


def test_new_file_mode_follows_umask_and_existing_mode_is_kept(state_path: Path) -> None:
    old = os.umask(0o027)
    try:
        StateStore(Counter, state_path).save(Counter())
    finally:
        os.umask(old)
    assert stat.S_IMODE(state_path.stat().st_mode) == 0o640
    state_path.chmod(0o600)
    StateStore(Counter, state_path).save(Counter(count=2))
    assert stat.S_IMODE(state_path.stat().st_mode) == 0o600


VALID = b'{\n  "count": 1,\n  "note": "x"\n}\n'
BAD_FILES = {
    "not-json": (b"hello world", StateCorruptError, "1:1"),
    "empty": (b"", StateCorruptError, "empty"),
    "whitespace": (b"  \n ", StateCorruptError, "empty"),
    "truncated": (VALID[:20], StateCorruptError, ".json:3:3: not valid JSON"),
    "fails-model": (b'{"count": "many"}', StateValidationError, "count"),
    "array": (b"[1, 2]", StateCorruptError, "JSON array"),
    "string": (b'"text"', StateCorruptError, "JSON string"),
    "not-utf8": (b'{"note": "\xff\xfe"}', StateCorruptError, "not UTF-8"),
    "nan": (b'{"count": NaN}', StateCorruptError, "NaN"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_give_typed_errors_and_stay_untouched(state_path: Path, name: str) -> None:
    content, error, fragment = BAD_FILES[name]
    state_path.write_bytes(content)
    store = StateStore(Counter, state_path, default=Counter, read_delay=0.001)
    with pytest.raises(error) as info:
        store.load()
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(state_path)
    assert fragment in str(info.value)
    for attempt in (
        lambda: store.update(lambda s: None),
        lambda: store.save(Counter()),
        lambda: store.transaction().__enter__(),
    ):
        with pytest.raises(error):
            attempt()
    assert state_path.read_bytes() == content
    assert listing(state_path.parent) == ["state.json"]


class Ratio(BaseModel):
    ratio: float = 0.0
    extra: Any = None


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["ratio", "extra"])
def test_nan_and_infinity_are_refused_in_the_stores_own_layout(
    state_path: Path, field: str, literal: str
) -> None:
    # The layout the store writes itself is read by pydantic's parser in one pass,
    # and that parser accepts these words: the store must refuse them there too.
    content = f'{{\n  "schema_version": 1,\n  "{field}": {literal}\n}}\n'.encode()
    state_path.write_bytes(content)
    store = StateStore(Ratio, state_path, default=Ratio, read_delay=0.001)
    with pytest.raises(StateCorruptError, match=literal):
        store.load()
    with pytest.raises(StateCorruptError):
        store.update(lambda s: None)
    assert state_path.read_bytes() == content


def test_nan_and_infinity_inside_strings_are_only_text(state_path: Path) -> None:
    store = StateStore(Counter, state_path)
    store.save(Counter(note="NaN, Infinity and -Infinity"))
    assert store.load() == Counter(note="NaN, Infinity and -Infinity")
    saved = store.update(lambda s: Counter(count=s.count + 1, note=s.note))
    assert saved == Counter(count=1, note="NaN, Infinity and -Infinity")


def test_a_model_that_writes_nan_literals_cannot_save_them(state_path: Path) -> None:
    class Loose(BaseModel):
        model_config = ConfigDict(ser_json_inf_nan="constants")
        ratio: float = 0.0

    store = StateStore(Loose, state_path)
    store.save(Loose(ratio=0.5))
    before = state_path.read_bytes()
    with pytest.raises(StateValidationError, match="holds NaN"):
        store.save(Loose(ratio=float("nan")))
    with pytest.raises(StateValidationError, match="holds Infinity"):
        store.update(lambda s: Loose(ratio=float("inf")))
    assert state_path.read_bytes() == before
    assert store.load() == Loose(ratio=0.5)


def test_corrupt_error_carries_line_and_column(state_path: Path) -> None:
    state_path.write_bytes(b'{\n  "count": 1,\n  "note": }\n')
    with pytest.raises(StateCorruptError) as info:
        StateStore(Counter, state_path, read_attempts=1).load()
    assert (info.value.line, info.value.column) == (3, 11)
    assert f"{state_path}:3:11" in str(info.value)


def test_a_folder_where_the_file_should_be(state_path: Path) -> None:
    state_path.mkdir()
    store = StateStore(Counter, state_path, default=Counter)
    with pytest.raises(StateReadError, match="is a folder") as info:
        store.load()
    assert isinstance(info.value, OSError)
    with pytest.raises(StateReadError):
        store.update(lambda s: None)
    assert state_path.is_dir()
    assert listing(state_path.parent) == ["state.json"]


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root reads any file; tests/test_fs_edges.py runs this as an unprivileged user",
)
def test_unreadable_file(state_path: Path) -> None:
    state_path.write_bytes(VALID)
    state_path.chmod(0)
    with pytest.raises(StateReadError, match="permission denied"):
        StateStore(Counter, state_path).load()


def test_read_is_retried_while_a_non_atomic_writer_finishes(state_path: Path) -> None:
    state_path.write_bytes(VALID[:10])

    def finish() -> None:
        time.sleep(0.05)
        state_path.write_bytes(VALID)

    t = threading.Thread(target=finish)
    t.start()
    try:
        assert StateStore(Counter, state_path, read_attempts=20, read_delay=0.02).load().count == 1
    finally:
        t.join()


def test_read_attempts_are_bounded(state_path: Path) -> None:
    state_path.write_bytes(b"{")
    started = time.monotonic()
    with pytest.raises(StateCorruptError):
        StateStore(Counter, state_path, read_attempts=3, read_delay=0.1).load()
    assert 0.2 <= time.monotonic() - started < 2.0


def test_update_inside_a_transaction_is_refused(state_path: Path) -> None:
    store = StateStore(Counter, state_path, default=Counter)
    twin = StateStore(Counter, str(state_path))
    with store.transaction() as state:
        state.count = 1
        with pytest.raises(NestedTransactionError, match="inside a transaction"):
            store.update(lambda s: None)
        with pytest.raises(NestedTransactionError):
            twin.save(Counter(count=5))
        with pytest.raises(NestedTransactionError):
            store.transaction().__enter__()
        assert store.load() == Counter()  # reads are fine
    assert store.load().count == 1


def test_stores_on_other_files_nest_under_a_shared_lock(tmp_path: Path) -> None:
    from statestore import DirectoryLock

    lock = DirectoryLock(tmp_path / "folder.lock")
    a = StateStore(Counter, tmp_path / "a.json", default=Counter, lock=lock)
    b = StateStore(Strict, tmp_path / "b.json", default=lambda: Strict(name="b"), lock=lock)
    with a.transaction() as sa:
        sa.count = 1
        b.update(lambda sb: Strict(name="b", size=sa.count))
    assert a.load().count == 1
    assert b.load().size == 1
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]


def test_extra_forbid_model_works(tmp_path: Path) -> None:
    store = StateStore(Strict, tmp_path / "s.json")
    store.save(Strict(name="n"))
    assert store.load() == Strict(name="n")


def test_reserved_field_names_are_refused(tmp_path: Path) -> None:
    class Clash(BaseModel):
        schema_version: int = 1

    with pytest.raises(TypeError, match="schema_version"):
        StateStore(Clash, tmp_path / "c.json")


def test_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="BaseModel"):
        StateStore(dict, tmp_path / "c.json")  # type: ignore[type-var]


def test_every_error_is_a_statestore_error(state_path: Path) -> None:
    state_path.write_bytes(b"[")
    with pytest.raises(StateStoreError):
        StateStore(Counter, state_path, read_attempts=1).load()


class Stamped(BaseModel):
    model_config = {"strict": True}
    when: datetime
    tags: set[str] = set()
    ratio: float = 0.5


@pytest.mark.parametrize(
    "layout",
    ["as-written", "compact", "reordered", "with-schema-key"],
)
def test_every_layout_of_a_document_loads_the_same(state_path: Path, layout: str) -> None:
    """The store's own layout is read by a fast path; any other layout by the general one."""
    store = StateStore(Stamped, state_path)
    state = Stamped(when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), tags={"a", "b"})
    store.save(state)
    doc = json.loads(state_path.read_text())
    if layout == "compact":
        state_path.write_text(json.dumps(doc, separators=(",", ":")))
    elif layout == "reordered":
        state_path.write_text(json.dumps(dict(reversed(list(doc.items()))), indent=4))
    elif layout == "with-schema-key":
        state_path.write_text(json.dumps({"$schema": "s.json", **doc}, indent=2) + "\n")
    assert store.load() == state
    store.update(lambda s: None)
    assert store.load() == state


def test_fast_path_rejects_what_the_general_path_rejects(state_path: Path) -> None:
    store = StateStore(Counter, state_path, read_attempts=1)
    state_path.write_text('{\n  "schema_version": 1,\n  "count": "x"\n}\n')
    with pytest.raises(StateValidationError, match="count"):
        store.load()
    text = '{\n  "schema_version": 1,\n  "count": 1,\n}\n'
    state_path.write_text(text)
    with pytest.raises(StateCorruptError) as info:
        store.load()
    # Where the json module places the error (the brace before Python 3.13, the comma since).
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    assert (info.value.line, info.value.column) == (expected.value.lineno, expected.value.colno)
    assert info.value.line in (3, 4)


def test_a_large_unchanged_state_is_not_rewritten(state_path: Path) -> None:
    """Large files are compared by digest rather than kept in memory; same result."""
    store = StateStore(Counter, state_path)
    store.save(Counter(note="x" * 400_000))
    inode = state_path.stat().st_ino
    store.update(lambda s: None)
    assert state_path.stat().st_ino == inode
    store.update(lambda s: Counter(count=1, note=s.note))
    assert state_path.stat().st_ino != inode
    assert store.load().count == 1


def test_a_link_and_its_target_share_one_lock(tmp_path: Path) -> None:
    target = tmp_path / "real" / "state.json"
    target.parent.mkdir()
    link = tmp_path / "state.json"
    link.symlink_to(target)
    via_link = StateStore(Counter, link, default=Counter)
    via_target = StateStore(Counter, target, default=Counter)
    assert via_link.lock is not None and via_target.lock is not None
    assert via_link.lock.path == via_target.lock.path == str(target) + ".lock"
    with via_link.transaction() as state:
        state.count = 1
        with pytest.raises(NestedTransactionError):
            via_target.update(lambda s: None)
    assert link.is_symlink()
    assert via_target.load().count == 1
