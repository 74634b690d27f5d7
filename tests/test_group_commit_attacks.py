"""Attacks on the group commit of one store's updates (``_combine.py``).

Each test pins a rule of the module's docstring from a side the first tests
(``test_group_commit.py``) do not: a forked child inside a group, a function
that never returns, a lost lock, many threads with failures, history,
migrations, folders, interruptions and timeouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statestore import (
    DirectoryLock,
    LockCompromisedError,
    LockTimeout,
    StateFolder,
    StateStore,
    StateStoreError,
)


class Doc(BaseModel):
    n: int = 0
    seen: list[str] = []


def counter_of(store: StateStore[Any]) -> int:
    return int(store.read().revision.split("-")[0])


def wait_queued(store: StateStore[Any], count: int) -> None:
    deadline = time.monotonic() + 10
    while len(store._group._queue) < count:
        assert time.monotonic() < deadline, "the updates did not queue"
        time.sleep(0.002)


def bump(s: Doc) -> None:
    s.n += 1


class Group:
    """A first update holds the lock until ``len(fns)`` more have queued (in order),
    then lets go: those form one group. ``results[i]``: fns[i]'s outcome."""

    def __init__(
        self, store: StateStore[Any], fns: list[Callable[[Any], Any]], *, join: bool = True
    ) -> None:
        self.store = store
        self.pid = os.getpid()
        self.report: Path | None = None
        self.results: list[Any] = [None] * len(fns)
        self.done = [threading.Event() for _ in fns]
        go, inside = threading.Event(), threading.Event()

        def first(s: Any) -> None:
            inside.set()
            go.wait(10)

        self.lead = threading.Thread(target=store.update, args=(first,))
        self.lead.start()
        assert inside.wait(10)
        self.workers = []
        for i, fn in enumerate(fns):
            t = threading.Thread(target=self._call, args=(i, fn))
            t.start()
            wait_queued(store, i + 2)
            self.workers.append(t)
        go.set()
        if join:
            self.join()

    def join(self) -> None:
        for t in [self.lead, *self.workers]:
            t.join(20)
        assert not any(t.is_alive() for t in [self.lead, *self.workers])

    def _call(self, i: int, fn: Callable[[Any], Any]) -> None:
        try:
            self.results[i] = self.store.update(fn)
        except BaseException as e:
            self.results[i] = e
        finally:
            if os.getpid() != self.pid:  # pragma: no cover - a child forked in fn
                if self.report is not None:
                    self.report.write_text(repr(self.results[i]))
                os._exit(0)
            self.done[i].set()


@pytest.fixture
def store(tmp_path: Path) -> StateStore[Doc]:
    s = StateStore(Doc, tmp_path / "state.json", default=Doc, timeout=10)
    s.save(Doc())
    return s


def _child_outcome(pid: int, seconds: float = 10) -> int | None:
    """The child's exit code, or None if it was still running after ``seconds``
    (then it is killed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None



# ------------------------------------------------------------------ fork


@pytest.mark.parametrize("position", [0, 1, 2], ids=["leader", "follower", "last"])
def test_a_child_forked_inside_a_grouped_function_fails_at_once_and_writes_nothing(
    store: StateStore[Doc], tmp_path: Path, position: int
) -> None:
    # The function forks; the child returns from it as if nothing happened. It holds
    # none of its parent's locks and has none of its parent's threads: its update
    # must end with a typed error at once, not wait for threads that are not there,
    # and write nothing.
    children: list[int] = []
    report = tmp_path / "child"

    def forking(s: Doc) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, inside the function
            s.n += 1000
            return
        children.append(pid)
        s.n += 1

    fns: list[Callable[[Doc], Any]] = [bump, bump, bump]
    fns[position] = forking
    group = Group(store, fns, join=False)
    group.report = report
    group.join()
    assert len(children) == 1
    code = _child_outcome(children[0])
    assert code == 0, "the child hung in its parent's group"
    assert "LockCompromisedError" in report.read_text(), report.read_text()
    assert [r.n for r in group.results] == [1, 2, 3]
    assert store.load().n == 3
    store.update(bump)  # the parent's store works on
    assert store.load().n == 4
