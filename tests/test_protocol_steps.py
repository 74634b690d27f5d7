"""One test per protocol step that the model in ``spec/lock.pml`` needs.

SPIN proves the design only if the code takes every step the model takes.
Each test below builds, through the real code path, the interleaving in which
one step matters, and fails when that step is left out. The other party's
moves (a breaker, a holder's heartbeat, the next holder) are made at chosen
system calls of the process under test, with the ``faultfs`` interposer, by
the same system calls that party would make; the holder's heartbeat is
suspended by blocking its thread inside a system call. No sleeps beyond a
0.3 s lease. ``spec/README.md`` ("Which test pins which step") lists them.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter
from faultfs import Interposer

from statestore import (
    DirectoryLock,
    LockCompromisedError,
    LockError,
    LockOwner,
    LockTimeout,
    StateStore,
    StateValidationError,
)

pytestmark = pytest.mark.timeout(60)

LEASE = 0.3  # the short lease of the tests that need one to run out


# ------------------------------------------------------------------- helpers


@dataclass
class _Rule:
    name: str
    match: Callable[[tuple[Any, ...], dict[str, Any]], bool]
    before: Callable[[], None] | None
    after: Callable[[], None] | None


class Script(Interposer):
    """Make another party's moves at chosen system calls of the thread under test.

    Rules fire once each, in the order they were added: a rule is looked at
    only once the rules before it have fired, so the script is one interleaving.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rules: list[_Rule] = []
        self.fired = 0
        self.calls: list[str] = []

    def at(
        self,
        name: str,
        match: Callable[[tuple[Any, ...], dict[str, Any]], bool] = lambda a, k: True,
        *,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> Script:
        self.rules.append(_Rule(name, match, before, after))
        return self

    @property
    def done(self) -> bool:
        return self.fired == len(self.rules)

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.calls.append(name)
        rule = None
        if not self.done:
            candidate = self.rules[self.fired]
            if candidate.name == name and candidate.match(args, kwargs):
                rule = candidate
                self.fired += 1
        if rule is not None and rule.before is not None:
            rule.before()
        result = real(*args, **kwargs)
        if rule is not None and rule.after is not None:
            rule.after()
        return result


class HeartbeatStall(Interposer):
    """Suspend the heartbeat thread inside its next system call (a stopped holder).

    Only the heartbeat's own calls are held back: the rest of the process runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stopped = threading.Event()
        self.go = threading.Event()

    def stop(self) -> None:
        beats = [t for t in threading.enumerate() if t.name == "statestore-heartbeat"]
        assert len(beats) == 1, "no heartbeat thread: acquire a lock first"
        self._thread = beats[0].ident

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.stopped.set()
        assert self.go.wait(30), "the heartbeat was never resumed"
        return real(*args, **kwargs)

    def resume(self) -> None:
        self._thread = None
        self.go.set()


@dataclass(frozen=True)
class Process:
    pid: int
    start_time: int


def start_time_of(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: what an owner record carries as ``start_time``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2 :].split()[19])


@dataclass(frozen=True)
class Here:
    host: str
    boot_id: str
    pid_ns: int


def here() -> Here:
    """This host, kernel boot and pid namespace, read where the lock reads them."""
    return Here(
        socket.gethostname(),
        Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        os.stat("/proc/self/ns/pid").st_ino,
    )


def move_aside(path: Path) -> str:
    """A breaker's (or a releaser's) one-step removal: rename to a unique name beside it."""
    aside = f"{path}.{secrets.token_hex(6)}.broken"
    os.rename(path, aside)
    return aside


@pytest.fixture
def other() -> Iterator[Process]:
    """Another live process on this host (the other holder, breaker or creator)."""
    child = subprocess.Popen(["sleep", "120"])
    try:
        yield Process(child.pid, start_time_of(child.pid))
    finally:
        child.kill()
        child.wait()


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def record_of(
    pid: int, start_time: int | None, *, expires_in: float = 30.0, **changes: Any
) -> LockOwner:
    """An owner record as another process would have written it."""
    now, me = time.time(), here()
    owner = LockOwner(
        token=secrets.token_hex(16),
        pid=pid,
        host=me.host,
        boot_id=me.boot_id,
        start_time=start_time,
        pid_ns=me.pid_ns,
        acquired_at=now,
        expires_at=now + expires_in,
        lease=30.0,
    )
    return dataclasses.replace(owner, **changes)


def plant(lock_dir: Path, owner: LockOwner) -> None:
    """A lock instance as its creator leaves it: the directory, then its record."""
    lock_dir.mkdir()
    (lock_dir / "owner.json").write_bytes(owner.to_json())


def another_boot() -> str:
    mine = here().boot_id
    return mine[:-1] + ("1" if mine.endswith("0") else "0")


def claim_tag(proc: Process) -> str:
    """A claim as ``proc`` makes it: a symbolic link whose target names its maker."""
    me = here()
    return json.dumps([me.host, me.boot_id, proc.pid, proc.start_time, me.pid_ns])


def is_lock_path(lock_dir: Path) -> Callable[[tuple[Any, ...], dict[str, Any]], bool]:
    return lambda args, kwargs: bool(args) and os.fspath(args[0]) == str(lock_dir)


def is_record_create(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return args[0] == "owner.json" and kwargs.get("dir_fd") is not None


def asides(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith((".broken", ".released"))]


def token_at(lock_dir: Path) -> str:
    return str(json.loads((lock_dir / "owner.json").read_bytes())["token"])


# --------------------------------------------------------------- the breaker


@pytest.mark.parametrize("via", ["break_lock", "acquire"])
def test_breaker_re_inspects_after_taking_its_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: Process, via: str
) -> None:
    """Break, step B2 of ``spec/lock.pml`` (``L == insp[me] && irec[L] == r && STALE(L)``).

    A breaker that inspected a lock whose lease had run out must look again
    after it has taken the claim, and back off when the holder's heartbeat has
    renewed the lease meanwhile (``release.break_stale``: ``now = observe(path, key)``).
    Without the re-inspection it moves a live holder's lock away.
    """
    lock_dir = tmp_path / "x.lock"
    expired = record_of(other.pid, other.start_time, expires_in=-1.0)
    plant(lock_dir, expired)
    renewed = dataclasses.replace(expired, expires_at=time.time() + 30)

    def heartbeat_of_the_holder() -> None:
        # The holder wakes up and renews: it writes first, then looks, and sees no
        # claim yet (the breaker's is the next system call), so it trusts its lease.
        (lock_dir / "owner.json.tmp").write_bytes(renewed.to_json())
        os.replace(lock_dir / "owner.json.tmp", lock_dir / "owner.json")

    script = Script().at("symlink", before=heartbeat_of_the_holder)
    script.install(monkeypatch)
    lock = DirectoryLock(lock_dir)
    with script.active():
        if via == "break_lock":
            with pytest.raises(LockError, match="changed while breaking") as info:
                lock.break_lock()
            assert info.value.errno == errno.EAGAIN
        else:
            with pytest.raises(LockTimeout) as timeout:
                lock.acquire(timeout=LEASE)
            assert timeout.value.alive is True
    assert script.done, script.calls
    # The holder's lock is where it was, with its renewed lease and no claim left in it.
    assert sorted(os.listdir(lock_dir)) == ["owner.json"]
    assert LockOwner.from_json((lock_dir / "owner.json").read_bytes()) == renewed
    assert asides(tmp_path) == []


# --------------------------------------------------------------- the creator


def _creator_meets_a_breaker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: Process, *, window: str
) -> None:
    """A creator stalled past the creation grace between ``mkdir`` and its record;
    a breaker judged the record-less directory stale, claimed it and looked again
    (still no record) before the record was written, then moves it away.

    ``window``: "claim-seen" moves it after the creator's first look at its claims
    and deletes it later; "between-looks" moves and deletes it (claim included, as
    ``break_stale`` does) right after the creator's first ``lstat`` of the lock path.
    """
    lock_dir = tmp_path / "x.lock"
    breaker_fd: list[int] = []
    moved: list[str] = []
    successor = record_of(other.pid, other.start_time)

    def breaker_claims() -> None:
        # The breaker took its claim through its own descriptor of the directory,
        # and its re-inspection found no record yet: it goes ahead.
        fd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY)
        breaker_fd.append(fd)
        os.symlink(claim_tag(other), "claim", dir_fd=fd)

    def breaker_moves_it_and_takes_the_lock() -> None:
        moved.append(move_aside(lock_dir))
        plant(lock_dir, successor)
        if window == "between-looks":
            shutil.rmtree(moved.pop())

    script = Script().at("open", is_record_create, before=breaker_claims)
    if window == "claim-seen":
        script.at("listdir", after=breaker_moves_it_and_takes_the_lock)
    else:
        # The creator's look at the lock path (``settle`` uses lstat: a link planted
        # at the path must not pass for its target).
        script.at("lstat", is_lock_path(lock_dir), after=breaker_moves_it_and_takes_the_lock)
    script.install(monkeypatch)
    lock = DirectoryLock(lock_dir)
    try:
        with script.active(), pytest.raises(LockTimeout) as info:
            lock.acquire(timeout=LEASE)
    finally:
        for fd in breaker_fd:
            os.close(fd)
        for aside in moved:
            shutil.rmtree(aside)
        if lock.is_held:
            lock.release()
    assert script.done, script.calls
    assert info.value.holder is not None and info.value.holder["pid"] == other.pid
    assert token_at(lock_dir) == successor.token


def test_creator_settles_after_publishing_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: Process
) -> None:
    """Acquire, the step after writing ``owner.json`` in ``spec/lock.pml``
    (``L == own[me] && !CLAIMED(own[me])``; counterexample ``ACQ_INODE_ONLY``,
    ``spec/README.md`` finding 1).

    The creator finds the breaker's claim in its directory after writing its
    record. It must wait for the claim to be decided (``create.publish``:
    ``settle(...)``) and, when its directory is moved away, try again
    rather than believe it holds: the breaker holds the lock now.
    """
    _creator_meets_a_breaker(tmp_path, monkeypatch, other, window="claim-seen")


def test_creator_settle_sees_a_breaker_that_finishes_between_its_two_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: Process
) -> None:
    """Acquire, the same step (``L == own[me] && !CLAIMED(own[me])``, one atomic
    step in ``spec/lock.pml``), where the code takes it in two system calls.

    ``settle`` looks at the lock path (still ours), then at the claims in its
    directory. A breaker that renames the directory aside and deletes it, claim
    and all, between those two looks leaves no trace for the second one: the
    creator holds a lock that is no longer at the path, and so does the breaker.
    Looking at the claims first and the path second closes the window: a claim
    gone means the breaker backed off (then the path is ours) or finished (then
    it is not).
    """
    _creator_meets_a_breaker(tmp_path, monkeypatch, other, window="between-looks")


def test_owner_record_is_created_exclusively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: Process
) -> None:
    """Acquire, writing ``owner.json`` "through the directory fd: into OUR
    instance" (``spec/lock.pml``, the step after A1; ``own[p]`` in
    ``spec/README.md``: the model's creator always writes into the directory it made).

    The code opens the directory it made by path, then writes its record with
    ``O_EXCL`` (``create.publish``). When the directory was replaced in between (the
    creator stalled past the grace, was broken, and the breaker took the lock),
    the descriptor is the new holder's directory and ``O_EXCL`` is what says
    so; without it the creator overwrites the new holder's record and both hold.
    """
    lock_dir = tmp_path / "x.lock"
    successor = record_of(other.pid, other.start_time)

    def broken_and_taken_by_another() -> None:
        aside = move_aside(lock_dir)  # empty: judged stale, broken
        shutil.rmtree(aside)
        plant(lock_dir, successor)

    script = Script().at("mkdir", is_lock_path(lock_dir), after=broken_and_taken_by_another)
    script.install(monkeypatch)
    lock = DirectoryLock(lock_dir)
    with script.active(), pytest.raises(LockTimeout) as info:
        lock.acquire(timeout=LEASE)
    assert script.done, script.calls
    assert not lock.is_held
    assert info.value.alive is True
    assert (lock_dir / "owner.json").read_bytes() == successor.to_json()
    assert sorted(os.listdir(lock_dir)) == ["owner.json"]


# ------------------------------------------------------------ lease and verify


def _wait_until_expired(lock: DirectoryLock) -> None:
    owner = lock.owner()
    assert owner is not None
    time.sleep(max(0.0, owner.expires_at - time.time()) + 0.02)


def test_verify_refuses_once_the_lease_has_run_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-commit check: ``PRECHECK_OK`` in ``spec/lock.pml`` requires
    ``mylease[me]`` (property 5, ``stale_commit``).

    A holder whose heartbeat stopped (the process was suspended) has lost its
    lease even when nobody has broken its lock yet: its token is still at the
    lock path, with no claim in it. Only the expiry tells, and ``verify()``
    must refuse (``now >= held.owner.expires_at``): a breaker may act at any moment.
    """
    stall = HeartbeatStall()
    stall.install(monkeypatch)
    lock = DirectoryLock(tmp_path / "x.lock", lease=LEASE)
    lock.acquire()
    try:
        lock.verify()  # a positive control: live and ours
        stall.stop()
        _wait_until_expired(lock)
        assert stall.stopped.wait(5)  # the heartbeat is stuck in its refresh
        owner = lock.owner()
        assert owner is not None and owner.expires_at < time.time()
        assert sorted(os.listdir(tmp_path / "x.lock")) == ["owner.json"]  # not broken
        with pytest.raises(LockCompromisedError, match="lease ran out"):
            lock.verify()
    finally:
        stall.resume()
        lock.release()


