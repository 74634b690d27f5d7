"""The performance targets of one run, side by side, on the realistic document.

    python bench/targets.py                # about two minutes on 2 cores
    python bench/targets.py --quick        # a smoke test

Every figure is a median of interleaved rounds (contenders alternate within
each round, so they share the machine's noise); read the ratios. Sections:

1. a durable update at 1 KB, 100 KB, 1 MB and 10 MB: statestore (a file, and
   over ``SqliteStorage``), the hand-rolled filelock + fsync baseline, SQLite
   WAL with synchronous=FULL (one row per document), and at 1 KB the raw floor
   (write, fsync, rename, fsync of the folder; no lock, no validation);
2. threads: 8 threads updating through one store against 1 thread, aggregate
   updates per second (the group commit);
3. a repeated load of an unchanged 1 MB document: ``load()``,
   ``load(shared=True)``, and the byte comparison it rests on.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import contenders  # noqa: E402
from bench_common import Doc, make_doc, parse_size  # noqa: E402

from statestore import StateStore  # noqa: E402

UPDATE_KEYS = [
    "statestore-durable",
    "statestore-sqlite",
    "filelock-fsync",
    "sqlite-full",
    "raw-floor",
]


def timed(fn: Callable[[], Any], n: int) -> float:
    """Median seconds of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def updates(
    sizes: list[str], rounds: int, per: dict[str, int], root: str, extra_copy: bool
) -> list[str]:
    heap = "the process holding one more copy of the document" if extra_copy else "a clean heap"
    lines = [f"### 1. Durable update, median ms (ratios to statestore's), {heap}", ""]
    for label in sizes:
        size = parse_size(label)
        held = make_doc(size) if extra_copy else None  # a program's own copy, for the collector
        keys = [k for k in UPDATE_KEYS if k != "raw-floor" or size <= 1024]
        built: dict[str, Any] = {}
        for key in keys:
            folder = tempfile.mkdtemp(prefix=f"{key}-", dir=root)
            try:
                c = contenders.make(key, os.path.join(folder, "state.json"), Doc)
            except contenders.Unavailable as e:
                lines.append(f"- {key}: skipped ({e})")
                continue
            c.create(make_doc(size))
            c.update_increment()
            built[key] = c
        samples: dict[str, list[float]] = {k: [] for k in built}
        for r in range(rounds):
            order = list(built)[r % len(built) :] + list(built)[: r % len(built)]
            for key in order:
                gc.collect()
                samples[key].append(timed(built[key].update_increment, per[label]))
        medians = {k: statistics.median(v) for k, v in samples.items()}
        base = medians.get("statestore-durable", float("nan"))
        lines.append(f"#### {label}")
        lines.append("")
        lines.append("| contender | median ms | x statestore |")
        lines.append("| :-- | --: | --: |")
        for key, value in medians.items():
            lines.append(
                f"| {contenders.spec(key).label} | {value * 1000:.3f} | {value / base:.2f}x |"
            )
        lines.append("")
        for c in built.values():
            c.close()
        del held
    return lines


def threads(rounds: int, each: int, root: str) -> list[str]:
    path = os.path.join(tempfile.mkdtemp(prefix="threads-", dir=root), "state.json")
    store = StateStore(Doc, path, default=Doc)
    store.save(make_doc(1024))

    def bump(state: Doc) -> None:
        state.counter += 1

    def run(count: int) -> float:
        total = count * (each * 8 // count)
        start = store.load().counter

        def work() -> None:
            for _ in range(total // count):
                store.update(bump)

        began = time.perf_counter()
        workers = [threading.Thread(target=work) for _ in range(count)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        elapsed = time.perf_counter() - began
        assert store.load().counter == start + total, "an update was lost"
        return total / elapsed

    one, eight = [], []
    for _ in range(rounds):
        one.append(run(1))
        eight.append(run(8))
    a, b = statistics.median(one), statistics.median(eight)
    return [
        "### 2. Threads through one store (1 KB, durable), updates/s",
        "",
        "| threads | median updates/s | x 1 thread |",
        "| :-- | --: | --: |",
        f"| 1 | {a:.0f} | 1.00x |",
        f"| 8 | {b:.0f} | {b / a:.2f}x |",
        "",
    ]


def loads(rounds: int, n: int, root: str) -> list[str]:
    path = os.path.join(tempfile.mkdtemp(prefix="loads-", dir=root), "state.json")
    store = StateStore(Doc, path, default=Doc)
    store.save(make_doc(parse_size("1MB")))
    with open(path, "rb") as f:
        raw = f.read()

    def compare() -> bool:
        with open(path, "rb") as f:
            return f.read() == raw

    store.load(shared=True)
    cases: dict[str, Callable[[], Any]] = {
        "load()": store.load,
        "load(shared=True)": lambda: store.load(shared=True),
        "read the file, compare its bytes": compare,
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for key, fn in cases.items():
            gc.collect()
            samples[key].append(timed(fn, n))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["load()"]
    lines = [
        "### 3. Repeated load of an unchanged 1 MB document",
        "",
        "| call | median ms | load() / this |",
        "| :-- | --: | --: |",
    ]
    for key, value in medians.items():
        lines.append(f"| {key} | {value * 1000:.3f} | {base / value:.0f}x |")
    lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="1KB,100KB,1MB,10MB")
    parser.add_argument(
        "--extra-copy",
        action="store_true",
        help="hold one more copy of each document while its updates are timed",
    )
    parser.add_argument(
        "--only", default="updates,threads,loads", help="a subset of updates,threads,loads"
    )
    args = parser.parse_args()
    quick = args.quick
    sizes = args.sizes.split(",")
    per = {"1KB": 40, "100KB": 10, "1MB": 3, "10MB": 1}
    if quick:
        per = {k: max(1, v // 4) for k, v in per.items()}
    root = tempfile.mkdtemp(prefix="statestore-targets-")
    out: list[str] = [
        "## statestore targets",
        "",
        f"- command: `python bench/targets.py {' '.join(sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}; nproc {os.cpu_count()}; "
        f"Python {sys.version.split()[0]}; files in {root}",
        "",
    ]
    only = args.only.split(",")
    if "updates" in only:
        out += updates(sizes, 3 if quick else 7, per, root, args.extra_copy)
    if "threads" in only:
        out += threads(1 if quick else 5, 20 if quick else 60, root)
    if "loads" in only:
        out += loads(2 if quick else 7, 3 if quick else 10, root)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
