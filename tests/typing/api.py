"""Usage examples that must type-check under mypy --strict (pins the generic inference)."""

from __future__ import annotations

from pydantic import BaseModel
from typing_extensions import assert_type

from statestore import DirectoryLock, LockOwner, MigrationReport, StateStore


class Counter(BaseModel):
    count: int = 0


class Other(BaseModel):
    name: str = ""


def inference(path: str) -> None:
    store = StateStore(Counter, path)
    assert_type(store, StateStore[Counter])
    assert_type(store.load(), Counter)
    assert_type(store.load(shared=True), Counter)
    assert_type(store.read(shared=True).state, Counter)

    with_default = StateStore(Counter, path, default=Counter)
    assert_type(with_default, StateStore[Counter])
    assert_type(StateStore(Counter, path, default=Counter(count=3)), StateStore[Counter])

    def bump(state: Counter) -> None:
        state.count += 1

    def replace(state: Counter) -> Counter:
        return Counter(count=state.count + 1)

    assert_type(store.update(bump), Counter)
    assert_type(store.update(replace), Counter)
    assert_type(store.update(lambda s: s.model_copy(update={"count": 1})), Counter)

    with store.transaction() as state:
        assert_type(state, Counter)
        state.count += 1

    store.save(Counter())
    assert_type(store.exists(), bool)
    assert_type(store.migrate(dry_run=True), MigrationReport)


def shared_lock(folder: str) -> None:
    lock = DirectoryLock(folder + "/state.lock", timeout=5.0, lease=30.0)
    a = StateStore(Counter, folder + "/a.json", lock=lock)
    b = StateStore(Other, folder + "/b.json", lock=lock)
    assert_type(a, StateStore[Counter])
    assert_type(b, StateStore[Other])
    with lock:
        owner = lock.owner()
        assert_type(owner, LockOwner | None)


def rejected(path: str) -> None:
    store = StateStore(Counter, path)
    store.save(Other())  # type: ignore[arg-type]
    store.update(lambda s: Other())  # type: ignore[arg-type, return-value]
    StateStore(Counter, path, default=Other())  # type: ignore[arg-type]


async def asyncio_api(path: str) -> None:
    from statestore import AsyncStateStore

    assert_type(AsyncStateStore(Counter, path), AsyncStateStore[Counter])
    store = AsyncStateStore(Counter, path, default=Counter, timeout=5.0)
    assert_type(store, AsyncStateStore[Counter])
    assert_type(store.sync, StateStore[Counter])
    assert_type(AsyncStateStore.from_store(StateStore(Other, path)), AsyncStateStore[Other])
    assert_type(await store.load(), Counter)
    assert_type(await store.load(shared=True), Counter)
    assert_type(await store.exists(), bool)

    def bump(state: Counter) -> None:
        state.count += 1

    async def replace(state: Counter) -> Counter:
        return Counter(count=state.count + 1)

    assert_type(await store.update(bump), Counter)
    assert_type(await store.update(replace), Counter)
    assert_type(await store.update(lambda s: s.model_copy(update={"count": 1})), Counter)

    async with store.transaction() as state:
        assert_type(state, Counter)
        state.count += 1

    await store.save(Counter())
    assert_type(await store.migrate(dry_run=True), MigrationReport)
    assert_type(store.version, int)

    await store.save(Other())  # type: ignore[arg-type]
    await store.update(lambda s: Other())  # type: ignore[arg-type, return-value]
