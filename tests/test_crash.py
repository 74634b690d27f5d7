"""kill -9 at random moments of an update: the file, the counter and the lock survive.

A fork server (``faultfs.crash_server``) imports statestore once; each round it
forks a fresh child that updates a counter in a loop and appends the count of
every update that returned to a report file. The parent kills it with SIGKILL
at a random moment (most kills land in the child's first few updates, some in
breaking the lock of the child killed before it), then checks the file, the
counter, the folder and the lock. STATESTORE_LONG=1 runs thousands of rounds.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Counter

from statestore import StateStore
from statestore._atomic import temp_pattern

LONG = os.environ.get("STATESTORE_LONG") == "1"
ROUNDS = 3000 if LONG else 300
#: "the next process gets the lock well within the timeout (10 s)"
LOCK_BOUND = 3.0
LOOPS = 4
ASIDE = re.compile(r"state\.json\.lock\.[0-9a-f]{12}\.(broken|released)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(7200 if LONG else 240)]


class ForkServer:
    def __init__(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import faultfs; faultfs.crash_server()"],
            cwd=here,
            env={**os.environ, "PYTHONPATH": here},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the fork server died (exit status {self.proc.poll()})"
        return answer.split()[1]

    def spawn(self, path: Path, report: Path) -> int:
        return int(self._ask(f"spawn {path} {report}"))

    def once(self, path: Path, report: Path) -> int:
        return int(self._ask(f"once {path} {report}"))

    def reap(self, pid: int) -> int:
        return int(self._ask(f"reap {pid}"))

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except FileNotFoundError:
        return "gone"


def _wait_until_dead(pid: int) -> None:
    """SIGKILL is asynchronous: wait until the child is a zombie (it can no longer act)."""
    end = time.monotonic() + 10
    while _state_of(pid) not in ("Z", "X", "gone"):
        assert time.monotonic() < end, f"child {pid} survived SIGKILL"
        time.sleep(0.0005)


def _read_report(report: Path) -> tuple[list[int], list[float]]:
    counts: list[int] = []
    times: list[float] = []
    for line in report.read_text().splitlines():
        assert not line.startswith("error"), f"the child failed: {line}"
        if line.startswith("t "):
            times.append(float(line[2:]))
        else:
            counts.append(int(line))
    return counts, times


def _bump(s: Counter) -> None:
    s.count += 1


def _reap(server: ForkServer, pid: int) -> None:
    status = server.reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _calibrate(server: ForkServer, path: Path, report: Path) -> float:
    """A kill window that covers a fresh child's first lock and its first few updates."""
    report.touch()
    pid = server.spawn(path, report)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    _wait_until_dead(pid)
    server.reap(pid)
    counts, times = _read_report(report)
    report.unlink()
    assert counts and times, "a child made no update in 0.3 s"
    per_update = (0.3 - times[0]) / max(1, len(counts) - 1)
    return min(0.3, times[0] + 3 * per_update)


