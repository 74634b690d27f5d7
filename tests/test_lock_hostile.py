"""The lock in a hostile folder: it touches only what it made, never lets two hold it,
and treats a bad record as garbage.

* Removal: whatever sits at the lock path or under a moved-aside name that is not a
  statestore lock instance (a symbolic link, a file, a FIFO, a socket, a folder with
  other content, the working directory) is reported or left alone, never deleted,
  also when another user planted it.
* Liveness: a record that shares our host name but not our boot id or pid namespace,
  or a holder that ``/proc`` hides (``hidepid``), is not dead: its lease decides.
* Records: an owner record or claim with a field of the wrong type or out of range
  is garbage, judged by its age, in ``update()``, ``lock status``, ``lock break`` and
  ``doctor`` alike.

The tests that act as another user or mount a private ``/proc`` need root; they run
the other side in a child process that drops to ``nobody`` after importing what it
needs, and are skipped where that is not possible.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import workers
from conftest import Counter

from statestore import DirectoryLock, LockError, LockTimeout, StateStore, _cli
from statestore._lock import claim as _claim
from statestore._lock import observe
from statestore._lock.liveness import identity
from statestore._lock.record import new_owner

pytestmark = pytest.mark.timeout(120)

SPAWN = mp.get_context("spawn")
HERE = os.path.dirname(os.path.abspath(__file__))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: to act as another user")
#: Long enough that a test which waited for it would fail on the pytest timeout's side.
LONG = 30.0


def _bump(s: Counter) -> None:
    s.count += 1


def tree(folder: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Everything under ``folder`` (not following links): type, owner, content."""
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        content: bytes | str | None = None
        if stat.S_ISREG(st.st_mode):
            content = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        out[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode), st.st_uid, content)
    return out


def record(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = json.loads(new_owner(30.0).to_json())
    doc.update(changes)
    return doc


def plant_record(lock_dir: Path, age: float = 0.0, **changes: object) -> None:
    """An owner record as another process would have written it, ``age`` seconds ago."""
    lock_dir.mkdir(exist_ok=True)
    owner = lock_dir / "owner.json"
    owner.write_text(json.dumps(record(**changes), allow_nan=True))
    if age:
        old = time.time() - age
        os.utime(owner, (old, old))
        os.utime(lock_dir, (old, old))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tag(
    pid: object, *, boot_id: object = None, pid_ns: object = None, start_time: object = None
) -> str:
    me = identity()
    return json.dumps(
        [
            me.host,
            me.boot_id if boot_id is None else boot_id,
            pid,
            start_time,
            me.pid_ns if pid_ns is None else pid_ns,
        ]
    )


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = _cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user may write (a group folder); pytest's tmp_path is root's own."""
    folder = Path(tempfile.mkdtemp(prefix="statestore-hostile-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def private() -> Iterator[Path]:
    """The victim's private folder: files nobody else may read."""
    folder = Path(tempfile.mkdtemp(prefix="statestore-private-"))
    folder.chmod(0o700)
    (folder / "owner.json").write_text("precious, and named like a lock's own file")
    (folder / "notes.txt").write_text("precious")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.txt").write_text("precious too")
    os.symlink("notes.txt", folder / "claim")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------- running as another user

_PRELUDE = """
import errno, json, os, sys, tempfile, time, traceback
from conftest import Counter
from statestore import DirectoryLock, LockError, LockTimeout, StateStore, StateStoreError
from statestore._lock.liveness import holder_alive, identity
from statestore._lock.record import LockOwner, read_owner_at

def _warm_up():
    # Run every code path once while we may still read our own files: nothing is
    # imported after dropping privileges.
    d = tempfile.mkdtemp()
    lock = DirectoryLock(os.path.join(d, "w.lock"))
    with lock:
        try:
            DirectoryLock(os.path.join(d, "w.lock")).acquire(timeout=0.01)
        except Exception:
            pass
    StateStore(Counter, os.path.join(d, "w.json"), default=Counter).update(lambda c: None)
    identity()
    import shutil
    shutil.rmtree(d)

def attempt(fn):
    started = time.monotonic()
    try:
        value = fn()
    except BaseException as e:
        return {"error": type(e).__name__, "message": str(e),
                "alive": getattr(e, "alive", "n/a"), "elapsed": time.monotonic() - started,
                "trace": "".join(traceback.format_exception(e))}
    return {"value": repr(value), "elapsed": time.monotonic() - started}

_warm_up()
os.setgroups([])
os.setgid(GID)
os.setuid(UID)
assert os.geteuid() == UID
results = {}
"""


def as_nobody(code: str, *, hidepid: bool = False, **names: object) -> dict[str, Any]:
    """Run ``code`` as the user nobody (with ``hidepid``: under a private /proc mounted
    with hidepid=2); it fills ``results``, which is returned."""
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("there is no user 'nobody' on this machine")
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = HERE
    assigns = "".join(f"{k} = {v!r}\n" for k, v in names.items())
    script = (
        f"UID = {user.pw_uid}\nGID = {user.pw_gid}\n"
        + _PRELUDE
        + assigns
        + textwrap.dedent(code)
        + "\nprint(json.dumps(results))\n"
    )
    argv = [sys.executable, "-c", script]
    if hidepid:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare(1) to mount a private /proc")
        argv = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t proc -o hidepid=2 proc /proc && exec "$@"',
            "sh",
            *argv,
        ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=90)
    if hidepid and proc.returncode != 0 and "mount" in proc.stderr and "results" not in proc.stdout:
        pytest.skip(f"this machine does not allow mounting /proc ({proc.stderr.strip()})")
    assert proc.returncode == 0, proc.stderr
    results: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ------------------------------------------------------- 1. what is at the path


