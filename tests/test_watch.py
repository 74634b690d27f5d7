"""FileWatcher: every kind of change by another process is seen, nothing is missed
between waits, bursts give one wake-up, idle costs no CPU, close() and fork behave.

Each behavioural test runs on both backends (inotify and the forced stat poll).
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statestore._errors import StateReadError, StateStoreError
from statestore._watch import (
    POLL_INTERVAL,
    FileWatcher,
    wait_async,
)

BACKENDS = ["inotify", "poll"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")

# A writer in its own process: one step per "go" line on stdin, "done" after each.
WRITER = textwrap.dedent(
    """
    import os, sys
    path = sys.argv[1]
    def write(p, data):
        with open(p, "wb") as f:
            f.write(data)
    def create():
        write(path, b'{"n": 1}')
    def in_place():
        with open(path, "r+b") as f:
            f.seek(0)
            f.write(b'{"n": 2}')
    def rename_over():
        write(path + ".tmp", b'{"n": 3}')
        os.replace(path + ".tmp", path)
    def vim_save():
        os.rename(path, path + "~")
        write(path, b'{"n": 4}')
        os.unlink(path + "~")
    def chmod():
        os.chmod(path, 0o600)
    def delete():
        os.unlink(path)
    def delete_create():
        os.unlink(path)
        write(path, b'{"n": 5}')
    steps = [create, in_place, rename_over, vim_save, chmod, delete, create, delete_create]
    for step in steps:
        if sys.stdin.readline().strip() != "go":
            break
        step()
        print("done", step.__name__, flush=True)
    """
)
STEPS = 8


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "inotify" and not sys.platform.startswith("linux"):
        pytest.skip("inotify is Linux's")
    return str(request.param)


@pytest.fixture
def watched(tmp_path: Path, backend: str) -> Iterator[tuple[Path, FileWatcher]]:
    path = tmp_path / "state.json"
    with FileWatcher(path, backend=backend) as w:  # type: ignore[arg-type]
        assert w.backend == backend
        yield path, w


def drain(w: FileWatcher) -> None:
    """Take in wake-ups still due to the last step (spurious ones are allowed)."""
    while w.wait(2 * POLL_INTERVAL + 0.05):
        pass


def test_sees_every_kind_of_change_from_another_process(
    watched: tuple[Path, FileWatcher],
) -> None:
    path, w = watched
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        latencies = []
        for _ in range(STEPS):
            assert not w.wait(0), "a wake-up before the writer moved"
            writer.stdin.write("go\n")
            writer.stdin.flush()
            done = writer.stdout.readline().split()
            finished = time.monotonic()
            # Seen before the writer is given its next step.
            assert w.wait(5.0), f"the watcher missed the step {done}"
            latencies.append(time.monotonic() - finished)
            drain(w)
    finally:
        writer.stdin.close()
        assert writer.wait(10) == 0
        writer.stdout.close()
    # Normally within a few ms (inotify) or one poll interval; a loaded machine
    # may delay the odd one, so the bound is on the median.
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.1, latencies


def test_a_change_between_two_waits_is_not_missed(watched: tuple[Path, FileWatcher]) -> None:
    path, w = watched
    path.write_bytes(b"{}")
    assert w.wait(5.0)
    drain(w)
    # Nobody waits while these happen; the next wait reports them at once.
    for data in (b'{"a": 1}', b'{"a": 22}'):
        path.write_bytes(data)
        time.sleep(3 * POLL_INTERVAL)
        assert w.wait(0), "a change made while nobody waited was lost"
        drain(w)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b'{"b": 3}')
    os.replace(tmp, path)
    time.sleep(3 * POLL_INTERVAL)
    assert w.wait(0)


def test_a_burst_gives_one_wake_up(watched: tuple[Path, FileWatcher]) -> None:
    path, w = watched
    for i in range(200):
        tmp = path.with_suffix(f".{i}.tmp")
        tmp.write_bytes(b'{"i": %d}' % i)
        os.replace(tmp, path)
    time.sleep(3 * POLL_INTERVAL)
    assert w.wait(0) is True
    assert w.wait(0.3) is False, "200 queued changes gave more than one wake-up"


def test_other_names_in_the_folder_do_not_wake(
    watched: tuple[Path, FileWatcher], tmp_path: Path
) -> None:
    _path, w = watched
    for i in range(20):
        (tmp_path / f"other-{i}.json").write_bytes(b"{}")
    (tmp_path / "state.json.lock").mkdir()
    (tmp_path / "xstate.json").write_bytes(b"{}")
    assert w.wait(0.3) is False


def test_close_from_another_thread_wakes_a_blocked_wait(
    watched: tuple[Path, FileWatcher],
) -> None:
    _path, w = watched
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(w.wait(None)), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive(), "wait(None) returned with nothing changed"
    w.close()
    waiter.join(5.0)
    assert not waiter.is_alive(), "close() did not wake the blocked wait"
    assert result == [False]
    assert w.closed
    with pytest.raises(StateReadError) as info:
        w.wait(0)
    assert isinstance(info.value, StateStoreError) and info.value.errno == errno.EBADF
    assert str(w.path) in str(info.value)
    w.close()  # twice is fine


def test_wait_async_sees_a_change_and_ends_on_close(watched: tuple[Path, FileWatcher]) -> None:
    path, w = watched

    async def main() -> tuple[bool, bool, bool]:
        idle = await wait_async(w, 0.2)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, path.write_bytes, b"{}")
        changed = await wait_async(w, 5.0)
        await asyncio.sleep(3 * POLL_INTERVAL)
        while await wait_async(w, 2 * POLL_INTERVAL + 0.05):
            pass
        threading.Timer(0.2, w.close).start()
        closed = await wait_async(w, None)
        return idle, changed, closed

    assert asyncio.run(main()) == (False, True, False)


def test_a_forked_child_has_its_own_queue(watched: tuple[Path, FileWatcher]) -> None:
    path, w = watched
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            first = w.wait(0)  # what happened since the fork is unknown: a change
            os.write(ready_w, b"r")
            seen = w.wait(10.0)
            os.write(out_w, b"%d%d" % (first, seen))
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(out_w)
    assert os.read(ready_r, 1) == b"r"
    path.write_bytes(b'{"after": "fork"}')
    parent_saw = w.wait(10.0)
    _, status = os.waitpid(pid, 0)
    child = os.read(out_r, 2)
    os.close(ready_r)
    os.close(out_r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child == b"11", "the child missed the first report or the change"
    assert parent_saw, "the parent lost the change (its queue was shared with the child)"


@linux_only
def test_idle_costs_no_cpu(tmp_path: Path) -> None:
    with FileWatcher(tmp_path / "state.json", backend="inotify") as w:
        spent: list[float] = []

        def idle() -> None:
            start = time.thread_time()
            assert w.wait(0.5) is False
            spent.append(time.thread_time() - start)

        t = threading.Thread(target=idle)
        t.start()
        t.join()
    # A busy loop or a poll would show tens of ms; a sleep in select shows ~0.
    assert spent[0] < 0.005, spent


@linux_only
def test_the_folder_going_away_is_a_change_then_polled(tmp_path: Path) -> None:
    folder = tmp_path / "sub"
    folder.mkdir()
    path = folder / "state.json"
    path.write_bytes(b"{}")
    with FileWatcher(path, backend="auto") as w:
        assert w.backend == "inotify"
        path.unlink()
        folder.rmdir()
        assert w.wait(5.0)
        drain(w)
        assert w.backend == "poll" and w.poll_reason
        folder.mkdir()
        path.write_bytes(b'{"back": 1}')
        assert w.wait(5.0), "after the fall-back the poll missed the new file"


def test_a_missing_folder_is_polled_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later" / "state.json"
    with FileWatcher(path) as w:
        assert w.backend == "poll"
        assert not w.wait(0.2)
        path.parent.mkdir()
        path.write_bytes(b"{}")
        assert w.wait(5.0)


def test_a_symlinks_target_is_watched(tmp_path: Path, backend: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "data.json"
    target.write_bytes(b"{}")
    link = tmp_path / "state.json"
    link.symlink_to(target)
    with FileWatcher(link, backend=backend) as w:  # type: ignore[arg-type]
        tmp = real / "data.json.tmp"
        tmp.write_bytes(b'{"x": 1}')
        os.replace(tmp, target)  # a save through the link replaces the target
        assert w.wait(5.0)
        drain(w)
        other = real / "other.json"
        other.write_bytes(b"{}")
        link.unlink()
        link.symlink_to(other)  # the link now leads elsewhere
        assert w.wait(5.0)
        drain(w)
        other.write_bytes(b'{"y": 2}')
        assert w.wait(5.0), "a change of the link's new target was missed"


def test_the_environment_forces_the_poll(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATESTORE_WATCH_BACKEND", "poll")
    with FileWatcher(tmp_path / "s.json") as w:
        assert w.backend == "poll"
        with pytest.raises(OSError):
            w.fileno()
    with pytest.raises(ValueError):
        FileWatcher(tmp_path / "s.json", backend="kqueue")  # type: ignore[arg-type]


@linux_only
def test_fileno_is_readable_on_a_change(tmp_path: Path) -> None:
    import select

    path = tmp_path / "s.json"
    with FileWatcher(path, backend="inotify") as w:
        assert select.select([w.fileno()], [], [], 0)[0] == []
        path.write_bytes(b"{}")
        assert select.select([w.fileno()], [], [], 5.0)[0] == [w.fileno()]
        assert w.wait(0)


@linux_only
def test_no_inotify_left_falls_back_to_the_poll_or_is_a_typed_error(tmp_path: Path) -> None:
    """EMFILE from inotify_init1: 'auto' polls, 'inotify' says why and what to raise."""
    code = textwrap.dedent(
        f"""
        import os, resource, json
        from statestore._watch import FileWatcher
        from statestore._errors import StateReadError
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(held.pop()); os.close(held.pop())  # room for the wake-up pipe only
        w = FileWatcher({str(tmp_path / "s.json")!r})
        out = {{"backend": w.backend, "reason": w.poll_reason}}
        w.close()
        try:
            FileWatcher({str(tmp_path / "s.json")!r}, backend="inotify")
        except StateReadError as e:
            out["error"] = str(e); out["errno"] = e.errno
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["backend"] == "poll" and out["reason"]
    assert out["errno"] == 24 and "max_user_instances" in out["error"]
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # this process untouched


@linux_only
def test_the_file_system_type_decides_between_inotify_and_the_poll(tmp_path: Path) -> None:
    from statestore._watch import _fs_type, _remote

    assert _fs_type("/proc") == "proc"
    assert _fs_type("/proc/self") == "proc"  # the longest mount point wins, not "/"
    assert _fs_type(str(tmp_path)) not in (None, "proc")
    assert not _remote(str(tmp_path))
