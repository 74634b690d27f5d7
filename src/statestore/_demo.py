"""``statestore demo``: real processes incrementing one counter, then a tally."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, TextIO

from pydantic import BaseModel

from ._store import StateStore

__all__ = ["demo_main"]


class DemoCounter(BaseModel):
    """The demo's state: one counter and who touched it last."""

    count: int = 0
    last_pid: int | None = None


@dataclass(frozen=True)
class DemoResult:
    expected: int
    final: int
    seconds: float
    waits: list[float]

    @property
    def lost(self) -> int:
        return self.expected - self.final

    def percentile(self, p: float) -> float:
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _worker(path: str, updates: int, start: Any, results: Any) -> None:
    store = StateStore(DemoCounter, path, default=DemoCounter)
    waits = []
    start.wait()
    for _ in range(updates):
        called = time.perf_counter()
        entered = [0.0]

        def bump(state: DemoCounter, entered: list[float] = entered) -> None:
            entered[0] = time.perf_counter()
            state.count += 1
            state.last_pid = os.getpid()

        store.update(bump)
        waits.append(entered[0] - called)
    results.put(waits)


def run_demo(processes: int, updates: int, folder: str, out: TextIO | None = None) -> DemoResult:
    out = sys.stdout if out is None else out  # the stdout of the moment, not of the import
    path = os.path.join(folder, "demo-counter.json")
    store = StateStore(DemoCounter, path, default=DemoCounter)
    store.save(DemoCounter())
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(path, updates, start, results), daemon=True)
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    expected = processes * updates
    print(
        f"statestore demo: {processes} processes x {updates} updates of {path}",
        file=out,
        flush=True,
    )
    time.sleep(0.2)  # let the workers import before the clock starts
    began = time.perf_counter()
    start.set()
    waits: list[float] = []
    pending = processes
    last_shown = -1
    while pending:
        try:
            waits.extend(results.get(timeout=0.25))
            pending -= 1
        except Exception:  # queue.Empty: show progress and keep waiting
            if not any(w.is_alive() for w in workers) and results.empty():
                break
        count = store.load().count
        if count != last_shown:
            print(f"  progress: {count}/{expected}", file=out, flush=True)
            last_shown = count
    seconds = time.perf_counter() - began
    for w in workers:
        w.join(timeout=10)
    final = store.load().count
    result = DemoResult(expected, final, seconds, waits)
    print(
        "\n".join(
            [
                f"expected count:   {expected}",
                f"final count:      {final}",
                f"lost updates:     {result.lost}",
                f"updates/second:   {final / seconds:.0f}",
                f"lock wait p50:    {result.percentile(50) * 1000:.2f} ms",
                f"lock wait p99:    {result.percentile(99) * 1000:.2f} ms",
            ]
        ),
        file=out,
        flush=True,
    )
    return result


def demo_main(processes: int, updates: int, folder: str | None, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="statestore-demo-") as tmp:
            result = run_demo(processes, updates, tmp, out)
    else:
        os.makedirs(folder, exist_ok=True)
        result = run_demo(processes, updates, folder, out)
    if result.lost or any(w < 0 for w in result.waits):
        print(f"FAILED: {result.lost} update(s) lost", file=out)
        return 1
    print("OK: no update lost", file=out)
    return 0
