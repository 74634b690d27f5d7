"""``store.watch()``, ``store.on_change()`` and ``AsyncStateStore.watch()`` (docs/watching.md).

Real processes write while this one watches (and the other way round); a hand
edit is a plain ``open().write()``. Properties, not latencies: every revision of
a slow writer is seen, in order; a fast writer's burst ends at its newest
revision with fewer snapshots than commits; an invalid document is an error
raised from ``next()``, once, and never a state; an idle watcher uses no CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import Counter

from statestore import (
    AsyncStateStore,
    Snapshot,
    StateCorruptError,
    StateStore,
    StateStoreError,
    StateValidationError,
)

TESTS = str(Path(__file__).parent)

_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from conftest import Counter
    from statestore import StateStore
    store = StateStore(Counter, sys.argv[2], default=Counter)
    times, pause, ack = int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    for n in range(1, times + 1):
        store.update(lambda s: Counter(count=s.count + 1))
        print(store.read().revision, flush=True)
        time.sleep(pause)
        end = time.monotonic() + 20
        while ack and not os.path.exists(f"{ack}{n}") and time.monotonic() < end:
            time.sleep(0.001)  # a slow writer: the next commit after the watcher saw this one
    """
)


def _writer(path: Path, times: int, pause: float, ack: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, TESTS, str(path), str(times), str(pause), ack],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_slow_writer_in_another_process_is_seen_at_every_revision(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=0))
    watch = store.watch(timeout=10.0)
    ack = str(tmp_path / "seen-")
    proc = _writer(path, 5, 0.05, ack)
    seen = []
    for snap in watch:
        seen.append(snap)
        Path(f"{ack}{snap.state.count}").touch()
        if snap.state.count == 5:
            break
    watch.close()
    written = proc.communicate(timeout=30)[0].split()
    assert proc.returncode == 0
    assert [s.revision for s in seen] == written
    assert [s.state.count for s in seen] == [1, 2, 3, 4, 5]
    assert all(s.written_by is not None and s.written_by.pid == proc.pid for s in seen)


def test_a_fast_writers_burst_is_coalesced_to_the_newest_revision(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter, durable=False)
    store.save(Counter(count=0))
    watch = store.watch(timeout=10.0)
    done = threading.Event()

    def write() -> None:
        fast = StateStore(Counter, path, default=Counter, durable=False)
        for _ in range(300):
            fast.update(lambda s: Counter(count=s.count + 1))
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    time.sleep(0.2)  # let commits pile up while nobody reads: one wake-up for them all
    for snap in watch:
        seen.append(snap)
        if snap.state.count == 300:
            break
    writer.join()
    watch.close()
    counters = [int(s.revision.split("-")[0]) for s in seen]
    assert counters == sorted(set(counters))  # in order, never the same twice
    assert seen[-1].revision == store.read().revision
    assert len(seen) < 300


def test_a_hand_edit_is_reported_without_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    with store.watch(timeout=10.0) as watch:
        text = path.read_text()
        with open(path, "w") as f:  # in place, not by a rename
            f.write(text.replace('"count": 1', '"count": 2'))
        snap = next(watch)
    assert snap.state.count == 2 and snap.written_by is None
    assert snap.revision == store.read().revision


def test_an_invalid_document_is_an_error_event_once_then_watching_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    watch = store.watch(timeout=2.0)
    path.write_text('{"count": "many"}')
    with pytest.raises(StateValidationError):
        next(watch)
    os.utime(path)  # a wake-up, the same bad bytes: not reported again
    path.write_text("{not json")
    with pytest.raises(StateCorruptError):
        next(watch)
    os.chmod(path, 0o644)
    with pytest.raises(StateCorruptError):
        store.save(Counter(count=3))  # a file that does not parse is not overwritten ...
    snap = next(watch, None)
    assert snap is None  # ... so nothing new happened
    path.write_text(json.dumps({"count": 4}))
    snap = next(watch)
    assert snap.state.count == 4
    watch.close()


