"""The folder journal against real processes: kill -9 at random instants of a loop of
group commits, and lock-free readers in other processes during a writer's commits.

The invariant across documents: three counters whose sum is 300; each group
moves an amount from one counter to another.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from statestore._atomic import read_bytes
from statestore._folder_journal import declare, group_commit, read_consistent, read_journal, recover

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NAMES = ("a.json", "b.json", "c.json")
TOTAL = 300


def doc(n: int) -> bytes:
    return json.dumps({"count": n}).encode()


def setup(folder: Path) -> Path:
    folder.mkdir()
    declare(folder)
    for n in NAMES:
        (folder / n).write_bytes(doc(TOTAL // len(NAMES)))
    return folder


def transfer_forever(folder: Path, durable: bool, seed: int, pause: float = 0.0) -> None:
    """Move random amounts between random counters, one group per move, forever."""
    rng = random.Random(seed)
    while True:
        if pause:
            time.sleep(pause)  # leave readers room on a loaded machine
        counts = {n: json.loads(read_bytes(str(folder / n)) or b"")["count"] for n in NAMES}
        src, dst = rng.sample(NAMES, 2)
        amount = rng.randint(1, 10)
        changes = {src: doc(counts[src] - amount), dst: doc(counts[dst] + amount)}
        if rng.random() < 0.3:  # sometimes all three (one unchanged but rewritten)
            other = next(n for n in NAMES if n not in (src, dst))
            changes[other] = doc(counts[other])
        group_commit(folder, changes, durable=durable)


def fork(fn: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            fn(*args)  # type: ignore[operator]
            code = 0
        except BaseException as e:
            with open(f"/tmp/statestore-folder-child-{os.getpid()}.err", "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
        finally:
            os._exit(code)
    return pid


def check(folder: Path) -> int:
    counts = [json.loads((folder / n).read_bytes())["count"] for n in NAMES]
    assert sum(counts) == TOTAL, counts
    return read_journal(folder).gen


def test_kill_9_at_random_instants_of_group_commits(tmp_path: Path) -> None:
    folder = setup(tmp_path / "f")
    rng = random.Random(1234)
    gens = [0]
    for round_ in range(60):
        pid = fork(transfer_forever, folder, True, round_)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"the writer stopped by itself (round {round_})"
        recover(folder)  # the next holder of the lock
        gens.append(check(folder))
        assert read_journal(folder).state == "done"
        # Every temporary file of the dead writers is gone (completed or swept).
        assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    assert gens[-1] > 20, gens  # the generation moved: the kills landed among commits
    assert gens == sorted(gens)


def _reader(folder: Path, out: Path, deadline: float, consistent: bool) -> None:
    """Take snapshots until ``deadline``; write how many and how many broke the sum."""
    module = importlib.import_module("statestore._folder_journal")
    name = "read_bytes"  # the reads of the module under test, slowed, not replaced
    real = getattr(module, name)

    def slow(path: str, *args: object, **kwargs: object) -> bytes | None:
        data = real(path, *args, **kwargs)  # type: ignore[arg-type]
        time.sleep(0.0003)  # widen the window between documents
        return data

    setattr(module, name, slow)
    snapshots = broken = 0
    gens = set()
    while time.monotonic() < deadline:
        if consistent:
            gens.add(read_journal(folder).gen)
            got = read_consistent(folder, NAMES)
        else:
            got = {n: slow(str(folder / n)) for n in NAMES}
        counts = [json.loads(got[n] or b"")["count"] for n in NAMES]
        snapshots += 1
        broken += sum(counts) != TOTAL
    out.write_text(json.dumps({"snapshots": snapshots, "broken": broken, "gens": len(gens)}))


@pytest.mark.parametrize("durable", [False, True])
def test_lock_free_readers_in_other_processes_see_only_whole_groups(
    tmp_path: Path, durable: bool
) -> None:
    folder = setup(tmp_path / "f")
    # A pause between the writer's groups: a lock-free reader retries while groups
    # land (a seqlock), and a writer without pauses can starve it of snapshots on a
    # busy machine; the naive reader below still sees broken sums at this pace.
    writer = fork(transfer_forever, folder, durable, 7, 0.003)
    try:
        deadline = time.monotonic() + 2.0
        outs = [tmp_path / f"reader{i}.json" for i in range(3)]
        readers = [
            fork(_reader, folder, out, deadline, i < 2)  # the third: naive per-file reads
            for i, out in enumerate(outs)
        ]
        for pid in readers:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, Path(
                f"/tmp/statestore-folder-child-{pid}.err"
            ).read_text()
    finally:
        os.kill(writer, signal.SIGKILL)
        os.waitpid(writer, 0)
    results = [json.loads(out.read_text()) for out in outs]
    for r in results[:2]:
        assert r["snapshots"] >= 3 and r["broken"] == 0, r
        assert r["gens"] >= 2, r  # the writer really committed meanwhile
    # The positive control: reading the documents one by one does see broken sums.
    assert results[2]["broken"] > 0, results[2]
    recover(folder)
    check(folder)
