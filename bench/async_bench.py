"""AsyncStateStore against a hand-rolled asyncio wrapper, side by side in one run.

    python bench/async_bench.py [--tasks 50] [--rounds 5] [--durable]

Contenders, each doing ``--tasks`` concurrent updates of one small document
under ``asyncio.gather``, rounds interleaved:

* ``AsyncStateStore.update`` (plain function, and ``async def`` function);
* ``asyncio.Lock`` + ``asyncio.to_thread(store.update)``: what a program writes
  by hand around the sync store;
* the sync ``StateStore.update`` in a plain loop (no event loop), the floor.

Prints the median time per update of each and its ratio to the hand-rolled
wrapper. To compare revisions, run it with ``PYTHONPATH=<tree>/src``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from statestore import AsyncStateStore, StateStore


class Counter(BaseModel):
    count: int = 0
    note: str = "x" * 200


def bump(state: Counter) -> None:
    state.count += 1


async def abump(state: Counter) -> None:
    state.count += 1


def run_async_store(path: Path, tasks: int, durable: bool, fn: object) -> float:
    store = AsyncStateStore(Counter, path, default=Counter, durable=durable)

    async def main() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(store.update(fn) for _ in range(tasks)))  # type: ignore[arg-type]
        return time.perf_counter() - t

    return asyncio.run(main()) / tasks


def run_wrapper(path: Path, tasks: int, durable: bool) -> float:
    store = StateStore(Counter, path, default=Counter, durable=durable)

    async def main() -> float:
        lock = asyncio.Lock()

        async def one() -> None:
            async with lock:
                await asyncio.to_thread(store.update, bump)

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(tasks)))
        return time.perf_counter() - t

    return asyncio.run(main()) / tasks


def run_sync(path: Path, tasks: int, durable: bool) -> float:
    store = StateStore(Counter, path, default=Counter, durable=durable)
    t = time.perf_counter()
    for _ in range(tasks):
        store.update(bump)
    return (time.perf_counter() - t) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--durable", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {
            "AsyncStateStore.update (plain fn)": lambda p: run_async_store(
                p, args.tasks, args.durable, bump
            ),
            "AsyncStateStore.update (async fn)": lambda p: run_async_store(
                p, args.tasks, args.durable, abump
            ),
            "asyncio.Lock + to_thread(store.update)": lambda p: run_wrapper(
                p, args.tasks, args.durable
            ),
            "StateStore.update, sync loop": lambda p: run_sync(p, args.tasks, args.durable),
        }
        for r in range(args.rounds):
            for name, fn in contenders.items():
                path = Path(tmp) / f"{r}-{abs(hash(name))}.json"
                results.setdefault(name, []).append(fn(path))
    base = statistics.median(results["asyncio.Lock + to_thread(store.update)"])
    print(f"{args.tasks} tasks, {args.rounds} rounds, durable={args.durable}")
    print("| contender | per update (ms, median) | vs wrapper |")
    print("|---|---|---|")
    for name, times in results.items():
        m = statistics.median(times)
        print(f"| {name} | {m * 1000:.2f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
