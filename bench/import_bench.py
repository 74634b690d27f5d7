"""Start-up cost of ``import statestore`` beyond pydantic's.

Runs fresh interpreters, alternated: one that imports what every statestore
program imports anyway (``from pydantic import BaseModel``), and one that also
imports statestore; prints the medians and their difference::

    python bench/import_bench.py --runs 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = "from pydantic import BaseModel\nclass State(BaseModel):\n    count: int = 0\n"
CASES = {
    "pydantic": "import pydantic",
    "pydantic, one model": MODEL,
    "pydantic, one model + statestore": MODEL + "import statestore",
    "pydantic, one model + statestore + asyncio API": MODEL
    + "from statestore import AsyncStateStore",
    "pydantic, one model + statestore + a store": (
        MODEL + "import statestore\nstatestore.StateStore(State, 'unused.json')"
    ),
}


# An installed package has its bytecode cached; a run with
# PYTHONDONTWRITEBYTECODE would time the compiler instead. The cache goes to a
# folder of its own, written by the warm-up round.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="statestore-import-bench-")


def once(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for code in CASES.values():
        once(code)  # warm-up: writes the bytecode cache
    for _ in range(args.runs):
        for name, code in CASES.items():
            times[name].append(once(code))
    base = statistics.median(times["pydantic"])
    model = statistics.median(times["pydantic, one model"])
    print("| start-up, then | median ms | more than `import pydantic` | more than a model |")
    print("| :-- | --: | --: | --: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median * 1000:.0f} | {(median - base) * 1000:.0f} "
            f"| {(median - model) * 1000:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