def _kill_loop(folder: Path, rounds: int, seed: int) -> tuple[Tally[str], list[float]]:
    """``rounds`` kills of fresh children updating ``folder/state.json``; checks after each."""
    folder.mkdir()
    path = folder / "state.json"
    lock = Path(f"{path}.lock")
    scratch = folder.parent / f"{folder.name}-reports"
    scratch.mkdir()
    prefix, suffix = temp_pattern(str(path))
    rng = random.Random(seed)
    StateStore(Counter, path, default=Counter).save(Counter())
    base = 0

    server = ForkServer()
    seen: Tally[str] = Tally()
    durations: list[float] = []
    zombies: list[int] = []
    try:
        window = _calibrate(server, path, scratch / "calibration")
        base = StateStore(Counter, path).load().count
        for round_ in range(rounds):
            round_started = time.monotonic()
            report = scratch / f"report-{round_}"
            report.touch()
            pid = server.spawn(path, report)
            time.sleep(rng.uniform(0, window))
            os.kill(pid, signal.SIGKILL)
            _wait_until_dead(pid)
            # Half of the children stay zombies until the end of the next round, so
            # that the next process finds a zombie holding the lock: a zombie counts
            # as dead. The others are reaped at once.
            if round_ % 4 in (0, 1):
                zombies.append(pid)
            else:
                _reap(server, pid)

            where = f"{folder.name} round {round_} (kill times from random seed {seed})"
            counts, times = _read_report(report)
            # Every reported update is one more than the last: nothing was lost.
            assert counts == list(range(base + 1, base + 1 + len(counts))), where
            done = len(counts)
            for t in times:
                assert t < LOCK_BOUND, f"{where}: the child waited {t:.2f} s for the lock"
                seen["lock waits over 1 s"] += t > 1

            # The file loads and validates, and holds every reported update, plus
            # at most the one that was saved but not yet reported.
            count = StateStore(Counter, path).load().count
            assert base + done <= count <= base + done + 1, (where, base, done, count)
            names = os.listdir(folder)
            temps = [n for n in names if n.startswith(prefix) and n.endswith(suffix)]
            # A lock instance renamed aside (by a child killed while breaking or
            # releasing a lock) before it could delete it.
            aside = [n for n in names if ASIDE.fullmatch(n)]
            other = set(names) - set(temps) - set(aside) - {"state.json", "state.json.lock"}
            assert not other, f"{where}: unexpected files {other}"
            # Leftovers are bounded: the killed child's, and at most one left by the
            # child before it (a fresh process updates every other round, and the
            # next process removes them).
            assert len(temps) <= 2, f"{where}: {temps}"
            assert len(aside) <= 2, f"{where}: {aside}"
            seen["lock renamed aside left"] += bool(aside)
            seen["saved but not reported"] += count == base + done + 1
            seen["lock left behind"] += lock.exists()
            seen["temporary file left"] += bool(temps)
            seen["killed before its first update"] += done == 0
            base = count

            # Every other round a fresh process makes one update at once; in the
            # others the next looping child has to recover from this one's debris
            # itself (and may be killed while doing so).
            if round_ % 2 == 1 or round_ == rounds - 1:
                held_by_zombie = lock.exists() and pid in zombies
                once = scratch / "once"
                status = server.once(path, once)
                assert status == 0, f"{where}: the next process failed (status {status})"
                saved, took = once.read_text().split()
                once.unlink()
                assert float(took) < LOCK_BOUND, f"{where}: the next update took {took} s"
                seen["lock waits over 1 s"] += float(took) > 1
                assert int(saved) == base + 1, where
                assert os.listdir(folder) == ["state.json"], f"{where}: debris after an update"
                seen["lock of a zombie taken over"] += held_by_zombie
                base = int(saved)
            while len(zombies) > 1 or (zombies and zombies[0] != pid):
                _reap(server, zombies.pop(0))
            report.unlink()
            durations.append(time.monotonic() - round_started)
        for pid in zombies:
            _reap(server, pid)
    finally:
        server.close()
    assert StateStore(Counter, path).load().count == base
    return seen, durations


def test_kill_9_at_random_moments_never_breaks_or_loses_anything(tmp_path: Path) -> None:
    # Independent loops side by side: a kill between a child's mkdir of the lock and
    # its owner record makes the next process wait out the creation grace (2 s),
    # and the other loops use that time.
    seed = int.from_bytes(os.urandom(4), "big")
    with ThreadPoolExecutor(LOOPS) as pool:
        futures = [
            pool.submit(_kill_loop, tmp_path / f"loop{n}", ROUNDS // LOOPS, seed + n)
            for n in range(LOOPS)
        ]
        results = [f.result() for f in futures]
    seen: Tally[str] = Tally()
    durations: list[float] = []
    for tally, times in results:
        seen.update(tally)
        durations += times
    durations.sort()
    print(
        f"{len(durations)} kills; {dict(seen)}; rounds: "
        f"median {durations[len(durations) // 2]:.3f} s, max {durations[-1]:.2f} s"
    )
    assert len(durations) == ROUNDS // LOOPS * LOOPS
    # The kills did land in the middle of updates, not only between them.
    assert seen["lock left behind"] >= len(durations) // 10, seen
    assert seen["temporary file left"] >= 1, seen
    assert seen["lock of a zombie taken over"] >= 1, seen
