"""A group commit of k documents against k separate updates, side by side in one run.

    python bench/folder_bench.py [--docs 1,2,4,8] [--rounds 7] [--groups 60]

Each contender changes k documents of about 1 KB (durable: every fsync done),
``--groups`` times, rounds interleaved; the median time per group is printed
with its ratio to the first contender:

* ``folder.transaction()``: one lock, one group commit of the k documents;
* ``k x update(), folder lock held``: the k documents' stores updated one after
  the other while the folder's lock is held (each commits through the journal);
* ``k x update(), one shared DirectoryLock``: k plain files (not in a declared
  folder) sharing one lock, as before state folders: not atomic as a group.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from statestore import DirectoryLock, StateFolder, StateStore


class Task(BaseModel):
    title: str
    done: bool = False
    tags: list[str] = []


class Doc(BaseModel):
    owner: str = "planner"
    counter: int = 0
    tasks: list[Task] = [Task(title=f"task number {i}", tags=["a", "b"]) for i in range(14)]


def bump(state: Doc) -> None:
    state.counter += 1


def group(folder: StateFolder, stores: list[StateStore[Doc]], groups: int) -> float:
    t = time.perf_counter()
    for _ in range(groups):
        with folder.transaction() as tx:
            for s in stores:
                tx[s].counter += 1
    return (time.perf_counter() - t) / groups


def separate_under_folder_lock(
    folder: StateFolder, stores: list[StateStore[Doc]], groups: int
) -> float:
    t = time.perf_counter()
    for _ in range(groups):
        with folder.lock:
            for s in stores:
                s.update(bump)
    return (time.perf_counter() - t) / groups


def separate_shared_lock(lock: DirectoryLock, stores: list[StateStore[Doc]], groups: int) -> float:
    t = time.perf_counter()
    for _ in range(groups):
        with lock:
            for s in stores:
                s.update(bump)
    return (time.perf_counter() - t) / groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--groups", type=int, default=60)
    args = parser.parse_args()
    print(f"{len(Doc().model_dump_json(indent=2))} bytes per document, durable")
    print(
        "| k | folder.transaction() | k x update(), folder lock held | k x update(), shared lock |"
    )
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for k in map(int, args.docs.split(",")):
            folder = StateFolder(Path(tmp) / f"folder{k}")
            in_folder = [folder.store(Doc, f"d{i}.json", default=Doc) for i in range(k)]
            lock = DirectoryLock(Path(tmp) / f"plain{k}.lock")
            plain = [
                StateStore(Doc, Path(tmp) / f"plain{k}-{i}.json", default=Doc, lock=lock)
                for i in range(k)
            ]
            times: dict[str, list[float]] = {"g": [], "f": [], "p": []}
            for _ in range(args.rounds):
                times["g"].append(group(folder, in_folder, args.groups))
                times["f"].append(separate_under_folder_lock(folder, in_folder, args.groups))
                times["p"].append(separate_shared_lock(lock, plain, args.groups))
            g, f, p = (statistics.median(times[c]) for c in "gfp")
            print(
                f"| {k} | {g * 1e3:.2f} ms | {f * 1e3:.2f} ms ({f / g:.2f}x) "
                f"| {p * 1e3:.2f} ms ({p / g:.2f}x) |"
            )


if __name__ == "__main__":
    main()