def test_heartbeat_believes_a_new_expiry_only_after_settling(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    other: Process,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Heartbeat, "then check that it is still ours before trusting the new
    expiry" in ``spec/lock.pml`` (``L == own[me] && CLAIMED(own[me]) -> skip``;
    counterexample ``HB_CHECK_BEFORE_WRITE``, ``spec/README.md`` finding 1).

    The holder's heartbeat stalls past the lease; a breaker inspects (expired),
    claims, and re-inspects (still expired) before the heartbeat's write lands.
    The heartbeat writes, sees the claim, and keeps its old expiry
    (``lease._refresh_locked``: the ``settle`` after ``write_owner``), so the holder
    still knows its lease ran out; once the breaker has moved the lock away the
    heartbeat finds the lock lost. A heartbeat that believes what it wrote holds
    a lease on a lock that another process takes.
    """
    lock_dir = tmp_path / "x.lock"
    stall = HeartbeatStall()
    stall.install(monkeypatch)
    lock = DirectoryLock(lock_dir, lease=LEASE)
    lock.acquire()
    breaker_fd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY)
    aside: str | None = None
    try:
        stall.stop()
        _wait_until_expired(lock)
        seen = lock.owner()
        assert seen is not None and seen.expires_at < time.time()  # the breaker's inspection
        os.symlink(claim_tag(other), "claim", dir_fd=breaker_fd)  # its claim
        again = lock.owner()
        assert again == seen and again.expires_at < time.time()  # its re-inspection
        with caplog.at_level(logging.WARNING, logger="statestore"):
            stall.resume()  # the heartbeat's write lands now, with the claim in place
            deadline = time.monotonic() + 5
            while (now := lock.owner()) is None or now.expires_at == seen.expires_at:
                assert time.monotonic() < deadline, "the heartbeat never wrote"
                time.sleep(0.001)
            # Written, not believed: the lease we hold is still the one that ran out.
            with pytest.raises(LockCompromisedError, match="lease ran out"):
                lock.verify()
            aside = move_aside(lock_dir)  # the breaker decides: it moves the lock away
            plant(lock_dir, record_of(other.pid, other.start_time))  # and takes the lock
            deadline = time.monotonic() + 2
            while not any(
                r.threadName == "statestore-heartbeat" and str(lock_dir) in r.getMessage()
                for r in caplog.records
            ):
                assert time.monotonic() < deadline, "the heartbeat never found the lock lost"
                time.sleep(0.001)
        with pytest.raises(LockCompromisedError, match="broken by another process"):
            lock.verify()
    finally:
        stall.resume()
        os.close(breaker_fd)
        lock.release()
        if aside is not None:
            shutil.rmtree(aside)


# -------------------------------------------------------------------- release


def test_release_without_a_claim_checks_its_token_first(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    other: Process,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Release while the lease runs, step F1 of ``spec/lock.pml`` ("F1: not
    ours: lost", property 6, ``release_moved_other``).

    The release that takes no claim (``release._release_fast``) reads its token at the
    lock path before it renames the path aside. Here the holder's lock was
    broken with ``force`` and another process holds the lock now: the release
    must leave that lock alone (``_lost(path, held)``).
    """
    lock_dir = tmp_path / "x.lock"
    lock = DirectoryLock(lock_dir, lease=30.0)  # a long lease: the release takes no claim
    successor = record_of(other.pid, other.start_time)
    lock.acquire()
    try:
        DirectoryLock(lock_dir).break_lock(force=True)  # an operator breaks it
        plant(lock_dir, successor)  # and the next process takes the lock
    finally:
        with caplog.at_level(logging.WARNING, logger="statestore"):
            lock.release()
    assert (lock_dir / "owner.json").read_bytes() == successor.to_json()
    assert asides(tmp_path) == []
    assert any("lost before release" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------- liveness


def _judged(lock_dir: Path) -> tuple[str, bool | None]:
    """Whether a waiter breaks the planted lock at once ("broken"), or waits ("waits")."""
    try:
        with DirectoryLock(lock_dir, timeout=LEASE):
            return "broken", None
    except LockTimeout as e:
        return "waits", e.alive


def test_dead_at_once_needs_our_boot_and_our_pid_namespace(tmp_path: Path) -> None:
    """Stale by a dead holder: ``STALE(k)`` in ``spec/lock.pml`` is ``dead[ipid[k]]``
    for a recorded lock; only this kernel's boot id and pid namespace make the
    pid in a record name a process here (``liveness.process_alive``).

    Positive control for the two tests below: a record with our boot id, our
    pid namespace and a pid that has exited is dead at once.
    """
    lock_dir = tmp_path / "x.lock"
    plant(lock_dir, record_of(dead_pid(), 1))
    assert _judged(lock_dir) == ("broken", None)


def test_another_pid_namespace_is_not_judged_by_its_pid(tmp_path: Path) -> None:
    """``dead[ipid[k]]`` of ``STALE(k)`` (``spec/lock.pml``), for a holder in
    another pid namespace: its pid means nothing here, so it is not dead while
    its lease runs (``process_alive``: the ``pid_ns`` comparison), however its
    pid looks in our namespace.
    """
    lock_dir = tmp_path / "x.lock"
    plant(lock_dir, record_of(dead_pid(), 1, pid_ns=here().pid_ns + 7919))
    assert _judged(lock_dir) == ("waits", None)
    assert (tmp_path / "x.lock" / "owner.json").exists()


def test_another_boot_is_not_judged_alive_by_its_pid(tmp_path: Path, other: Process) -> None:
    """``dead[ipid[k]]`` of ``STALE(k)`` (``spec/lock.pml``), for a record of
    another boot: a pid of an earlier boot names nobody now, even when a live
    process has that pid and that start time (``process_alive``: the
    ``boot_id`` comparison). Holds under both rules of the code's history:
    another boot is dead at once (831d08f), or unknown until its lease runs out.
    """
    lock_dir = tmp_path / "x.lock"
    plant(lock_dir, record_of(other.pid, other.start_time))
    assert _judged(lock_dir) == ("waits", True)  # control: the same record, our boot
    shutil.rmtree(str(lock_dir))
    plant(lock_dir, record_of(other.pid, other.start_time, boot_id=another_boot()))
    assert _judged(lock_dir) in (("broken", None), ("waits", None))


def test_a_forked_child_records_its_own_identity(tmp_path: Path) -> None:
    """``dead[ipid[k]]`` of ``STALE(k)`` (``spec/lock.pml``) needs ``ipid[k]`` to
    be the process that made ``k``: a child forked after its parent looked up its
    identity records its own pid and start time (``liveness.identity`` is
    recomputed after a fork). Otherwise a lock left by a dead child names its
    live parent and blocks everyone until the lease runs out.
    """
    with DirectoryLock(tmp_path / "parent.lock"):
        pass  # the parent knows who it is now
    lock_dir = tmp_path / "x.lock"
    pid = os.fork()
    if pid == 0:  # the child takes the lock and dies holding it
        try:
            DirectoryLock(lock_dir).acquire(timeout=5)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lock_dir.is_dir()
    broken = DirectoryLock(lock_dir).break_lock()  # a dead holder: no force needed
    assert broken is not None and broken.pid == pid
    assert not lock_dir.exists()


def test_another_boot_is_not_dead_while_its_lease_runs(tmp_path: Path) -> None:
    """``dead[ipid[k]]`` of ``STALE(k)`` (``spec/lock.pml``), for a record of
    another boot id: host names collide (cloned images, containers), so a record
    from another kernel is not judged by its pid at all; its lease decides. A
    check that ignores the boot id finds its pid gone here and breaks it at once.
    """
    lock_dir = tmp_path / "x.lock"
    plant(lock_dir, record_of(dead_pid(), 1, boot_id=another_boot()))
    assert _judged(lock_dir) == ("waits", None)


# ---------------------------------------------------------- the store's pause


def test_collector_is_on_again_after_every_store_call(tmp_path: Path) -> None:
    """Not a step of the lock model (``spec/README.md``: what the model does not
    cover); the store's pause of the cyclic collector while pydantic works
    (``_store._collector_paused``) ends with the collector as it was.

    After each call, failed ones included, from several threads at once, the
    collector runs again; a program that turned it off keeps it off.
    """
    assert gc.isenabled()
    store = StateStore(Counter, tmp_path / "s.json", default=Counter)
    try:
        store.save(Counter(count=1))
        assert gc.isenabled(), "save"
        assert store.load().count == 1
        assert gc.isenabled(), "load"
        store.update(lambda s: Counter(count=s.count + 1))
        assert gc.isenabled(), "update"
        (tmp_path / "s.json").write_text('{"schema_version": 1, "count": "many"}')
        with pytest.raises(StateValidationError):
            store.load()
        assert gc.isenabled(), "a load that failed"
        (tmp_path / "s.json").unlink()

        errors: list[BaseException] = []

        def bump() -> None:
            try:
                for _ in range(20):
                    store.update(lambda s: Counter(count=s.count + 1))
            except BaseException as e:  # re-raised below
                errors.append(e)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store.load().count == 80
        assert gc.isenabled(), "updates from four threads"

        gc.disable()
        store.load()
        assert not gc.isenabled(), "the program's own choice was undone"
    finally:
        gc.enable()
