"""StateFolder through its public API: group transactions, lock discovery, snapshots, tools.

The file-level protocol (journal, recovery, faults at every call, power loss)
is held by tests/test_folder_journal*.py; these hold what a program and a
person see: a transfer between two documents keeps their sum for every
reader and after kill -9, a plain store and the command line find the
folder's lock, migrations and the newer-file guard inside a group, nesting,
and what is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from statestore import (
    LockError,
    LockTimeout,
    NestedTransactionError,
    SchemaVersionError,
    StateFolder,
    StateStore,
    StateStoreError,
)
from statestore._cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


class Account(BaseModel):
    balance: int = 100
    moves: int = 0


def transfer(folder: StateFolder, a: StateStore[Account], b: StateStore[Account], n: int) -> None:
    with folder.transaction() as tx:
        tx[a].balance -= n
        tx[a].moves += 1
        tx[b].balance += n
        tx[b].moves += 1


def _accounts(path: Path) -> tuple[StateFolder, StateStore[Account], StateStore[Account]]:
    folder = StateFolder(path)
    return (
        folder,
        folder.store(Account, "a.json", default=Account),
        folder.store(Account, "b.json", default=Account),
    )


def test_a_group_commits_together_and_a_raising_block_writes_nothing(tmp_path: Path) -> None:
    folder, a, b = _accounts(tmp_path / "bank")
    transfer(folder, a, b, 30)
    assert (a.load().balance, b.load().balance) == (70, 130)
    before = {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir() if p.is_file()}
    with pytest.raises(RuntimeError), folder.transaction() as tx:
        tx[a].balance -= 1000
        tx[b].balance += 1000
        raise RuntimeError("changed my mind")
    after = {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir() if p.is_file()}
    assert after == before
    # A group that changes nothing writes nothing, not even the journal.
    with folder.transaction() as tx:
        tx[a].balance += 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir() if p.is_file()} == after
    snap = folder.read(a, b)
    assert snap[a].balance + snap[b].balance == 200


def test_the_folder_is_declared_on_disk_and_plain_stores_take_its_lock(tmp_path: Path) -> None:
    folder, a, _ = _accounts(tmp_path / "bank")
    marker = json.loads((tmp_path / "bank" / ".statestore-folder.json").read_text())
    assert marker["lock"] == ".statestore.lock"
    plain = StateStore(Account, tmp_path / "bank" / "a.json", default=Account, timeout=0.2)
    assert plain.lock is not None and plain.lock.path == folder.lock.path
    with folder.lock.acquire(), pytest.raises(LockTimeout):
        # Another thread holds the folder's lock: the plain store waits for it.
        import threading

        errors: list[BaseException] = []

        def other() -> None:
            try:
                plain.update(lambda s: None)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        raise errors[0]
    plain.update(lambda s: s.model_copy(update={"balance": 1}))
    assert a.load().balance == 1


def test_a_folder_declared_after_a_store_was_built_is_honoured_from_its_next_call(
    tmp_path: Path,
) -> None:
    path = tmp_path / "late" / "a.json"
    early = StateStore(Account, path, default=Account, timeout=0.2)
    early.save(Account())
    folder = StateFolder(tmp_path / "late")
    with folder.lock.acquire():
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _script(f"""
                from statestore import StateStore, LockTimeout
                from test_folder import Account
                s = StateStore(Account, {str(path)!r}, default=Account, timeout=0.3)
                try:
                    s.update(lambda st: None)
                except LockTimeout:
                    print("waited")
            """),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT / "tests",
            env=_env(),
            check=True,
        )
        assert out.stdout.strip() == "waited"


def test_a_store_given_another_lock_in_a_declared_folder_is_refused(tmp_path: Path) -> None:
    StateFolder(tmp_path / "f")
    with pytest.raises(LockError, match="state folder"):
        StateStore(Account, tmp_path / "f" / "a.json", default=Account, lock=tmp_path / "x.lock")
    # Given the folder's own lock, it is fine.
    lock = tmp_path / "f" / ".statestore.lock"
    same = StateStore(Account, tmp_path / "f" / "a.json", default=Account, lock=lock)
    same.save(Account(balance=1))
    assert same.load().balance == 1


def test_nesting_inside_a_folder_transaction_is_refused(tmp_path: Path) -> None:
    folder, a, b = _accounts(tmp_path / "bank")
    plain = StateStore(Account, tmp_path / "bank" / "b.json", default=Account)
    with pytest.raises(NestedTransactionError), folder.transaction() as tx:
        tx[a].balance = 0
        plain.update(lambda s: None)
    with pytest.raises(NestedTransactionError), folder.transaction() as tx:
        b.save(Account(balance=5))
    assert not (tmp_path / "bank" / "a.json").exists()
    assert not (tmp_path / "bank" / "b.json").exists()


def test_a_store_of_another_folder_is_refused(tmp_path: Path) -> None:
    folder, _, _ = _accounts(tmp_path / "one")
    other = StateFolder(tmp_path / "two").store(Account, "a.json", default=Account)
    loose = StateStore(Account, tmp_path / "c.json", default=Account)
    with folder.transaction() as tx:
        for store in (other, loose):
            with pytest.raises(StateStoreError, match="not a document of the state folder"):
                tx[store]
    with pytest.raises(ValueError):
        folder.store(Account, "sub/a.json")


class V1(BaseModel):
    total: int = 0


class V2(BaseModel):
    cents: int = 0


def test_migrations_run_inside_the_group_and_the_newer_file_guard_holds(tmp_path: Path) -> None:
    folder = StateFolder(tmp_path / "f")
    old = folder.store(V1, "money.json", default=V1)
    old.save(V1(total=3))
    new = folder.store(
        V2, "money.json", version=2, migrations={1: lambda d: {"cents": d["total"] * 100}}
    )
    other = folder.store(Account, "a.json", default=Account)
    with folder.transaction() as tx:
        tx[new].cents += 1
        tx[other].balance = 7
    doc = json.loads((tmp_path / "f" / "money.json").read_text())
    assert doc["schema_version"] == 2 and doc["cents"] == 301
    assert json.loads((tmp_path / "f" / "money.json.v1.bak").read_text())["total"] == 3
    # A newer file than the store knows: the whole group is refused, nothing written.
    (tmp_path / "f" / "money.json").write_text('{"schema_version": 9, "cents": 1}\n')
    before = (tmp_path / "f" / "a.json").read_bytes()
    with pytest.raises(SchemaVersionError), folder.transaction() as tx:
        tx[other].balance = 0
        tx[new].cents = 0
    assert (tmp_path / "f" / "a.json").read_bytes() == before


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    )
    return env


def _script(body: str) -> str:
    return textwrap.dedent(body)


WRITER = """
import random, sys
from statestore import StateFolder
from test_folder import Account, transfer
folder = StateFolder(sys.argv[1])
a = folder.store(Account, "a.json", default=Account)
b = folder.store(Account, "b.json", default=Account)
print("ready", flush=True)
while True:
    n = random.randint(-5, 5)
    transfer(folder, a, b, n) if random.random() < 0.5 else transfer(folder, b, a, n)
