"""Revisions, ``read()``, ``save(expect=)`` and ``ConflictError`` (docs/revisions.md).

Rules tested from several sides: the revision changes on every commit and on
every hand edit (one that keeps the counter too), the counter orders
statestore's commits, ``written_by`` is trusted only while the stamp matches
the bytes, an ``expect=`` that no longer holds writes nothing, and two
processes racing with the same ``expect=`` never both win.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Counter
from pydantic import BaseModel, ConfigDict

from statestore import ConflictError, Snapshot, StateStore, StateStoreError, WrittenBy


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = 0


def _counter(revision: str) -> int:
    return int(revision.split("-", 1)[0])


def test_read_gives_state_revision_and_writer(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    first = store.read()
    assert isinstance(first, Snapshot)
    assert first.revision == "0" and first.written_by is None and first.state == Counter()
    store.save(Counter(count=1))
    snap = store.read()
    assert snap.state.count == 1
    assert _counter(snap.revision) == 1
    assert isinstance(snap.written_by, WrittenBy)
    assert snap.written_by.pid == os.getpid()
    assert snap.written_by.host == os.uname().nodename
    assert snap.written_by.time.tzinfo is not None
    assert store.load() == snap.state


def test_every_commit_changes_the_revision_and_the_counter_orders_them(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    seen = []
    for n in range(5):
        store.save(Counter(count=n % 2))  # the same content every other time
        seen.append(store.read().revision)
    assert len(set(seen)) == 5
    assert [_counter(r) for r in seen] == [1, 2, 3, 4, 5]


def test_a_save_of_the_same_state_is_no_commit(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    store.save(Counter(count=3))
    before = (tmp_path / "s.json").read_bytes()
    store.save(Counter(count=3))
    store.update(lambda s: None)
    assert (tmp_path / "s.json").read_bytes() == before


def test_a_hand_edit_that_keeps_the_counter_is_a_new_revision(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    snap = store.read()
    text = path.read_text()
    with open(path, "w") as f:  # a person's edit: same layout, same stamp line
        f.write(text.replace('"count": 1', '"count": 7'))
    edited = store.read()
    assert edited.state.count == 7
    assert edited.revision != snap.revision
    assert _counter(edited.revision) == _counter(snap.revision)  # the number is untouched
    assert edited.written_by is None  # the stamp no longer matches the bytes
    # The next commit counts on from the edited document.
    store.update(lambda s: Counter(count=s.count + 1))
    after = store.read()
    assert _counter(after.revision) == 2 and after.written_by is not None


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t + "\n",  # whitespace only, at the end
        lambda t: json.dumps(json.loads(t)),  # reformatted on one line
        lambda t: t.replace('"revision": 1', '"revision": 1 '),  # inside the stamp
        lambda t: t.replace('"pid": ', '"pid": 1'),  # the writer forged
    ],
)
def test_any_byte_changed_by_hand_changes_the_revision(tmp_path: Path, edit: object) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    snap = store.read()
    path.write_text(edit(path.read_text()))  # type: ignore[operator]
    edited = store.read()
    assert edited.revision != snap.revision
    assert edited.state.count == 1


def test_a_reformatted_document_keeps_its_counter_but_not_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    for n in range(3):
        store.save(Counter(count=n))
    path.write_text(json.dumps(json.loads(path.read_text())))
    snap = store.read()
    assert _counter(snap.revision) == 3 and snap.written_by is None
    store.save(Counter(count=9))
    assert _counter(store.read().revision) == 4


def test_files_without_a_stamp_load_as_revision_zero(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{\n  "schema_version": 1,\n  "count": 4\n}\n')  # an older version's file
    store = StateStore(Counter, path, default=Counter)
    snap = store.read()
    assert snap.state.count == 4 and _counter(snap.revision) == 0 and snap.written_by is None
    store.save(Counter(count=5))
    assert _counter(store.read().revision) == 1


@pytest.mark.parametrize("model", [Counter, Strict])
def test_the_stamp_is_never_the_models_input(tmp_path: Path, model: type[BaseModel]) -> None:
    path = tmp_path / "s.json"
    store = StateStore(model, path, default=model)
    store.save(model(count=2))
    assert store.load() == model(count=2)
    # The general path too (not the store's layout: the fast path does not apply).
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    assert store.load() == model(count=2)


def test_a_model_key_named_like_the_stamp_is_refused(tmp_path: Path) -> None:
    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")

    store = StateStore(Open, tmp_path / "s.json", default=Open)
    with pytest.raises(StateStoreError, match=r"\$commit"):
        store.save(Open.model_validate({"$commit": {"revision": 99}}))
    assert not (tmp_path / "s.json").exists()


def test_save_with_a_stale_expect_raises_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    stale = store.read()
    store.update(lambda s: Counter(count=s.count + 1))
    current = store.read()
    before = path.read_bytes()
    with pytest.raises(ConflictError) as info:
        store.save(Counter(count=100), expect=stale.revision)
    e = info.value
    assert e.path == str(path) and e.expected == stale.revision and e.found == current.revision
    assert stale.revision in str(e) and current.revision in str(e) and str(path) in str(e)
    assert path.read_bytes() == before
    again = pickle.loads(pickle.dumps(e))
    assert (again.expected, again.found, str(again)) == (e.expected, e.found, str(e))
    store.save(Counter(count=100), expect=current.revision)
    assert store.load().count == 100


def test_expect_detects_a_hand_edit(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    snap = store.read()
    path.write_text(path.read_text().replace('"count": 1', '"count": 2'))
    with pytest.raises(ConflictError):
        store.save(Counter(count=3), expect=snap.revision)
    assert store.load().count == 2


def test_expect_no_revision_means_only_if_there_is_no_document(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    store.save(Counter(count=1), expect="0")
    with pytest.raises(ConflictError):
        store.save(Counter(count=2), expect="0")
    assert store.load().count == 1
    with pytest.raises(TypeError):
        store.save(Counter(count=2), expect=1)  # type: ignore[arg-type]


_RACER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[4])
    from conftest import Counter
    from statestore import ConflictError, StateStore
    store = StateStore(Counter, sys.argv[1], default=Counter)
    expect, gate = sys.argv[2], sys.argv[3]
    while not os.path.exists(gate):
        time.sleep(0.0005)
    try:
        store.save(Counter(count=os.getpid()), expect=expect)
        print("won", os.getpid())
    except ConflictError as e:
        assert e.expected == expect and e.found != expect, e
        print("lost", e.found)
    """
)


