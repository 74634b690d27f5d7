"""``history=N``, ``store.history()`` and ``store.restore()`` (docs/revisions.md).

The history is bounded at N under a long run and across processes, recorded
in commit order under the lock, keeps the version a hand edit made (recorded
by the next commit), and ``restore()`` is a new commit of old bytes, validated
and migrated from an older schema version, writing nothing when it cannot.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter
from pydantic import BaseModel

from statestore import (
    MigrationError,
    StateFolder,
    StateReadError,
    StateStore,
    StateValidationError,
)

TESTS = str(Path(__file__).parent)


def _counter(revision: str) -> int:
    return int(revision.split("-", 1)[0])


def _version_files(path: Path) -> list[str]:
    folder = path.parent / ".statestore-history" / path.name
    return sorted(n for n in os.listdir(folder) if n.endswith(".version"))


def test_history_is_bounded_newest_first_and_private(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.touch(mode=0o644)
    path.unlink()
    store = StateStore(Counter, path, default=Counter, history=5)
    for _ in range(40):
        store.update(lambda s: Counter(count=s.count + 1))
    entries = store.history()
    assert len(entries) == 5 and len(_version_files(path)) == 5
    assert entries[0].revision == store.read().revision
    assert [_counter(e.revision) for e in entries] == [40, 39, 38, 37, 36]
    assert all(e.written_by is not None and e.written_by.pid == os.getpid() for e in entries)
    assert all(e.size > 0 and e.time > 0 for e in entries)
    folder = path.parent / ".statestore-history" / path.name
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for name in _version_files(path):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o600


def test_restore_is_a_new_commit_of_the_old_state(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter, history=10)
    store.save(Counter(count=1))
    old = store.read()
    store.save(Counter(count=2))
    newer = store.read()
    restored = store.restore(old.revision)
    assert restored == Counter(count=1)
    now = store.read()
    assert now.state == Counter(count=1)
    assert _counter(now.revision) == _counter(newer.revision) + 1
    assert now.revision not in (old.revision, newer.revision)
    assert now.written_by is not None and now.written_by.pid == os.getpid()
    assert [e.revision for e in store.history()][:3] == [now.revision, newer.revision, old.revision]
    assert store.version_bytes(old.revision).endswith(b'"count": 1,\n  "note": ""\n}\n')


def test_a_hand_edit_is_kept_by_the_next_commit_and_can_be_restored(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter, history=10)
    store.save(Counter(count=1))
    path.write_text(path.read_text().replace('"count": 1', '"count": 50'))
    edited = store.read()
    store.save(Counter(count=2))
    entries = store.history()
    assert [e.revision for e in entries][:2] == [store.read().revision, edited.revision]
    assert entries[1].written_by is None  # a person's version: no writer
    store.restore(edited.revision)
    assert store.load().count == 50


def test_turning_history_on_keeps_the_state_it_replaces(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    StateStore(Counter, path, default=Counter).save(Counter(count=7))
    before = StateStore(Counter, path).read().revision
    store = StateStore(Counter, path, default=Counter, history=3)
    store.save(Counter(count=8))
    assert [e.revision for e in store.history()] == [store.read().revision, before]


def test_restore_of_an_unknown_revision_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter, history=2)
    for n in range(4):
        store.save(Counter(count=n))
    first = _counter(store.history()[-1].revision)
    before = path.read_bytes()
    with pytest.raises(StateReadError) as info:
        store.restore("1-0000000000000000")
    assert info.value.errno == errno.ENOENT and "pruned" in str(info.value)
    assert path.read_bytes() == before
    assert first == 3


class V1(BaseModel):
    name: str = ""


class V2(BaseModel):
    first: str = ""
    last: str = ""


def _split(doc: dict[str, Any]) -> dict[str, Any]:
    first, _, last = doc.pop("name").partition(" ")
    return {**doc, "first": first, "last": last}


def test_restore_migrates_a_version_of_an_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    v1 = StateStore(V1, path, default=V1, history=10)
    v1.save(V1(name="Ada Lovelace"))
    old = v1.read().revision
    v2 = StateStore(V2, path, default=V2, version=2, migrations={1: _split}, history=10)
    v2.update(lambda s: V2(first="Grace", last="Hopper"))
    assert v2.restore(old) == V2(first="Ada", last="Lovelace")
    assert '"schema_version": 2' in path.read_text()
    assert v2.load() == V2(first="Ada", last="Lovelace")


def test_restore_of_a_version_that_no_longer_fits_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    v1 = StateStore(V1, path, default=V1, history=10)
    v1.save(V1(name="Ada"))
    old = v1.read().revision

    class Strict(BaseModel):
        name: int

    strict = StateStore(Strict, path, history=10)
    path.write_text('{"name": 3}')
    before = path.read_bytes()
    with pytest.raises((StateValidationError, MigrationError)):
        strict.restore(old)
    assert path.read_bytes() == before


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from conftest import Counter
    from statestore import StateStore
    store = StateStore(Counter, sys.argv[2], default=Counter, history=int(sys.argv[4]))
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.0005)
    for _ in range(int(sys.argv[5])):
        store.update(lambda s: Counter(count=s.count + 1))
    """
)


def test_two_processes_record_in_commit_order_and_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    gate = tmp_path / "gate"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, TESTS, str(path), str(gate), "30", "15"])
        for _ in range(2)
    ]
    gate.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0
    store = StateStore(Counter, path, default=Counter, history=30)
    assert store.load().count == 30
    entries = store.history()
    assert len(entries) == 30 and len(_version_files(path)) == 30
    # Newest first, one per commit, in the order of the commits.
    assert [_counter(e.revision) for e in entries] == list(range(30, 0, -1))
    pids = {e.written_by.pid for e in entries if e.written_by is not None}
    assert pids == {p.pid for p in procs}


def test_a_folders_document_keeps_a_history(tmp_path: Path) -> None:
    folder = StateFolder(tmp_path / "f")
    store = folder.store(Counter, "c.json", default=Counter, history=3)
    for _ in range(5):
        store.update(lambda s: Counter(count=s.count + 1))
    assert [_counter(e.revision) for e in store.history()] == [5, 4, 3]
    with folder.transaction() as tx:
        tx[store].count = 10
    assert _counter(store.read().revision) == 6
    store.update(lambda s: Counter(count=s.count + 1))
    # The group commit's version is kept by the next commit, before its own.
    assert [_counter(e.revision) for e in store.history()] == [7, 6, 5]


def test_history_options_and_misuse(tmp_path: Path) -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            StateStore(Counter, tmp_path / "s.json", history=bad)  # type: ignore[arg-type]
    plain = StateStore(Counter, tmp_path / "s.json", default=Counter)
    with pytest.raises(TypeError, match="history"):
        plain.history()
    with pytest.raises(TypeError, match="history"):
        plain.restore("1-abc")
    assert plain.with_path(tmp_path / "t.json").history_size is None
    kept = StateStore(Counter, tmp_path / "s.json", default=Counter, history=4)
    assert kept.with_path(tmp_path / "t.json").history_size == 4
