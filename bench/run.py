"""Compare statestore with the usual ways of keeping a JSON state file, in one run.

    python bench/run.py [--quick] [--out bench/results/latest.md] [--scenarios ...]

Every contender does the same operation: increment ``counter`` in a document that also
carries a payload sized to make the JSON 1 KB / 100 KB / 1 MB, validated by a pydantic v2
model. See bench/README.md for the contenders and the scenarios.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import importlib.metadata
import json
import math
import os
import platform
import select
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import contenders  # noqa: E402
from bench_common import (  # noqa: E402
    Doc,
    make_doc,
    mean,
    median,
    ms,
    parse_size,
    percentile,
    ratio,
    size_label,
    table,
)

WORKER = os.path.join(BENCH_DIR, "worker.py")
# Linux carries the RSS high-water mark across fork+exec: a child started straight from this
# (large) process would report our peak as its own ru_maxrss. A tiny launcher process in
# between gives the measured child a clean high-water mark.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
now = time.perf_counter_ns

ALL = list(contenders.SPECS)
MAIN = [k for k in ALL if k != "naive-write"]  # naive-write only serves the readers scenario
LATENCY_DEFAULT = MAIN
MEMORY_DEFAULT = MAIN
CONTENTION_DEFAULT = [
    "statestore-durable",
    "statestore-sqlite",
    "mkdir-backoff",
    "filelock-fsync",
    "sqlite-normal",
    "tinydb",
]
READERS_DEFAULT = ALL
SCENARIOS = ["latency", "memory", "contention", "readers", "breakdown"]

FULL_SETTINGS = {
    "latency_updates": [2000, 600, 150],
    "rounds": 10,
    "warmup": 5,
    "memory_updates": 20,
    "workers": [1, 2, 4, 8, 16],
    "updates_per_worker": 200,
    "reader_seconds": 5.0,
    "scaling_repeats": 5,
}
QUICK_SETTINGS = {
    "latency_updates": [60, 30, 12],
    "rounds": 3,
    "warmup": 2,
    "memory_updates": 5,
    "workers": [1, 2, 4, 8, 16],
    "updates_per_worker": 12,
    "reader_seconds": 1.0,
    "scaling_repeats": 1,
}

SKIPPED: dict[str, str] = {}  # contender key -> why it did not run
UNAVAILABLE: set[str] = set()  # contenders whose library cannot be imported


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def label(key: str) -> str:
    return contenders.spec(key).label


def skip(key: str, reason: str, where: str) -> None:
    SKIPPED.setdefault(key, reason)
    log(f"  skipping {key} ({where}): {reason}")


def csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def csv_ints(text: str) -> list[int]:
    return [int(part) for part in csv_list(text)]


# --- report -------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text + "\n", flush=True)

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _filesystem(path: str) -> str:
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mountpoint, fstype = line.split()[:3]
                mountpoint = mountpoint.replace("\\040", " ")
                if (path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")) and len(
                    mountpoint
                ) >= len(best[0]):
                    best = (mountpoint, fstype, device)
    except OSError:
        return "unknown"
    return f"{best[1]} ({best[2]} on {best[0]})"


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", BENCH_DIR, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", BENCH_DIR, "status", "--porcelain", "--", "../src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out + (" (src/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header(args: argparse.Namespace, workdir: str) -> str:
    exe = os.path.basename(sys.executable) or "python"
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "# statestore benchmark",
        "",
        f"- command: `{exe} {shlex.join(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"pydantic {_version('pydantic')} (pydantic-core {_version('pydantic-core')}), "
        f"filelock {_version('filelock')}, tinydb {_version('tinydb')}, "
        f"SQLite {sqlite3.sqlite_version}",
        f"- statestore {_version('statestore')}, git {_git_head()}",
        f"- nproc: {nproc}; platform: {platform.platform()}",
        f"- state files in: {workdir} — {_filesystem(workdir)}",
        f"- settings: {'--quick' if args.quick else 'full run'}; "
        f"scenarios {','.join(args.scenarios)}",
        "- times are `time.perf_counter_ns`, shown in milliseconds; every contender validates "
        "the whole document with pydantic on each update except the raw floor",
    ]
    return "\n".join(lines)


# --- worker pool (contention and readers) ------------------------------------------------


class WorkerDied(RuntimeError):
    pass


class Pool:
    """Long-lived worker processes, each answering one JSON line per job step."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bufs: list[bytes] = []

    def ensure(self, n: int) -> None:
        while len(self.procs) < n:
            proc = subprocess.Popen(
                [sys.executable, WORKER, "pool"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self.procs.append(proc)
            self.bufs.append(b"")

    def send(self, i: int, msg: dict[str, Any]) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write((json.dumps(msg) + "\n").encode())
        stdin.flush()

    def recv(self, i: int, timeout: float) -> dict[str, Any]:
        proc = self.procs[i]
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.bufs[i]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {i} did not answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerDied(f"worker {i} exited (code {proc.poll()})")
                self.bufs[i] += chunk
        line, self.bufs[i] = self.bufs[i].split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            try:
                self.send(i, {"cmd": "exit"})
                assert proc.stdin is not None
                proc.stdin.close()
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.bufs.clear()

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()
        self.bufs.clear()


def run_gated(
    pool: Pool, jobs: list[dict[str, Any]], gate: str, job_timeout: float
) -> tuple[int, list[dict[str, Any]], list[str]]:
    """Send jobs[i] to worker i, wait until all are ready, open the gate together.

    Returns (t_go, results of the workers that ran, error messages)."""
    pool.ensure(len(jobs))
    gate_fd = os.open(gate, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(gate_fd, fcntl.LOCK_EX)
    errors: list[str] = []
    running: list[int] = []
    try:
        for i, job in enumerate(jobs):
            pool.send(i, {**job, "gate": gate})
        for i in range(len(jobs)):
            reply = pool.recv(i, timeout=120)
            if "error" in reply:
                errors.append(reply["error"])
                log(reply.get("traceback", ""))
            else:
                running.append(i)
        gc.collect()
        t_go = now()
    finally:
        fcntl.flock(gate_fd, fcntl.LOCK_UN)
        os.close(gate_fd)
    results: list[dict[str, Any]] = []
    for i in running:
        reply = pool.recv(i, timeout=job_timeout)
        if "error" in reply:
            errors.append(reply["error"])
        else:
            results.append(reply)
    return t_go, results, errors


# --- setup helpers ------------------------------------------------------------------------


def prepare(key: str, directory: str, doc: Doc, where: str) -> Any | None:
    """Build contender ``key`` in ``directory`` and write ``doc``; None (and a note) if it can't."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "state.json")
    if key in UNAVAILABLE:
        return None
    try:
        c = contenders.make(key, path, Doc)
    except contenders.Unavailable as exc:
        UNAVAILABLE.add(key)
        skip(key, f"cannot be imported ({exc})", where)
        return None
    except Exception as exc:
        skip(key, f"cannot be built: {type(exc).__name__}: {exc}", where)
        return None
    try:
        c.create(doc)
    except Exception as exc:
        skip(key, f"cannot write the initial state: {type(exc).__name__}: {exc}", where)
        c.close()
        return None
    return c


def dir_bytes(directory: str) -> int:
    """Bytes of every file the contender keeps in its directory (state, locks, WAL...)."""
    total = 0
    for name in os.listdir(directory):
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def state_path(directory: str) -> str:
    return os.path.join(directory, "state.json")


def read_counter(key: str, directory: str) -> tuple[int | None, str]:
    try:
        c = contenders.make(key, state_path(directory), Doc)
        try:
            return int(c.read().counter), ""
        finally:
            c.close()
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def skipped_note(keys: Sequence[str], ran: Sequence[str]) -> str:
    missing = [k for k in keys if k not in ran]
    if not missing:
        return ""
    return "\n".join(f"- skipped **{label(k)}**: {SKIPPED.get(k, 'failed')}" for k in missing)


# --- scenario 1: uncontended latency ---------------------------------------------------


def scenario_latency(args: argparse.Namespace, workdir: str, report: Report) -> None:
    keys: list[str] = args.contenders or LATENCY_DEFAULT
    report.add(
        "## 1. Uncontended latency per update\n\n"
        "One process, one contender at a time, contenders interleaved round-robin in batches "
        f"({args.rounds} rounds, starting contender rotated each round, `gc.collect()` between "
        f"batches, {args.warmup} warm-up updates each). "
        "Ratios are of the medians: xfloor against the raw floor (syscalls only), xfilelock "
        "against the hand-rolled filelock + fsync baseline. **on disk** is every file the "
        "contender keeps (state, lock, temp, SQLite WAL) after the run."
    )
    for size, n in zip(args.sizes, args.latency_updates, strict=True):
        slabel = size_label(size)
        log(f"[latency] {slabel}: {n} updates per contender")
        doc = make_doc(size)
        live: dict[str, Any] = {}
        for key in keys:
            c = prepare(
                key, os.path.join(workdir, f"latency-{slabel}-{key}"), doc, f"latency {slabel}"
            )
            if c is None:
                continue
            try:
                for _ in range(args.warmup):
                    c.update_increment()
            except Exception as exc:
                skip(key, f"update failed: {type(exc).__name__}: {exc}", f"latency {slabel}")
                c.close()
                continue
            live[key] = c
        samples: dict[str, list[int]] = {k: [] for k in live}
        failed: dict[str, str] = {}
        batch = max(1, math.ceil(n / args.rounds))
        order = list(live)
        for r in range(args.rounds):
            rot = r % len(order) if order else 0
            for key in order[rot:] + order[:rot]:
                if key in failed:
                    continue
                times = samples[key]
                todo = min(batch, n - len(times))
                if todo <= 0:
                    continue
                c = live[key]
                gc.collect()
                try:
                    for _ in range(todo):
                        t0 = now()
                        c.update_increment()
                        times.append(now() - t0)
                except Exception as exc:
                    failed[key] = f"{type(exc).__name__}: {exc}"
                    log(f"  {key} failed during latency {slabel}: {failed[key]}")
        notes: list[str] = []
        disk: dict[str, int] = {}
        for key, c in live.items():
            disk[key] = dir_bytes(os.path.join(workdir, f"latency-{slabel}-{key}"))
            expected = args.warmup + len(samples[key])
            try:
                got = int(c.read().counter)
                if got != expected:
                    notes.append(f"- {label(key)}: counter is {got}, expected {expected}")
            except Exception as exc:
                notes.append(f"- {label(key)}: final read failed: {type(exc).__name__}: {exc}")
            if key in failed:
                notes.append(f"- {label(key)}: stopped early: {failed[key]}")
            c.close()
        stats: dict[str, tuple[float, float, float, int]] = {}
        for key, times in samples.items():
            if times:
                s = sorted(times)
                stats[key] = (median(s), percentile(s, 99), mean(s), len(s))
        floor = stats.get("raw-floor", (math.nan,))[0]
        base = stats.get("filelock-fsync", (math.nan,))[0]
        rows = [
            [
                label(k),
                st[3],
                ms(st[0]),
                ms(st[1]),
                ms(st[2]),
                ratio(st[0], floor),
                ratio(st[0], base),
                f"{disk.get(k, 0) / 1024:.0f}",
            ]
            for k, st in stats.items()
        ]
        text = (
            f"### {slabel} document "
            f"({len(doc.model_dump_json())} bytes of JSON, {len(doc.items)} items)\n\n"
        )
        text += table(
            [
                "contender",
                "n",
                "median ms",
                "p99 ms",
                "mean ms",
                "xfloor",
                "xfilelock",
                "on disk KB",
            ],
            rows,
        )
        extra = skipped_note(keys, list(stats))
        if extra or notes:
            text += "\n\n" + "\n".join(x for x in [extra, *notes] if x)
        report.add(text)


# --- scenario 1b: peak memory ------------------------------------------------------------


def scenario_memory(args: argparse.Namespace, workdir: str, report: Report) -> None:
    keys: list[str] = args.contenders or MEMORY_DEFAULT
    size = parse_size("1MB")
    doc = make_doc(size)
    log(f"[memory] {args.memory_updates} updates of the 1MB state, one fresh process per contender")
    rows = []
    ran = []
    for key in keys:
        directory = os.path.join(workdir, f"memory-{key}")
        c = prepare(key, directory, doc, "memory")
        if c is None:
            continue
        c.close()
        del c
        gc.collect()
        job = {"key": key, "path": state_path(directory), "n": args.memory_updates}
        try:
            proc = subprocess.run(
                [sys.executable, "-c", LAUNCHER, sys.executable, WORKER, "memory", json.dumps(job)],
                capture_output=True,
                text=True,
                timeout=args.job_timeout,
            )
        except subprocess.TimeoutExpired:
            skip(key, "memory child timed out", "memory")
            continue
        if proc.returncode != 0 or not proc.stdout.strip():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            skip(key, f"memory child failed: {tail}", "memory")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        base, peak = res["base_kb"] / 1024, res["peak_kb"] / 1024
        rows.append(
            [
                label(key),
                f"{base:.1f}",
                f"{peak:.1f}",
                f"{peak - base:.1f}",
                ms(res["elapsed_ns"] / args.memory_updates),
            ]
        )
        ran.append(key)
    text = (
        "### Peak memory, 1MB document\n\n"
        f"A fresh process per contender does {args.memory_updates} updates. RSS high-water mark "
        "(`getrusage(RUSAGE_SELF).ru_maxrss`) after imports and building the contender "
        "(baseline), after the updates (peak), and the difference.\n\n"
    )
    text += table(["contender", "baseline MB", "peak MB", "Δ MB", "ms/update"], rows)
    extra = skipped_note(keys, ran)
    if extra:
        text += "\n\n" + extra
    report.add(text)


# --- scenario 2: contention --------------------------------------------------------------


def contention_run(
    args: argparse.Namespace,
    pool: Pool,
    key: str,
    n: int,
    directory: str,
    start: int,
    notes: list[str],
    name: str | None = None,
) -> list[object] | None:
    """One contended run: n processes x k updates of contender ``key``; a table row or None."""
    k = args.updates_per_worker
    name = name or label(key)
    c = prepare(key, directory, make_doc(parse_size("1KB"), counter=start), "contention")
    if c is None:
        return None
    c.close()
    del c
    log(f"[contention] {key}: {n} processes x {k} updates, counter from {start}")
    job = {"cmd": "contention", "key": key, "path": state_path(directory), "k": k}
    try:
        t_go, results, errors = run_gated(
            pool, [dict(job) for _ in range(n)], os.path.join(directory, "gate"), args.job_timeout
        )
    except (TimeoutError, WorkerDied) as exc:
        pool.kill()
        notes.append(f"- {name} with {n} processes: {exc}; run abandoned")
        log(f"  {notes[-1]}")
        return None
    if errors:
        notes.append(f"- {name} with {n} processes: worker setup failed: {errors[0]}")
    if not results:
        return None
    successes = sum(r["successes"] for r in results)
    timeouts = sum(r["timeouts"] for r in results)
    errs = sum(r["errors"] for r in results)
    kinds: dict[str, int] = {}
    for r in results:
        for kind, count in r["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    if kinds:
        top = ", ".join(f"{kd} x{ct}" for kd, ct in sorted(kinds.items(), key=lambda x: -x[1])[:3])
        notes.append(f"- {name} with {n} processes: errors: {top}")
    final, why = read_counter(key, directory)
    if final is None:
        notes.append(
            f"- {name} with {n} processes: the final state no longer loads ({why}); "
            f"{successes} update calls had succeeded"
        )
        lost = "corrupt"
    else:
        lost = str(successes - (final - start))
    t_end = max(r["t_finish"] for r in results)
    t_first = min(r["t_finish"] for r in results)
    span = max(1, t_end - t_go)
    waits = sorted(w for r in results for w in r["waits"])
    totals = sorted(t for r in results for t in r["totals"])
    return [
        name,
        n,
        f"{successes / (span / 1e9):.0f}",
        lost,
        timeouts,
        errs,
        ms(percentile(waits, 50)),
        ms(percentile(waits, 99)),
        ms(waits[-1] if waits else math.nan),
        ms(percentile(totals, 99)),
        f"{(t_end - t_first) / span * 100:.0f}%",
    ]


def scenario_contention(args: argparse.Namespace, workdir: str, report: Report, pool: Pool) -> None:
    keys: list[str] = args.contention_contenders or CONTENTION_DEFAULT
    rows = []
    ran: set[str] = set()
    notes: list[str] = []
    for n in args.workers:
        for key in keys:
            directory = os.path.join(workdir, f"contention-{key}-{n}")
            row = contention_run(args, pool, key, n, directory, args.start_counter, notes)
            if row is not None:
                rows.append(row)
                ran.add(key)
    # A document that changes length while two unlocked writers rewrite it in place.
    probe = ""
    many = [n for n in args.workers if n > 1]
    if "tinydb" in ran and many and args.start_counter >= 10:
        n = many[0]
        directory = os.path.join(workdir, f"contention-tinydb-{n}-from0")
        name = f"{label('tinydb')}, counter from 0"
        row = contention_run(args, pool, "tinydb", n, directory, 0, notes, name)
        if row is not None:
            rows.append(row)
            probe = (
                f'The last row ("{name}") repeats TinyDB with the counter starting at 0, so the '
                "document grows by a byte when the counter reaches 10: TinyDB rewrites its "
                "file in place and each writer truncates at its own length. "
            )
    scaling = scaling_runs(args, workdir, pool, notes) if "statestore-durable" in keys else ""
    k = args.updates_per_worker
    text = (
        "## 2. Contention: N processes incrementing one 1KB document\n\n"
        f"Each process does {k} updates back to back; all are released together by a start "
        f"gate. The counter starts at {args.start_counter}, so that every update keeps the "
        "document's length. "
        + probe
        + "**updates/s** is successful updates over the time from the gate opening to the last "
        "process finishing. **lost** = successful update calls - counter increase. **wait** is "
        "the time from calling update until the mutation starts: lock acquired and the current "
        "state read and validated (for statestore: until `update()` calls the mutation "
        "function; for TinyDB there is no lock, so it is only the read). **update p99** is the "
        "whole update call. **finish gap** is the time between the first and the last process "
        "finishing, as a share of the run (0% = perfectly fair).\n\n"
    )
    text += table(
        [
            "contender",
            "procs",
            "updates/s",
            "lost",
            "timeouts",
            "errors",
            "wait p50 ms",
            "wait p99 ms",
            "wait max ms",
            "update p99 ms",
            "finish gap",
        ],
        rows,
    )
    extra = skipped_note(keys, sorted(ran))
    if extra or notes:
        text += "\n\n" + "\n".join(x for x in [extra, *notes] if x)
    report.add(text + scaling)


def scaling_runs(args: argparse.Namespace, workdir: str, pool: Pool, notes: list[str]) -> str:
    """statestore's throughput at 1 and at 8 processes, alternated: the ratio of two runs
    made seconds apart, repeated, is far steadier on a shared machine than the ratio of
    two rows of the table above, made minutes apart."""
    many = 8
    pairs: list[tuple[float, float]] = []
    for rep in range(args.scaling_repeats):
        got: list[float] = []
        for n in (1, many):
            directory = os.path.join(workdir, f"scaling-{rep}-{n}")
            row = contention_run(
                args, pool, "statestore-durable", n, directory, args.start_counter, notes
            )
            if row is None:
                break
            got.append(float(str(row[2])))
        if len(got) == 2:
            pairs.append((got[0], got[1]))
    if not pairs:
        return ""
    ratios = sorted(b / a for a, b in pairs)
    rows = [[i + 1, f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}x"] for i, (a, b) in enumerate(pairs)]
    return (
        f"\n\n### Scaling: statestore durable at 1 and {many} processes, alternated\n\n"
        f"{len(pairs)} pairs of runs ({args.updates_per_worker} updates per process), each "
        f"pair made back to back. Median ratio: **{median(ratios):.2f}x** "
        f"(range {ratios[0]:.2f}x-{ratios[-1]:.2f}x).\n\n"
        + table(["pair", "updates/s, 1 process", f"updates/s, {many} processes", "ratio"], rows)
    )


# --- scenario 3: lock-free readers during writes -----------------------------------------------


def scenario_readers(args: argparse.Namespace, workdir: str, report: Report, pool: Pool) -> None:
    keys: list[str] = args.contenders or READERS_DEFAULT
    doc = make_doc(args.reader_size, counter=args.start_counter)
    rows = []
    ran = []
    notes: list[str] = []
    for key in keys:
        directory = os.path.join(workdir, f"readers-{key}")
        c = prepare(key, directory, doc, "readers")
        if c is None:
            continue
        c.close()
        del c
        log(f"[readers] {key}: 1 writer + {args.readers} readers for {args.reader_seconds:g} s")
        base = {"key": key, "path": state_path(directory), "seconds": args.reader_seconds}
        jobs = [{**base, "cmd": "writer"}] + [
            {**base, "cmd": "reader"} for _ in range(args.readers)
        ]
        try:
            _, results, errors = run_gated(
                pool, jobs, os.path.join(directory, "gate"), args.job_timeout
            )
        except (TimeoutError, WorkerDied) as exc:
            pool.kill()
            notes.append(f"- {label(key)}: {exc}; run abandoned")
            continue
        if errors:
            notes.append(f"- {label(key)}: worker setup failed: {errors[0]}")
        writers = [r for r in results if "writes" in r]
        readers = [r for r in results if "reads" in r]
        if not writers or not readers:
            continue
        ran.append(key)
        writes = sum(r["writes"] for r in writers)
        wfail = sum(r["failures"] for r in writers)
        reads = sum(r["reads"] for r in readers)
        invalid = sum(r["invalid"] for r in readers)
        backwards = sum(r["backwards"] for r in readers)
        kinds: dict[str, int] = {}
        for r in readers:
            for kind, count in r["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + count
        example = max(kinds.items(), key=lambda x: x[1])[0] if kinds else ""
        for r in writers:
            if r["error_kinds"]:
                notes.append(f"- {label(key)} writer errors: {r['error_kinds']}")
        rows.append(
            [
                label(key),
                writes,
                wfail,
                reads,
                invalid,
                f"{100.0 * invalid / reads:.2f}%" if reads else "-",
                backwards,
                example.replace("|", "/")[:70],
            ]
        )
    text = (
        f"## 3. One writer, {args.readers} lock-free readers, {args.reader_seconds:g} s each, "
        f"{size_label(args.reader_size)} document\n\n"
        "The writer updates as fast as it can; each reader reads and validates in a loop "
        "with the contender's own lock-free read. **torn/invalid** = reads that failed to "
        "parse or validate (or failed at all); **went back** = a reader saw the counter "
        "decrease.\n\n"
    )
    text += table(
        [
            "contender",
            "writes",
            "write errors",
            "reads",
            "torn/invalid",
            "invalid %",
            "went back",
            "most common read error",
        ],
        rows,
        align="lrrrrrrl",
    )
    extra = skipped_note(keys, ran)
    if extra or notes:
        text += "\n\n" + "\n".join(x for x in [extra, *notes] if x)
    report.add(text)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark statestore against hand-rolled designs, SQLite and TinyDB.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="small counts: a smoke test of about a minute"
    )
    p.add_argument(
        "--out",
        default=os.path.join(BENCH_DIR, "results", "latest.md"),
        help="markdown file to write the tables to",
    )
    p.add_argument(
        "--scenarios",
        type=csv_list,
        default=SCENARIOS,
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--contenders",
        type=csv_list,
        default=None,
        help=f"contenders for latency, memory and readers (default: all of {','.join(ALL)})",
    )
    p.add_argument(
        "--contention-contenders",
        type=csv_list,
        default=None,
        help=f"contenders for the contention scenario (default: {','.join(CONTENTION_DEFAULT)})",
    )
    p.add_argument(
        "--sizes",
        type=csv_list,
        default=["1KB", "100KB", "1MB"],
        help="document sizes for the latency scenario",
    )
    p.add_argument(
        "--latency-updates",
        type=csv_ints,
        default=None,
        help="timed updates per contender for each size (one number, or one per size) "
        f"[full: {FULL_SETTINGS['latency_updates']}, quick: {QUICK_SETTINGS['latency_updates']}]",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="round-robin rounds per size [full 10, quick 3]"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed updates per contender and size"
    )
    p.add_argument(
        "--memory-updates",
        type=int,
        default=None,
        help="updates of the 1MB state in the memory child",
    )
    p.add_argument(
        "--workers",
        type=csv_ints,
        default=None,
        help="process counts for the contention scenario [1,2,4,8,16]",
    )
    p.add_argument(
        "--updates-per-worker",
        "-k",
        type=int,
        default=None,
        help="updates each contending process does [full 100, quick 12]",
    )
    p.add_argument(
        "--readers", type=int, default=3, help="lock-free reader processes in scenario 3"
    )
    p.add_argument(
        "--reader-seconds", type=float, default=None, help="duration of scenario 3 per contender"
    )
    p.add_argument(
        "--reader-size",
        type=parse_size,
        default=parse_size("100KB"),
        help="document size for scenario 3",
    )
    p.add_argument(
        "--start-counter",
        type=int,
        default=1_000_000,
        help="initial counter for the contention and readers scenarios",
    )
    p.add_argument(
        "--job-timeout",
        type=float,
        default=300.0,
        help="seconds before a contender's run is abandoned as hung",
    )
    p.add_argument(
        "--dir", default=None, help="where to put the state files (default: system temp)"
    )
    p.add_argument(
        "--scaling-repeats",
        type=int,
        default=None,
        help="pairs of statestore runs at 1 and 8 processes in the contention scenario",
    )
    p.add_argument("--keep", action="store_true", help="keep the state files afterwards")
    p.add_argument("--list", action="store_true", help="list the contenders and exit")
    args = p.parse_args(argv)

    defaults = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in args.scenarios:
        if name not in SCENARIOS:
            p.error(f"unknown scenario {name!r}; choose from {','.join(SCENARIOS)}")
    for group in (args.contenders, args.contention_contenders):
        for key in group or []:
            if key not in contenders.SPECS:
                p.error(f"unknown contender {key!r}; choose from {','.join(ALL)}")
    args.sizes = [parse_size(s) for s in args.sizes]
    if len(args.latency_updates) == 1:
        args.latency_updates = args.latency_updates * len(args.sizes)
    if len(args.latency_updates) != len(args.sizes):
        if args.latency_updates == defaults["latency_updates"]:
            by_size = dict(
                zip([1024, 100 * 1024, 1024 * 1024], defaults["latency_updates"], strict=True)
            )
            args.latency_updates = [
                by_size.get(s, defaults["latency_updates"][-1]) for s in args.sizes
            ]
        else:
            p.error("--latency-updates needs one number or one per size")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for key, s in contenders.SPECS.items():
            print(f"{key:24} {s.label}")
        return 0
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="statestore-bench-", dir=args.dir))
    report = Report()
    report.add(header(args, workdir))
    started = time.monotonic()
    pool = Pool()
    try:
        if "latency" in args.scenarios:
            scenario_latency(args, workdir, report)
        if "memory" in args.scenarios:
            scenario_memory(args, workdir, report)
        if "contention" in args.scenarios:
            scenario_contention(args, workdir, report, pool)
        if "readers" in args.scenarios:
            scenario_readers(args, workdir, report, pool)
        if "breakdown" in args.scenarios:
            from breakdown import scenario_breakdown

            per_size = {1024: 2000, 100 * 1024: 400, 1024 * 1024: 100}
            counts = [per_size.get(s, 100) // (20 if args.quick else 1) for s in args.sizes]
            scenario_breakdown(args.sizes, counts, args.rounds, workdir, report)
    finally:
        pool.close()
        if args.keep:
            log(f"state files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if SKIPPED:
        report.add(
            "## Skipped\n\n"
            + "\n".join(f"- **{label(k)}** (`{k}`): {why}" for k, why in SKIPPED.items())
        )
    report.add(f"_Total time: {time.monotonic() - started:.0f} s._")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report.text())
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
