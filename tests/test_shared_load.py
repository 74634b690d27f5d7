"""``load(shared=True)``: the model of unchanged bytes is handed out again, never a stale one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from pydantic import BaseModel

from statestore import AsyncStateStore, StateCorruptError, StateStore


class Doc(BaseModel):
    n: int = 0
    names: list[str] = []


@pytest.fixture
def store(tmp_path: Path) -> StateStore[Doc]:
    s = StateStore(Doc, tmp_path / "state.json", default=Doc)
    s.save(Doc(n=1, names=["a"]))
    return s


def test_unchanged_bytes_give_the_same_model(store: StateStore[Doc]) -> None:
    first = store.load(shared=True)
    assert store.load(shared=True) is first
    assert store.read(shared=True).state is first
    assert store.load() is not first and store.load() == first  # a plain load: its own


def test_every_commit_is_seen(store: StateStore[Doc]) -> None:
    first = store.load(shared=True)
    store.update(lambda s: Doc(n=s.n + 1))
    second = store.load(shared=True)
    assert second is not first and second.n == 2


def test_another_processs_commit_is_seen(store: StateStore[Doc]) -> None:
    first = store.load(shared=True)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            StateStore(Doc, store.path).update(lambda s: Doc(n=s.n + 1))
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert store.load(shared=True).n == 2 and first.n == 1


def test_a_same_size_same_time_hand_edit_is_seen(store: StateStore[Doc]) -> None:
    # The stat-only key a cache could use (size, mtime) is the same; the bytes are not.
    first = store.load(shared=True)
    path = store.path
    st = path.stat()
    data = path.read_bytes()
    edited = data.replace(b'"a"', b'"b"')
    assert len(edited) == len(data)
    with open(path, "r+b") as f:  # in place, as some editors and tools write
        f.write(edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    again = store.load(shared=True)
    assert again is not first and again.names == ["b"]


def test_a_file_that_breaks_is_an_error_not_the_old_model(store: StateStore[Doc]) -> None:
    store.load(shared=True)
    store.path.write_text("{ not json")
    with pytest.raises(StateCorruptError):
        store.load(shared=True)


def test_a_deleted_file_gives_the_default_not_the_old_model(store: StateStore[Doc]) -> None:
    store.load(shared=True)
    store.path.unlink()
    assert store.load(shared=True) == Doc()


def test_a_change_to_the_shared_model_is_not_saved_and_update_starts_from_the_file(
    store: StateStore[Doc],
) -> None:
    shared = store.load(shared=True)
    shared.n = 99  # what the docs say not to do
    assert store.load().n == 1  # not on disk
    assert store.update(lambda s: Doc(n=s.n + 1)).n == 2


def test_the_async_store_shares_too(store: StateStore[Doc]) -> None:
    async def main() -> None:
        a = AsyncStateStore(Doc, store.path)
        first = await a.load(shared=True)
        assert (await a.load(shared=True)) is first
        assert (await a.read(shared=True)).state is first
        assert (await a.load()) is not first

    asyncio.run(main())