"""

READER = """
import sys, time
from statestore import StateFolder
from test_folder import Account
folder = StateFolder(sys.argv[1])
a = folder.store(Account, "a.json", default=Account)
b = folder.store(Account, "b.json", default=Account)
seen = bad = 0
end = time.monotonic() + float(sys.argv[2])
moves = set()
while time.monotonic() < end:
    snap = folder.read(a, b)
    seen += 1
    if snap[a].balance + snap[b].balance != 200 or snap[a].moves != snap[b].moves:
        bad += 1
    moves.add(snap[a].moves)
print(seen, bad, len(moves))
"""


def test_lock_free_snapshots_in_other_processes_keep_the_sum(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    folder, a, b = _accounts(path)
    transfer(folder, a, b, 0)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=ROOT / "tests",
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        readers = [
            subprocess.run(
                [sys.executable, "-c", READER, str(path), "1.5"],
                cwd=ROOT / "tests",
                env=_env(),
                capture_output=True,
                text=True,
                check=True,
            )
            for _ in range(2)
        ]
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()
    for r in readers:
        seen, bad, distinct = map(int, r.stdout.split())
        assert bad == 0, f"{bad} of {seen} snapshots broke the invariant"
        assert distinct > 3, "the writer did not move while the reader read"


def test_kill_9_during_group_commits_leaves_every_group_whole(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    folder, a, b = _accounts(path)
    transfer(folder, a, b, 0)
    last_moves = 0
    for round_ in range(12):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            cwd=ROOT / "tests",
            env=_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.02 * round_)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        # A lock-free reader and the next holder both see a whole group.
        snap = folder.read(a, b)
        assert snap[a].balance + snap[b].balance == 200
        assert snap[a].moves == snap[b].moves
        with folder.transaction() as tx:
            assert tx[a].balance + tx[b].balance == 200
            assert tx[a].moves == tx[b].moves >= last_moves
            last_moves = tx[a].moves
        # The dead holder's lock is broken by the next process (its pid is gone).
    assert last_moves > 0
    leftovers = [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers


def test_the_cli_and_doctor_use_the_folders_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, a, _ = _accounts(tmp_path / "bank")
    a.save(Account())
    doc = str(tmp_path / "bank" / "a.json")
    assert cli(["lock", "status", doc]) == 0
    assert "free" in capsys.readouterr().out
    with folder.lock.acquire():
        assert cli(["lock", "status", doc]) == 0
        out = capsys.readouterr().out
        assert ".statestore.lock" in out and "held" in out
        assert cli(["lock", "status", str(tmp_path / "bank")]) == 0
        assert "held" in capsys.readouterr().out
    assert cli(["doctor", str(tmp_path / "bank")]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_doctor_reports_and_completes_an_unfinished_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unfinished group made the real way: a writer killed right after the commit point."""
    path = tmp_path / "bank"
    folder, a, b = _accounts(path)
    transfer(folder, a, b, 0)
    code = _script(f"""
        import os, signal
        import statestore._folder_journal as fj
        real = os.replace
        def rename(src, dst, *args, **kw):
            real(src, dst, *args, **kw)
            if str(dst).endswith(fj.JOURNAL) and b'"pending"' in open(dst, "rb").read():
                os.kill(os.getpid(), signal.SIGKILL)  # dead right after the commit point
        os.replace = os.rename = rename
        from statestore import StateFolder
        from test_folder import Account, transfer
        folder = StateFolder({str(path)!r})
        transfer(folder, folder.store(Account, "a.json"), folder.store(Account, "b.json"), 25)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=_env())
    assert run.returncode == -signal.SIGKILL
    assert (a.load().balance, b.load().balance) == (100, 100)  # not renamed yet
    assert cli(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert "unfinished group" in out and "--fix" in out
    assert cli(["doctor", str(path), "--fix"]) == 0
    assert "completed group" in capsys.readouterr().out
    assert (a.load().balance, b.load().balance) == (75, 125)
    assert cli(["doctor", str(path)]) == 0


def test_a_dead_holders_unfinished_group_is_completed_before_a_plain_store_reads(
    tmp_path: Path,
) -> None:
    """Without that, a store's update would start from the group's old document and undo it."""
    path = tmp_path / "bank"
    folder, a, b = _accounts(path)
    transfer(folder, a, b, 0)
    code = _script(f"""
        import os, signal
        import statestore._folder_journal as fj
        real = os.replace
        def rename(src, dst, *args, **kw):
            real(src, dst, *args, **kw)
            if str(dst).endswith(fj.JOURNAL) and b'"pending"' in open(dst, "rb").read():
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = os.rename = rename
        from statestore import StateFolder
        from test_folder import Account, transfer
        folder = StateFolder({str(path)!r})
        transfer(folder, folder.store(Account, "a.json"), folder.store(Account, "b.json"), 40)
    """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=_env())
    plain = StateStore(Account, path / "a.json")
    plain.update(lambda s: s.model_copy(update={"moves": s.moves + 100}))
    assert a.load().balance + b.load().balance == 200
    assert a.load().balance == 60


def test_the_async_folder_commits_a_group_and_refuses_nesting(tmp_path: Path) -> None:
    import asyncio

    from statestore import AsyncStateFolder

    folder = AsyncStateFolder(tmp_path / "bank")
    a = folder.store(Account, "a.json", default=Account)
    b = folder.store(Account, "b.json", default=Account)

    async def move(n: int) -> None:
        async with folder.transaction() as tx:
            (await tx.load(a)).balance -= n
            (await tx.load(b)).balance += n
            await asyncio.sleep(0)
            tx[a].moves += 1
            tx[b].moves += 1

    async def main() -> None:
        await asyncio.gather(*(move(n) for n in range(10)))
        snap = await folder.read(a, b)
        assert (snap[a].balance, snap[b].balance, snap[a].moves) == (55, 145, 10)
        with pytest.raises(NestedTransactionError):
            async with folder.transaction() as tx:
                await tx.load(a)
                await a.update(lambda s: None)
        with pytest.raises(NestedTransactionError):
            async with folder.transaction(), folder.transaction():
                pass
        entered = asyncio.Event()

        async def stuck() -> None:
            async with folder.transaction() as tx:
                (await tx.load(a)).balance = -1
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(stuck())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert (a.sync.load().balance, b.sync.load().balance) == (55, 145)
    with folder.sync.lock.acquire(timeout=0):
        pass


def test_show_and_validate_take_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(f"""
            from statestore import StateFolder
            from test_folder import Account
            folder = StateFolder({str(tmp_path / "bank")!r})
            a = folder.store(Account, "a.json", default=Account)
            b = folder.store(Account, "b.json")
        """)
    )
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    assert cli(["validate", f"{app}:folder"]) == 1  # b.json: no file and no default
    out = capsys.readouterr().out
    assert "a.json: no such file yet" in out and "b.json: no such file, and" in out
    folder, a, b = _accounts(tmp_path / "bank")
    transfer(folder, a, b, 5)
    assert cli(["validate", f"{app}:folder"]) == 0
    assert capsys.readouterr().out.count(": ok") == 2
    assert cli(["show", f"{app}:folder"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"a.json": {"balance": 95, "moves": 1}, "b.json": {"balance": 105, "moves": 1}}
    (tmp_path / "bank" / "b.json").write_text('{"balance": "lots"}')
    assert cli(["validate", f"{app}:folder"]) == 1
    assert "b.json:1:2: balance:" in capsys.readouterr().out


SINGLE_WRITER = """
import sys
from statestore import StateFolder
from test_folder import Account
folder = StateFolder(sys.argv[1])
a = folder.store(Account, "a.json", default=Account)
b = folder.store(Account, "b.json", default=Account)
print("ready", flush=True)
import time
while True:  # single-document saves, a then b: moves(a) - moves(b) is 0 or 1 between commits
    a.update(lambda s: s.model_copy(update={"moves": s.moves + 1}))
    b.update(lambda s: s.model_copy(update={"moves": s.moves + 1}))
    time.sleep(0.002)  # paced, so that readers on a loaded machine still get snapshots
"""

SINGLE_READER = """
import sys, time
from statestore import StateFolder
from test_folder import Account
import statestore._folder_journal as fj
folder = StateFolder(sys.argv[1])
a = folder.store(Account, "a.json", default=Account)
b = folder.store(Account, "b.json", default=Account)
real = fj.read_bytes
def slow(path, *args, **kwargs):
    data = real(path, *args, **kwargs)
    time.sleep(0.0005)  # widen the window between the two documents
    return data
fj.read_bytes = slow
seen = bad = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    snap = folder.read(b, a) if seen % 2 else folder.read(a, b)
    seen += 1
    if snap[a].moves - snap[b].moves not in (0, 1):
        bad += 1
print(seen, bad)
"""


def test_snapshots_are_consistent_across_single_document_saves(tmp_path: Path) -> None:
    """Each store's own save in a declared folder is ordered with the others for readers."""
    path = tmp_path / "bank"
    _accounts(path)
    writer = subprocess.Popen(
        [sys.executable, "-c", SINGLE_WRITER, str(path)],
        cwd=ROOT / "tests",
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        r = subprocess.run(
            [sys.executable, "-c", SINGLE_READER, str(path), "1.5"],
            cwd=ROOT / "tests",
            env=_env(),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()
    seen, bad = map(int, r.stdout.split())
    assert seen >= 3 and bad == 0, f"{bad} of {seen} snapshots mixed two moments"
