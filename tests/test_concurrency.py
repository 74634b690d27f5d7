"""Many real processes and threads updating one file: no update is ever lost."""

from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path

import pytest
import workers
from conftest import Counter, temp_files

from statestore import StateStore

pytestmark = pytest.mark.timeout(180)


def _run_processes(path: Path, processes: int, times: int, threads: int = 1) -> None:
    start = path.parent / "start"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=workers.increment, args=(str(path), times, str(start), threads))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    start.touch()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * processes


def test_eight_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _run_processes(path, processes=8, times=200)
    assert StateStore(Counter, path).load().count == 1600
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start", "state.json"]


def test_threads_in_one_process_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(Counter, path, default=Counter)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(200):

                def bump(s: Counter) -> None:
                    s.count += 1

                store.update(bump)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.load().count == 1600


def test_threads_in_several_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _run_processes(path, processes=4, times=50, threads=4)
    assert StateStore(Counter, path).load().count == 800


def test_lock_free_readers_never_see_a_torn_state(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(Counter, path, default=Counter, durable=False)
    store.save(Counter(note="x" * 5000))
    stop = threading.Event()
    seen: list[list[int]] = [[], [], []]
    errors: list[BaseException] = []

    def read(mine: list[int]) -> None:
        reader = StateStore(Counter, path, read_attempts=1)
        try:
            while not stop.is_set():
                state = reader.load()
                assert state.note == "x" * 5000
                mine.append(state.count)
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for t in readers:
        t.start()
    ctx = mp.get_context("spawn")
    start = tmp_path / "start"
    writer = ctx.Process(target=workers.increment, args=(str(path), 300, str(start)))
    writer.start()
    start.touch()
    writer.join(120)
    stop.set()
    for t in readers:
        t.join()
    assert writer.exitcode == 0
    assert errors == []
    for mine in seen:
        assert len(mine) > 10
        assert mine == sorted(mine)  # a reader never goes back in time
    assert store.load().count == 300