def test_two_processes_with_the_same_expect_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=0))
    tests = str(Path(__file__).parent)
    for round_ in range(8):
        expect = store.read().revision
        gate = tmp_path / f"gate{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, str(path), expect, str(gate), tests],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        gate.touch()
        outs = [p.communicate(timeout=60)[0].split() for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        winners = [int(o[1]) for o in outs if o[0] == "won"]
        assert len(winners) == 1, outs
        after = store.read()
        assert after.state.count == winners[0]
        assert _counter(after.revision) == _counter(expect) + 1
        assert after.written_by is not None and after.written_by.pid == winners[0]
        loser = next(o for o in outs if o[0] == "lost")
        assert loser[1] == after.revision


def test_update_and_transaction_are_unchanged(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    with store.transaction() as state:
        state.count = 5
    assert store.update(lambda s: Counter(count=s.count + 1)).count == 6
    assert _counter(store.read().revision) == 2


@pytest.mark.parametrize("model", [Counter, Strict])
def test_a_stamped_file_stays_on_loads_fast_path(tmp_path: Path, model: type[BaseModel]) -> None:
    store = StateStore(model, tmp_path / "s.json", default=model, schema_ref="s.schema.json")
    store.save(model(count=3))
    raw = (tmp_path / "s.json").read_bytes()
    assert b'"$commit"' in raw
    fast = store.document._fast_load(raw)  # not the general path: no dict built
    assert fast is not None and fast.model == model(count=3)