def test_a_timeout_without_a_change_ends_the_iteration(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    store.save(Counter(count=1))
    with store.watch(timeout=0.2) as watch:
        assert list(watch) == []


def test_close_from_another_thread_ends_a_blocked_next(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    watch = store.watch()
    threading.Timer(0.2, watch.close).start()
    assert next(watch, None) is None
    assert watch.closed


def test_an_idle_watcher_uses_no_cpu(tmp_path: Path) -> None:
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    store.save(Counter(count=1))
    watch = store.watch()
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(next(watch, None)))
    thread.start()
    time.sleep(0.1)
    cpu = time.process_time()
    time.sleep(1.0)
    used = time.process_time() - cpu
    watch.close()
    thread.join(5)
    assert results == [None]
    assert used < 0.05, f"an idle watcher used {used:.3f} s of CPU in 1 s"


_WATCHER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from conftest import Counter
    from statestore import StateStore, StateStoreError
    store = StateStore(Counter, sys.argv[2], default=Counter)
    until = int(sys.argv[3])
    with store.watch(timeout=20.0) as watch:
        print("ready", flush=True)
        while True:
            try:
                for snap in watch:
                    print(snap.revision, snap.state.count, flush=True)
                    if snap.state.count >= until:
                        sys.exit(0)
                sys.exit(1)  # timed out
            except StateStoreError as e:  # a hand edit seen halfway: an error event
                print("error", type(e).__name__, flush=True)
    """
)


def test_a_watcher_in_another_process_sees_every_revision_and_a_hand_edit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=0))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, TESTS, str(path), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    made, seen = [], []
    for n in (1, 2, 3):
        store.save(Counter(count=n))
        made.append(store.read().revision)
        seen.append(proc.stdout.readline().split()[0])  # the writer is slow: one at a time
    # By hand, in place (truncate, then write): the watcher may see the empty file
    # between the two, an error event, never a state.
    path.write_text(path.read_text().replace('"count": 3', '"count": 4'))
    made.append(store.read().revision)
    rest = proc.communicate(timeout=30)[0].split("\n")
    assert proc.returncode == 0
    seen += [line.split()[0] for line in rest if line and not line.startswith("error")]
    assert seen == made
    assert all(line.split()[1] == "StateCorruptError" for line in rest if line.startswith("error"))


def test_on_change_calls_back_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=0))
    got: list[int] = []
    errors: list[StateStoreError] = []
    changed = threading.Event()

    def fn(snap: Snapshot[Counter]) -> None:
        got.append(snap.state.count)
        changed.set()

    def on_error(e: StateStoreError) -> None:
        errors.append(e)
        changed.set()

    handle = store.on_change(fn, on_error=on_error)
    proc = _writer(path, 1, 0)
    proc.communicate(timeout=30)
    assert changed.wait(10)
    changed.clear()
    path.write_text("[1, 2]")
    assert changed.wait(10)
    handle.stop()
    assert not handle.running
    assert got == [1]
    assert len(errors) == 1 and isinstance(errors[0], StateCorruptError)
    path.write_text(json.dumps({"count": 5}))
    time.sleep(0.2)
    assert got == [1]  # stopped: no more calls


def test_async_watch_sees_commits_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "s.json"

    async def main() -> list[int]:
        store = AsyncStateStore(Counter, path, default=Counter)
        await store.save(Counter(count=0))
        seen = []
        proc = _writer(path, 3, 0.3)
        async with store.watch(timeout=10.0) as watch:
            ticks = 0

            async def tick() -> None:  # the loop stays free while the watch waits
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            async for snap in watch:
                seen.append(snap.state.count)
                if snap.state.count == 3:
                    break
            ticker.cancel()
        proc.communicate(timeout=30)
        assert ticks > 10
        return seen

    assert asyncio.run(main()) == [1, 2, 3]


def test_watch_is_refused_for_a_storage_without_a_file(tmp_path: Path) -> None:
    class Memory:
        location = "memory:"

        def read(self) -> bytes | None:
            return None

        def exists(self) -> bool:
            return False

        def session(self, timeout: float) -> object:
            raise NotImplementedError

    store = StateStore(Counter, Memory(), default=Counter)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="file stores"):
        store.watch()


def test_a_document_created_and_deleted_while_watched(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = StateStore(Counter, path, default=Counter)
    with store.watch(timeout=10.0) as watch:
        StateStore(Counter, path).save(Counter(count=2))
        created = next(watch)
        assert created.state.count == 2 and created.revision != "0"
        path.unlink()
        gone = next(watch)
        assert gone.revision == "0" and gone.state == Counter() and gone.written_by is None
