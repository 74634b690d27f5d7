"""Benchmark worker processes.

``python bench/worker.py pool``: a long-lived worker driven by the harness over stdin/stdout,
one JSON object per line. Each job is answered with ``{"ready": true}`` once the contender is
built, then the worker waits at the start gate (a shared ``flock`` on a gate file that the
harness holds exclusively until every worker is ready), runs, and answers with its results.

``python bench/worker.py memory '<json>'``: a fresh process that builds one contender, takes
its RSS high-water mark as the baseline, does N updates and prints the new high-water mark.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import resource
import sys
import time
import traceback
from typing import Any

import contenders
from bench_common import Doc

now = time.perf_counter_ns  # CLOCK_MONOTONIC on Linux: comparable across processes


def _wait_gate(gate: str) -> None:
    fd = os.open(gate, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _error_kind(exc: BaseException) -> str:
    """A short, countable description of an error ("type: first line")."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):
        try:
            first = errors()[0]
            return f"ValidationError: {first['type']}: {str(first['msg'])[:60]}"
        except Exception:
            pass
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


def job_contention(c: Any, job: dict[str, Any], send: Any) -> dict[str, Any]:
    k = int(job["k"])
    waits: list[int] = []
    totals: list[int] = []
    timeouts = errors = successes = 0
    kinds: dict[str, int] = {}
    entered = [0]

    def on_enter() -> None:
        if not entered[0]:
            entered[0] = now()

    send({"ready": True})
    _wait_gate(job["gate"])
    t_start = now()
    for _ in range(k):
        entered[0] = 0
        t0 = now()
        try:
            c.update_increment(on_enter)
        except TimeoutError:
            timeouts += 1
            continue
        except Exception as exc:
            errors += 1
            kind = _error_kind(exc)
            kinds[kind] = kinds.get(kind, 0) + 1
            continue
        t1 = now()
        successes += 1
        totals.append(t1 - t0)
        if entered[0]:
            waits.append(entered[0] - t0)
    t_finish = now()
    return {
        "t_start": t_start,
        "t_finish": t_finish,
        "successes": successes,
        "timeouts": timeouts,
        "errors": errors,
        "error_kinds": kinds,
        "waits": waits,
        "totals": totals,
    }


def job_writer(c: Any, job: dict[str, Any], send: Any) -> dict[str, Any]:
    seconds = float(job["seconds"])
    writes = failures = 0
    kinds: dict[str, int] = {}
    send({"ready": True})
    _wait_gate(job["gate"])
    t_start = now()
    deadline = t_start + int(seconds * 1e9)
    while now() < deadline:
        try:
            c.update_increment()
            writes += 1
        except Exception as exc:
            failures += 1
            kind = _error_kind(exc)
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "t_start": t_start,
        "t_finish": now(),
        "writes": writes,
        "failures": failures,
        "error_kinds": kinds,
    }


def job_reader(c: Any, job: dict[str, Any], send: Any) -> dict[str, Any]:
    seconds = float(job["seconds"])
    reads = invalid = backwards = 0
    last = -1
    kinds: dict[str, int] = {}
    send({"ready": True})
    _wait_gate(job["gate"])
    t_start = now()
    deadline = t_start + int(seconds * 1e9)
    while now() < deadline:
        reads += 1
        try:
            state = c.read()
        except Exception as exc:
            invalid += 1
            kind = _error_kind(exc)
            kinds[kind] = kinds.get(kind, 0) + 1
            continue
        if state.counter < last:
            backwards += 1
        last = state.counter
    return {
        "t_start": t_start,
        "t_finish": now(),
        "reads": reads,
        "invalid": invalid,
        "backwards": backwards,
        "error_kinds": kinds,
    }


JOBS = {"contention": job_contention, "writer": job_writer, "reader": job_reader}


def pool_main() -> None:
    # Keep the real stdout for the protocol; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job["cmd"] == "exit":
            return
        c = None
        try:
            c = contenders.make(job["key"], job["path"], Doc)
            gc.collect()
            result = JOBS[job["cmd"]](c, job, send)
        except Exception as exc:
            send({"error": _error_kind(exc), "traceback": traceback.format_exc()})
            continue
        finally:
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        send(result)


def memory_main(arg: str) -> None:
    job = json.loads(arg)
    c = contenders.make(job["key"], job["path"], Doc)
    gc.collect()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = now()
    for _ in range(int(job["n"])):
        c.update_increment()
    elapsed = now() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c.close()
    print(json.dumps({"base_kb": base_kb, "peak_kb": peak_kb, "elapsed_ns": elapsed}))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "pool":
        pool_main()
    elif len(sys.argv) >= 3 and sys.argv[1] == "memory":
        memory_main(sys.argv[2])
    else:
        raise SystemExit("usage: worker.py pool | worker.py memory '<json>'")