@pytest.mark.parametrize("given", ["", ".", "..", "state/", "state/.", "state/..", "/"])
def test_a_lock_path_that_names_no_directory_of_its_own_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(LockError) as info:
        DirectoryLock(given)
    assert info.value.errno == 22 and "lock directory itself" in str(info.value)
    with pytest.raises(LockError):
        StateStore(Counter, tmp_path / "s.json", lock=given)
    assert tree(tmp_path) == before


def _symlink_to_dir(lock: Path, victim: Path) -> None:
    os.symlink(victim, lock)


def _symlink_dangling(lock: Path, victim: Path) -> None:
    os.symlink(victim / "missing", lock)


def _symlink_to_file(lock: Path, victim: Path) -> None:
    os.symlink(victim / "notes.txt", lock)


def _regular_file(lock: Path, victim: Path) -> None:
    lock.write_text("not a lock")


def _fifo(lock: Path, victim: Path) -> None:
    os.mkfifo(lock)


def _socket(lock: Path, victim: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(lock))
    s.close()


def _foreign_dir(lock: Path, victim: Path) -> None:
    lock.mkdir()
    (lock / "project.txt").write_text("somebody's work")
    (lock / "src").mkdir()
    old = time.time() - 3600  # long past the creation grace
    os.utime(lock, (old, old))


def _foreign_dir_with_garbage_record(lock: Path, victim: Path) -> None:
    _foreign_dir(lock, victim)
    (lock / "owner.json").write_text("{not a record")


def _dir_with_a_linked_record(lock: Path, victim: Path) -> None:
    lock.mkdir()
    os.symlink(victim / "owner.json", lock / "owner.json")


def _dir_with_a_fifo_record(lock: Path, victim: Path) -> None:
    lock.mkdir()
    os.mkfifo(lock / "owner.json")


NOT_A_LOCK: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "symlink-to-dir": (_symlink_to_dir, "symbolic link"),
    "symlink-dangling": (_symlink_dangling, "does not exist"),
    "symlink-to-file": (_symlink_to_file, "symbolic link"),
    "regular-file": (_regular_file, "regular file"),
    "fifo": (_fifo, "FIFO"),
    "socket": (_socket, "socket"),
    "dir-with-other-content": (_foreign_dir, "'project.txt'"),
    "dir-with-other-content-and-garbage-record": (_foreign_dir_with_garbage_record, "'src'"),
    "dir-whose-record-is-a-symlink": (_dir_with_a_linked_record, "'owner.json'"),
    "dir-whose-record-is-a-fifo": (_dir_with_a_fifo_record, "'owner.json'"),
}


@pytest.fixture(params=sorted(NOT_A_LOCK))
def not_a_lock(
    request: pytest.FixtureRequest, tmp_path: Path, private: Path
) -> Iterator[tuple[Path, str]]:
    """A lock path with something at it that no lock made, and the word that names it."""
    make, word = NOT_A_LOCK[request.param]
    lock = tmp_path / "s.json.lock"
    make(lock, private)
    before = (tree(tmp_path), tree(private), lock.lstat().st_ino)
    yield lock, word
    assert (tree(tmp_path), tree(private), lock.lstat().st_ino) == before, "it was touched"


def test_what_no_lock_made_is_an_error_at_once_from_acquire(not_a_lock: tuple[Path, str]) -> None:
    lock, word = not_a_lock
    started = time.monotonic()
    with pytest.raises(LockError) as info:
        DirectoryLock(lock, timeout=LONG).acquire()
    assert time.monotonic() - started < LONG / 3  # not after the grace or the timeout
    assert str(lock) in str(info.value) and word in str(info.value)
    for call in (
        lambda: DirectoryLock(lock).break_lock(force=True),
        lambda: DirectoryLock(lock).owner(),
    ):
        with pytest.raises(LockError):
            call()


def test_what_no_lock_made_is_an_error_at_once_from_update(not_a_lock: tuple[Path, str]) -> None:
    lock, word = not_a_lock
    store = StateStore(Counter, lock.parent / "s.json", default=Counter, timeout=LONG)
    started = time.monotonic()
    with pytest.raises(LockError, match=word):
        store.update(_bump)
    assert time.monotonic() - started < LONG / 3
    assert not (lock.parent / "s.json").exists()


def test_what_no_lock_made_is_reported_by_the_command_line(
    not_a_lock: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    lock, word = not_a_lock
    for argv in (["lock", "status", str(lock)], ["lock", "break", "--force", str(lock)]):
        code, out, err = cli(capsys, *argv)
        assert code == 1 and word in err and "Traceback" not in err, (argv, out, err)
    code, out, err = cli(capsys, "doctor", str(lock.parent), "--fix")
    assert "Traceback" not in out + err


def test_an_empty_directory_is_a_lock_being_created_and_only_then_stale(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.mkdir()
    with pytest.raises(LockTimeout):  # within the grace: maybe its creator is writing
        DirectoryLock(lock).acquire(timeout=0.3)
    os.symlink(tag(dead_pid()), lock / "claim")  # a dead breaker's claim is the lock's own
    (lock / "owner.json.0123abcd.tmp").write_text("{")  # and so is a heartbeat's temp file
    old = time.time() - 60
    os.utime(lock, (old, old))
    with DirectoryLock(lock, timeout=5):
        pass
    assert os.listdir(tmp_path) == []


def test_a_stale_lock_holding_other_content_is_moved_aside_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = tmp_path / "x.lock"
    plant_record(lock, pid=dead_pid())
    (lock / "dropped-here.txt").write_text("keep me")
    os.mkfifo(lock / "claim.7")  # a claim's name, not a claim's type
    with caplog.at_level(logging.WARNING, logger="statestore"), DirectoryLock(lock, timeout=5):
        pass
    (kept,) = [p for p in tmp_path.iterdir() if p.name.endswith(".broken")]
    assert (kept / "dropped-here.txt").read_text() == "keep me"
    assert stat.S_ISFIFO((kept / "claim.7").lstat().st_mode)
    assert any("did not make" in r.getMessage() for r in caplog.records)
    # The next process's sweep leaves it too; the lock itself is free.
    _claim.sweep_aside(str(lock))
    assert (kept / "dropped-here.txt").read_text() == "keep me"
    with DirectoryLock(lock, timeout=1):
        pass


@pytest.mark.parametrize("lease", [30.0, 1.0], ids=["release-by-rename", "release-by-claim"])
def test_a_held_lock_with_content_dropped_into_it_is_released_and_the_content_kept(
    tmp_path: Path, lease: float
) -> None:
    lock = tmp_path / "x.lock"
    with DirectoryLock(lock, lease=lease):
        (lock / "dropped-here.txt").write_text("keep me")
    assert not lock.exists()
    (kept,) = tmp_path.iterdir()
    assert os.listdir(kept) == ["dropped-here.txt"]
    with DirectoryLock(lock, timeout=1):
        pass


def test_removal_works_through_the_instance_not_the_name(tmp_path: Path, private: Path) -> None:
    """A breaker's moved-aside name replaced by a link before the delete: the link's
    target is untouched, and only the instance's own entries go."""
    instance = tmp_path / "x.lock"
    plant_record(instance)
    os.symlink(tag(dead_pid()), instance / "claim")
    dirfd = os.open(instance, os.O_RDONLY | os.O_DIRECTORY)
    try:
        aside = tmp_path / "x.lock.0123456789ab.broken"
        os.rename(instance, tmp_path / "elsewhere")
        os.symlink(private, aside)
        before = tree(private)
        _claim.remove_instance(str(aside), dirfd)
    finally:
        os.close(dirfd)
    assert tree(private) == before
    assert aside.is_symlink() and os.listdir(tmp_path / "elsewhere") == []


def _aside(folder: Path, kind: str = "broken", hexes: str = "0123456789ab") -> Path:
    return folder / f"state.json.lock.{hexes}.{kind}"


def test_the_sweep_removes_only_proven_lock_instances(tmp_path: Path, private: Path) -> None:
    # Left by processes killed between their rename and their delete: these go.
    real = _aside(tmp_path, "broken", "aaaaaaaaaaaa")
    plant_record(real, pid=dead_pid())
    os.symlink(tag(dead_pid()), real / "claim")
    cut_short = _aside(tmp_path, "released", "bbbbbbbbbbbb")
    cut_short.mkdir()
    (cut_short / "owner.json").write_bytes(new_owner(30.0).to_json()[:20])
    empty = _aside(tmp_path, "released", "cccccccccccc")
    empty.mkdir()
    # Planted under aside names: none of these is touched.
    os.symlink(private, _aside(tmp_path, "broken", "111111111111"))
    os.symlink(private / "notes.txt", _aside(tmp_path, "released", "222222222222"))
    os.symlink(private / "gone", _aside(tmp_path, "broken", "333333333333"))
    other = _aside(tmp_path, "broken", "444444444444")
    other.mkdir()
    (other / "owner.json").write_text('{"format": "someone else"}')
    files = _aside(tmp_path, "released", "555555555555")
    files.mkdir()
    (files / "data.txt").write_text("mine")
    _aside(tmp_path, "broken", "666666666666").write_text("a file")
    os.mkfifo(_aside(tmp_path, "released", "777777777777"))
    linked = _aside(tmp_path, "broken", "888888888888")
    linked.mkdir()
    os.symlink(private / "owner.json", linked / "owner.json")
    # A link to a live lock elsewhere: exactly what a lock instance looks like inside.
    live = DirectoryLock(private / "other.lock")
    live.acquire()
    os.symlink(private / "other.lock", _aside(tmp_path, "released", "999999999999"))
    before = (
        tree(private),
        {
            k: v
            for k, v in tree(tmp_path).items()
            if not k.startswith(
                ("state.json.lock.aaaa", "state.json.lock.bbbb", "state.json.lock.cccc")
            )
        },
    )
    try:
        StateStore(Counter, tmp_path / "state.json", default=Counter).update(_bump)
        live.verify()  # still held: its owner record was not taken apart
    finally:
        live.release()

    assert not real.exists() and not cut_short.exists() and not empty.exists()
    after = tree(tmp_path)
    del after["state.json"]
    assert after == before[1]
    kept = {k: v for k, v in before[0].items() if not k.startswith("other.lock")}
    assert tree(private) == kept


@needs_root
def test_a_link_planted_by_another_user_does_not_empty_the_victims_folder(
    shared: Path, private: Path
) -> None:
    """Two users share a folder; one plants links under moved-aside names pointing
    into the other's private folder, which it cannot even read."""
    results = as_nobody(
        """
        def plant():
            for n, kind in enumerate(("broken", "released")):
                os.symlink(PRIVATE, f"{SHARED}/state.json.lock.{n}{'0' * 11}.{kind}")
            planted = f"{SHARED}/state.json.lock.{'a' * 12}.broken"
            os.mkdir(planted)
            os.symlink(PRIVATE + "/owner.json", planted + "/owner.json")
            os.symlink(PRIVATE + "/notes.txt", planted + "/claim")
        results["read"] = attempt(lambda: os.listdir(PRIVATE))
        results["plant"] = attempt(plant)
        """,
        SHARED=str(shared),
        PRIVATE=str(private),
    )
    assert results["read"]["error"] == "PermissionError"
    assert "error" not in results["plant"], results["plant"]
    before = tree(private)
    # The victim's first lock of the path in a new process sweeps moved-aside names.
    subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            from conftest import Counter
            from statestore import StateStore
            s = StateStore(Counter, {str(shared / "state.json")!r}, default=Counter)
            s.update(lambda c: c.model_copy(update={{"count": c.count + 1}}))
        """),
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": HERE},
        cwd="/",
    )
    assert tree(private) == before
    assert (shared / "state.json").exists()
    assert len([p for p in shared.iterdir() if ".lock." in p.name]) == 3


# ------------------------------------------------------------- 2. liveness


@pytest.mark.parametrize(
    "fields",
    [
        {"boot_id": "00000000-0000-4000-8000-000000000000"},
        {"pid_ns": 4026531000},
        {"boot_id": None},
        {"pid_ns": None},
        {"boot_id": None, "pid_ns": None},
    ],
    ids=["other-boot-id", "other-pid-namespace", "no-boot-id", "no-pid-namespace", "neither"],
)
def test_a_record_that_may_be_from_another_machine_waits_for_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, object]
) -> None:
    """Same host name, dead pid, but nothing that proves it is our pid: not dead."""
    monkeypatch.setattr(observe, "CLOCK_SKEW", 0.3)
    pid = dead_pid()
    now = time.time()
    lock = tmp_path / "x.lock"
    plant_record(lock, pid=pid, acquired_at=now, expires_at=now + 1.0, **fields)
    with pytest.raises(LockTimeout) as info:
        DirectoryLock(lock).acquire(timeout=0.3)
    assert info.value.alive is None
    assert json.loads((lock / "owner.json").read_text())["expires_at"] == now + 1.0
    with DirectoryLock(lock, timeout=5):
        assert time.time() >= now + 1.0 + 0.3


def test_a_live_pid_without_its_start_time_is_not_taken_for_dead_or_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observe, "CLOCK_SKEW", 0.3)
    now = time.time()
    lock = tmp_path / "x.lock"
    plant_record(lock, pid=os.getppid(), start_time=None, expires_at=now + 1.0)
    with pytest.raises(LockTimeout) as info:
        DirectoryLock(lock).acquire(timeout=0.2)
    assert info.value.alive is None
    with DirectoryLock(lock, timeout=5):
        pass


def test_a_claim_that_may_be_from_another_machine_is_not_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    plant_record(lock, pid=dead_pid())
    os.symlink(tag(dead_pid(), boot_id="00000000-0000-4000-8000-000000000000"), lock / "claim")
    with pytest.raises(LockTimeout):
        DirectoryLock(lock).acquire(timeout=0.5)
    assert (lock / "claim").is_symlink()
    old = time.time() - 3600  # older than a lease: its maker has had all the time it needs
    os.utime(lock / "claim", (old, old), follow_symlinks=False)
    with DirectoryLock(lock, timeout=5):
        pass


_HOLDER_SEEN_BY_NOBODY = """
owner = LockOwner.from_json(read_owner_at(LOCK))
results["alive"] = holder_alive(owner)
results["acquire"] = attempt(lambda: DirectoryLock(LOCK).acquire(timeout=0.5))
results["still"] = LockOwner.from_json(read_owner_at(LOCK)).token == owner.token
"""


@needs_root
@pytest.mark.parametrize("hidepid", [False, True], ids=["proc-visible", "proc-hidepid=2"])
def test_a_holder_of_another_user_is_alive_even_where_proc_hides_it(
    shared: Path, hidepid: bool
) -> None:
    """kill(pid, 0) says EPERM: the holder exists. Under hidepid its /proc entry is
    unreadable: unknown, and its lease (live) decides; its lock is never broken."""
    lock = shared / "x.lock"
    ready = shared / "ready"
    holder = SPAWN.Process(target=workers.hold_lock, args=(str(lock), str(ready), 60))
    holder.start()
    try:
        workers.wait_for(str(ready))
        results = as_nobody(_HOLDER_SEEN_BY_NOBODY, hidepid=hidepid, LOCK=str(lock))
        assert results["alive"] is (None if hidepid else True)
        assert results["acquire"].get("error") == "LockTimeout", results["acquire"]
        assert results["acquire"]["alive"] is (None if hidepid else True)
        assert results["still"] and holder.is_alive()
    finally:
        holder.kill()
        holder.join()


# ----------------------------------------------------------- 3. bad records

NAN, INF = math.nan, math.inf
BAD_FIELDS: dict[str, dict[str, object]] = {
    "pid-10**20": {"pid": 10**20},
    "pid--1": {"pid": -1},
    "pid-0": {"pid": 0},
    "pid-past-pid_max": {"pid": 2**22 + 1},
    "pid-true": {"pid": True},
    "pid-string": {"pid": "123"},
    "pid-float": {"pid": 12.0},
    "expires-nan": {"expires_at": NAN},
    "expires-inf": {"expires_at": INF},
    "expires--inf": {"expires_at": -INF},
    "expires-1e300": {"expires_at": 1e300},
    "expires-string": {"expires_at": "soon"},
    "acquired-nan": {"acquired_at": NAN},
    "acquired-negative": {"acquired_at": -5.0},
    "lease-0": {"lease": 0},
    "lease-nan": {"lease": NAN},
    "lease-negative": {"lease": -30.0},
    "token-empty": {"token": ""},
    "token-huge": {"token": "t" * 20000},
    "token-number": {"token": 7},
    "host-huge": {"host": "h" * 20000},
    "host-null": {"host": None},
    "boot-id-number": {"boot_id": 5},
    "boot-id-huge": {"boot_id": "b" * 5000},
    "start-time-negative": {"start_time": -1},
    "start-time-10**30": {"start_time": 10**30},
    "pid-ns-10**30": {"pid_ns": 10**30},
    "pid-ns-string": {"pid_ns": "pid:[4026531836]"},
    "format-version-true": {"format_version": True},
    "pid-of-5000-digits": {"pid": "<5000 digits>"},
}


@pytest.fixture(params=sorted(BAD_FIELDS))
def bad(request: pytest.FixtureRequest) -> dict[str, object]:
    return BAD_FIELDS[request.param]


def _plant_bad(lock: Path, fields: dict[str, object], age: float) -> None:
    lock.mkdir()
    text = json.dumps(record(**fields), allow_nan=True)
    # More digits than json will convert (int_max_str_digits): its ValueError is garbage too.
    text = text.replace('"<5000 digits>"', "1" * 5000)
    (lock / "owner.json").write_text(text)
    old = time.time() - age
    os.utime(lock / "owner.json", (old, old))


def test_a_bad_record_is_garbage_to_update(tmp_path: Path, bad: dict[str, object]) -> None:
    path = tmp_path / "s.json"
    lock = tmp_path / "s.json.lock"
    _plant_bad(lock, bad, age=0)
    store = StateStore(Counter, path, default=Counter, timeout=0.3)
    with pytest.raises(LockTimeout) as info:  # fresh: maybe being written, never two in
        store.update(_bump)
    assert info.value.holder is None
    old = time.time() - 60
    os.utime(lock / "owner.json", (old, old))
    assert store.update(_bump).count == 1  # old: never blocks for ever
    assert not lock.exists()


def test_a_bad_record_is_garbage_to_lock_status_and_break(
    tmp_path: Path, bad: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    lock = tmp_path / "s.json.lock"
    _plant_bad(lock, bad, age=0)
    code, out, err = cli(capsys, "lock", "status", str(lock))
    assert (code, err) == (0, "") and "unreadable owner record" in out
    code, out, err = cli(capsys, "lock", "break", str(tmp_path / "s.json"))
    assert code == 1 and "use --force" in err
    os.utime(lock / "owner.json", (time.time() - 60,) * 2)
    code, out, err = cli(capsys, "lock", "status", str(tmp_path / "s.json"))
    assert (code, err) == (1, "") and "stale" in out
    code, out, err = cli(capsys, "lock", "break", str(lock))
    assert (code, err) == (0, "") and "broke the lock" in out
    assert os.listdir(tmp_path) == []


def test_a_bad_record_is_garbage_to_doctor(
    tmp_path: Path, bad: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    _plant_bad(tmp_path / "s.json.lock", bad, age=60)
    code, out, err = cli(capsys, "doctor", str(tmp_path))
    assert (code, err) == (1, "") and "s.json.lock: stale lock: unreadable owner record" in out
    code, out, err = cli(capsys, "doctor", str(tmp_path), "--fix")
    assert (code, err) == (0, ""), out
    assert os.listdir(tmp_path) == []


BAD_TAGS = {
    "pid-10**20": tag(10**20),
    "pid--1": tag(-1),
    "pid-0": tag(0),
    "pid-true": tag(True),
    "pid-string": tag("1"),
    "start-time-10**30": tag(1, start_time=10**30),
    "pid-ns-10**30": tag(1, pid_ns=10**30),
    "boot-id-number": tag(1, boot_id=7),
    "not-a-list": json.dumps({"pid": 1}),
    "short-list": json.dumps([1, 2]),
    "not-json": "a claim",
}


@pytest.mark.parametrize("bad_tag", list(BAD_TAGS.values()), ids=list(BAD_TAGS))
def test_a_claim_with_a_bad_tag_says_nothing_about_its_maker(tmp_path: Path, bad_tag: str) -> None:
    """Unknown maker: the claim is waited for like one from another host, never a crash,
    and never kill(-1, 0) or kill(0, 0) taken for a live maker."""
    lock = tmp_path / "x.lock"
    plant_record(lock, pid=dead_pid())
    os.symlink(bad_tag, lock / "claim")
    with pytest.raises(LockTimeout):
        DirectoryLock(lock).acquire(timeout=0.3)
    old = time.time() - 3600
    os.utime(lock / "claim", (old, old), follow_symlinks=False)
    with DirectoryLock(lock, timeout=5):
        pass


@pytest.mark.parametrize("name", ["claim.x", "claim.", f"claim.{'9' * 200}", "claim.-1"])
def test_entries_named_almost_like_claims_do_not_crash_the_lock(tmp_path: Path, name: str) -> None:
    lock = tmp_path / "x.lock"
    with DirectoryLock(lock):
        os.symlink(tag(os.getpid()), lock / name)
        lock_obj = DirectoryLock(lock)
        lock_obj.verify()
    # A stale one holding such an entry is broken, and the entry kept aside.
    plant_record(lock, pid=dead_pid())
    os.symlink(tag(os.getpid()), lock / name)
    with DirectoryLock(lock, timeout=5):
        pass


# JSON Schema can say nothing of NaN or Infinity (not JSON), of a number Python will
# not read, or of 12.0 (an integer to JSON Schema; the reader is stricter).
IN_JSON = sorted(
    k
    for k, v in BAD_FIELDS.items()
    if not any(isinstance(x, float) and not math.isfinite(x) for x in v.values())
    and v.get("pid") != "<5000 digits>"
    and not isinstance(v.get("pid"), float)
)


@pytest.mark.parametrize("name", IN_JSON)
def test_the_schema_of_the_owner_record_refuses_what_the_reader_refuses(name: str) -> None:
    from jsonschema import Draft202012Validator

    from statestore._lock.record import LockOwner
    from statestore._schema import internal_schemas

    doc = record(**BAD_FIELDS[name])
    with pytest.raises(ValueError):
        LockOwner.from_json(json.dumps(doc).encode())
    schema = internal_schemas()["lock-owner.v1.schema.json"]
    assert not Draft202012Validator(schema).is_valid(doc)
    assert Draft202012Validator(schema).is_valid(record())


def test_doctor_removes_a_leftover_only_when_it_is_a_lock_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "a.json.lock.0123456789ab.broken"
    plant_record(real, pid=dead_pid())
    other = tmp_path / "b.json.lock.0123456789ab.released"
    other.mkdir()
    (other / "work.txt").write_text("somebody's")
    (other / "owner.json").write_bytes(new_owner(30.0).to_json())
    code, out, err = cli(capsys, "doctor", str(tmp_path), "--fix")
    assert "Traceback" not in out + err
    assert f"fixed     {real.name}: removed" in out
    assert f"not fixed {other.name}: " in out and "did not make (work.txt)" in out
    assert not real.exists()
    assert (other / "work.txt").read_text() == "somebody's" and (other / "owner.json").exists()
    assert code == 1  # the folder with somebody's work remains, for a person to look at


@pytest.mark.parametrize("kind", ["file", "dir", "fifo"])
def test_something_else_named_claim_in_a_stale_lock_does_not_block_it(
    tmp_path: Path, kind: str
) -> None:
    """No process made it, so it guards nothing: the breaker claims the next name."""
    lock = tmp_path / "x.lock"
    plant_record(lock, pid=dead_pid())
    claim = lock / "claim"
    {"file": lambda: claim.write_text("x"), "dir": claim.mkdir, "fifo": lambda: os.mkfifo(claim)}[
        kind
    ]()
    started = time.monotonic()
    with DirectoryLock(lock, timeout=LONG):
        assert time.monotonic() - started < LONG / 3
    (kept,) = [p for p in tmp_path.iterdir() if p.name.endswith(".broken")]
    assert (kept / "claim").exists()  # not the lock's own: kept with it
