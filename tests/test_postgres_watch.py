# ruff: noqa: F811 - the fixtures of tests/test_postgres.py are parameters here
"""Watching a document kept in PostgreSQL: LISTEN/NOTIFY and the slow poll.

Against the real server (``STATESTORE_PG_DSN``; see tests/test_postgres.py).
The rules tested (``docs/watching.md``, ``PostgresWatcher``): every commit
through statestore notifies its table's channel in its own transaction; a
watcher in another process sees every revision of a slow writer and the
newest of a fast one; a change made in psql (no notification) is seen by the
poll; a notification of another document of the table wakes nobody; a row
that does not validate is an error event; idle watching uses no CPU; the
async watcher never blocks the loop; a lost connection is reconnected, or
reported as a typed error, never waited on silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Counter
from psycopg import sql
from test_postgres import DSN, admin, put, table, terminate  # noqa: F401 - fixtures

from statestore import (
    AsyncStateStore,
    StateCorruptError,
    StateReadError,
    StateStore,
    StateValidationError,
)
from statestore.backends.postgres import (
    PostgresFolder,
    PostgresStorage,
    PostgresWatcher,
    channel_of,
    notify_payload,
)

pytestmark = pytest.mark.timeout(90)

TESTS = Path(__file__).parent
#: A poll so slow that within a test only a notification can wake a watcher.
NO_POLL = 600.0


def bump(state: Counter) -> None:
    state.count += 1


def store_of(
    table: str, key: str = "jobs", poll: float = NO_POLL, **kw: Any
) -> StateStore[Counter]:
    return StateStore(
        Counter, PostgresStorage(DSN, key=key, table=table, watch_poll=poll, **kw), default=Counter
    )


class Watcher:
    """A watching process (tests/pg_watch_workers.py) and the lines it printed."""

    def __init__(self, table: str, stop: int, poll: float = NO_POLL, key: str = "jobs") -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "pg_watch_workers.py"),
                DSN,
                table,
                key,
                str(poll),
                str(stop),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.line() == "ready"

    def line(self, timeout: float = 30) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        assert box, f"the watcher printed nothing in {timeout} s (lines so far: {self.lines})"
        text = box[0].strip()
        self.lines.append(text)
        return text

    def counts(self) -> list[int]:
        return [int(x.split()[0]) for x in self.lines if x[:1].isdigit()]

    def finish(self) -> None:
        assert self.proc.wait(30) == 0
        rest = self.proc.stdout.read()  # type: ignore[union-attr]
        self.lines += [x for x in rest.splitlines() if x]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]


# --------------------------------------------------------------- across processes


def test_a_watcher_in_another_process_sees_every_revision_of_a_slow_writer(table: str) -> None:
    store = store_of(table)
    store.save(Counter(count=0))
    watcher = Watcher(table, stop=6)
    try:
        for n in range(1, 7):
            store.update(bump)
            # Only a notification can wake it (its poll is ten minutes away).
            count, revision = watcher.line().split()
            assert int(count) == n and revision == store.read().revision
        watcher.finish()
    finally:
        watcher.kill()
    assert watcher.counts() == [1, 2, 3, 4, 5, 6]


def test_a_watcher_sees_the_newest_revision_of_a_fast_writer(table: str) -> None:
    store = store_of(table)
    store.save(Counter(count=0))
    watcher = Watcher(table, stop=150)
    try:
        for _ in range(150):
            store.update(bump)
        watcher.finish()
    finally:
        watcher.kill()
    seen = watcher.counts()
    assert seen[-1] == 150, seen
    assert seen == sorted(set(seen)), "a revision handed out twice, or out of order"
    assert "error" not in " ".join(watcher.lines)


def test_a_folder_group_commit_notifies_each_document(
    admin: psycopg.Connection[Any], table: str
) -> None:
    with PostgresFolder(DSN, "plan", table=table) as folder:
        a = folder.store(Counter, "a", default=Counter)
        b = folder.store(Counter, "b", default=Counter)
        with folder.transaction() as tx:
            tx[a].count = 1
        watch_a = store_of(table, key="plan/a").watch(timeout=20)
        watch_b = store_of(table, key="plan/b").watch(timeout=20)
        try:
            with folder.transaction() as tx:
                tx[a].count = 2
                tx[b].count = 7
            assert next(watch_a).state.count == 2
            assert next(watch_b).state.count == 7
        finally:
            watch_a.close()
            watch_b.close()


# --------------------------------------------------------------- what counts


def test_a_hand_update_without_notify_is_seen_by_the_poll(
    admin: psycopg.Connection[Any],
    table: str,
) -> None:
    store = store_of(table, poll=0.2)
    store.save(Counter(count=1))
    with store.watch(timeout=20) as watch:
        # What a person does in psql: a plain UPDATE, no pg_notify.
        admin.execute(
            sql.SQL("UPDATE {} SET document = replace(document, %s, %s) WHERE key = 'jobs'").format(
                sql.Identifier(table)
            ),
            ('"count": 1', '"count": 8'),
        )
        snap = next(watch)
        assert snap.state.count == 8 and snap.written_by is None
        # An UPDATE that writes the same bytes is a new row version, not a new revision.
        admin.execute(
            sql.SQL("UPDATE {} SET updated_at = now() WHERE key = 'jobs'").format(
                sql.Identifier(table)
            )
        )
        store.update(bump)
        assert next(watch).state.count == 9


def test_a_row_written_by_hand_is_seen_without_a_notification_from_its_first_insert(
    admin: psycopg.Connection[Any],
    table: str,
) -> None:
    store = store_of(table, poll=0.2)
    store.save(Counter(count=1), expect="0")
    admin.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
    with store.watch(timeout=20) as watch:
        # Its table exists, the row does not: the default is not handed out as a change
        # of a document nobody wrote, but a row inserted by hand is.
        put(admin, table, '{"count": 5}')
        assert next(watch).state.count == 5
        admin.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
        assert next(watch).revision == "0"


def test_an_invalid_row_is_an_error_event_and_the_watch_goes_on(
    admin: psycopg.Connection[Any],
    table: str,
) -> None:
    store = store_of(table, poll=0.2)
    store.save(Counter(count=1))
    with store.watch(timeout=20) as watch:
        put(admin, table, '{"count": "many"}')
        with pytest.raises(StateValidationError):
            next(watch)
        put(admin, table, '{"count": ')
        with pytest.raises(StateCorruptError):
            next(watch)
    with store.watch(timeout=20) as watch:
        put(admin, table, '{"count": 4}')
        assert next(watch).state.count == 4


def test_a_notification_of_another_document_of_the_table_does_not_wake(table: str) -> None:
    mine = store_of(table, key="jobs")
    other = store_of(table, key="jobs/other")
    mine.save(Counter(count=1))
    other.save(Counter(count=1))
    storage = mine.storage
    assert isinstance(storage, PostgresStorage)
    with storage.watcher() as watcher:
        for _ in range(5):
            other.update(bump)
        assert watcher.wait(0.5) is False  # read off the socket, and ignored
        mine.update(bump)
        assert watcher.wait(10) is True
    with mine.watch(timeout=1.0) as watch:
        other.update(bump)
        assert list(watch) == []


def test_the_channel_is_the_tables_oid_whatever_its_name(admin: psycopg.Connection[Any]) -> None:
    odd = 'odd "name"; DROP TABLE x; -- \u00e9'
    try:
        plain = store_of(odd)
        plain.save(Counter(count=1))
        oid = admin.execute(
            "SELECT to_regclass(%s)::oid::int8", ('"' + odd.replace('"', '""') + '"',)
        ).fetchone()
        assert oid is not None and channel_of(oid[0]) == f"statestore_{oid[0]}"
        # Another spelling of the same table (schema-qualified): one channel.
        qualified = store_of(odd, schema="public")
        with qualified.watch(timeout=20) as watch:
            plain.update(bump)
            assert next(watch).state.count == 2
        # A key too long for a payload is notified by its digest.
        long_key = "k" * 5000
        assert notify_payload(long_key) != long_key and len(notify_payload(long_key)) < 100
        far = store_of(odd, key=long_key)
        with far.watch(timeout=20) as watch:
            far.save(Counter(count=9))
            assert next(watch).state.count == 9
    finally:
        for t in (odd, f"{odd}_backups"):
            admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


def test_a_table_made_after_the_watch_began_is_watched(
    admin: psycopg.Connection[Any], table: str
) -> None:
    store = store_of(table, poll=0.2)
    with store.watch(timeout=20) as watch:
        store.save(Counter(count=1))  # creates the table: found by the poll, then listened on
        assert next(watch).state.count == 1
        admin.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
        assert next(watch).revision == "0"
        # A new table (made by a new storage: this one knows its table was made), a
        # new OID, a new channel.
        store_of(table).save(Counter(count=2))
        assert next(watch).state.count == 2
    # Listened on the new channel: a notified commit is seen without the poll.
    slow = store_of(table)
    with slow.watch(timeout=20) as watch:
        slow.update(bump)
        assert next(watch).state.count == 3


# --------------------------------------------------------------- costs


def test_an_idle_watcher_uses_no_cpu(table: str) -> None:
    store = store_of(table, poll=0.25)  # four looks a second, each a small query
    store.save(Counter(count=1))
    watch = store.watch()
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(next(watch, None)))
    thread.start()
    time.sleep(0.3)
    cpu = time.process_time()
    time.sleep(1.0)
    used = time.process_time() - cpu
    watch.close()
    thread.join(5)
    assert results == [None]
    assert used < 0.05, f"an idle watcher used {used:.3f} s of CPU in 1 s"


def test_on_change_calls_back_for_each_commit_and_each_bad_row(
    admin: psycopg.Connection[Any], table: str
) -> None:
    store = store_of(table, poll=0.2)
    store.save(Counter(count=1))
    seen: list[int] = []
    errors: list[Exception] = []
    done = threading.Event()

    def on(snapshot: Any) -> None:
        seen.append(snapshot.state.count)
        if snapshot.state.count == 4:
            done.set()

    handle = store.on_change(on, on_error=errors.append)
    try:
        store.update(bump)
        deadline = time.monotonic() + 20
        while seen != [2]:
            assert time.monotonic() < deadline, seen
            time.sleep(0.01)
        put(admin, table, '{"count": "x"}')
        while not errors:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        put(admin, table, '{"count": 4}')
        assert done.wait(20)
    finally:
        handle.stop()
    assert seen == [2, 4] and isinstance(errors[0], StateValidationError)
    assert not handle.running


def test_close_from_another_thread_ends_a_blocked_next(table: str) -> None:
    store = store_of(table)
    store.save(Counter(count=1))
    watch = store.watch()
    threading.Timer(0.2, watch.close).start()
    started = time.monotonic()
    assert next(watch, None) is None
    assert time.monotonic() - started < 10 and watch.closed


# --------------------------------------------------------------- async


def test_the_async_watcher_does_not_block_the_loop(table: str) -> None:
    sync = store_of(table)
    sync.save(Counter(count=0))
    store = AsyncStateStore.from_store(sync)

    async def main() -> tuple[list[int], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        seen: list[int] = []
        watch = store.watch(timeout=20)
        before = ticks
        await watch.started()  # connected and listening, off the loop
        assert watch._watch.watcher is not None and ticks >= before
        for _ in range(3):
            await store.update(bump)
        async for snap in watch:
            seen.append(snap.state.count)
            if snap.state.count == 3:
                break
        # Waiting with nothing to see: the loop runs on meanwhile.
        async with store.watch(timeout=0.5) as idle:
            before = ticks
            assert [s async for s in idle] == []
            during = ticks - before
        watch.close()
        stop.set()
        await task
        return seen, during

    seen, during = asyncio.run(main())
    assert seen[-1] == 3 and seen == sorted(set(seen))
    assert during >= 10, f"the loop ran only {during} times while the watch waited 0.5 s"


def test_the_async_watch_starts_off_the_loop_on_a_server_that_does_not_answer() -> None:
    # A server that accepts the connection and never answers: starting the watch
    # waits for it (connect_timeout), on a worker thread, while the loop runs on.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        dead = f"postgresql://u:p@127.0.0.1:{port}/db?connect_timeout=2"
        store = AsyncStateStore.from_store(
            StateStore(Counter, PostgresStorage(dead, key="jobs"), default=Counter)
        )

        async def main() -> tuple[int, BaseException | None]:
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            watch = store.watch(timeout=5)  # returns at once
            error: BaseException | None = None
            try:
                await watch.__anext__()
            except StateReadError as e:
                error = e
            stop.set()
            await task
            return ticks, error

        ticks, error = asyncio.run(main())
        assert isinstance(error, StateReadError) and "connecting" in str(error)
        assert ticks >= 50, f"the loop ran only {ticks} times while the watch connected"
    finally:
        listener.close()


# --------------------------------------------------------------- lost connections


def test_a_terminated_connection_is_reconnected_and_nothing_is_lost(
    admin: psycopg.Connection[Any],
    table: str,
) -> None:
    store = store_of(table)
    store.save(Counter(count=1))
    storage = store.storage
    assert isinstance(storage, PostgresStorage)
    with PostgresWatcher(storage, poll_interval=NO_POLL) as watcher:
        first = watcher.backend_pid
        assert first is not None
        terminate(admin, first)
        store.update(bump)  # committed while the watcher has no connection
        assert watcher.wait(20) is True  # reconnected: told to read again
        assert watcher.backend_pid not in (None, first)
        assert store.load().count == 2
        store.update(bump)
        assert watcher.wait(20) is True  # listening again on the new connection
    with store.watch(timeout=20) as watch:
        pid = watch.watcher.backend_pid  # type: ignore[union-attr]
        terminate(admin, pid)
        store.update(bump)
        assert next(watch).state.count == 4


class _Proxy:
    """A TCP forwarder to the server that the test can cut: a server gone away."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection and refuse new ones (they are closed at once)."""
        self.open = False
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_a_server_gone_for_good_is_a_typed_error_never_a_silent_wait(table: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(DSN)
    proxy = _Proxy(int(params.get("port") or 5432))
    try:
        params.update(host="127.0.0.1", port=str(proxy.port), connect_timeout="2")
        through = PostgresStorage(psycopg.conninfo.make_conninfo(**params), key="jobs", table=table)
        store = StateStore(Counter, through, default=Counter)
        store.save(Counter(count=1))
        with PostgresWatcher(through, poll_interval=0.2, reconnect_for=1.0) as watcher:
            assert watcher.wait(0.3) is False
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(StateReadError, match="lost its connection") as info:
                while True:
                    # No wake-up while disconnected: nothing stale is handed out.
                    assert watcher.wait(0.5) is False
                    assert time.monotonic() - started < 30
            assert through.location in str(info.value)
            assert not watcher.connected
    finally:
        proxy.close()


def test_a_storage_made_not_to_notify_is_seen_by_the_poll_only(table: str) -> None:
    quiet = store_of(table, notify=False)
    quiet.save(Counter(count=1))
    storage = quiet.storage
    assert isinstance(storage, PostgresStorage)
    with storage.watcher() as watcher:
        quiet.update(bump)
        assert watcher.wait(0.5) is False  # no notification, and the poll is far away
    with store_of(table, poll=0.2, notify=False).watch(timeout=20) as watch:
        quiet.update(bump)
        assert next(watch).state.count == 3


def test_watch_poll_is_checked() -> None:
    for bad in (0, -1, float("nan"), "1"):
        with pytest.raises(ValueError, match="watch_poll"):
            PostgresStorage(DSN, key="jobs", watch_poll=bad)  # type: ignore[arg-type]


def test_a_forked_child_watches_on_a_connection_of_its_own(table: str) -> None:
    store = store_of(table)
    store.save(Counter(count=1))
    storage = store.storage
    assert isinstance(storage, PostgresStorage)
    with storage.watcher() as watcher:
        parent_pid = watcher.backend_pid
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                woke = watcher.wait(10)  # a change is reported: what happened since is unknown
                mine = watcher.backend_pid
                code = 0 if woke and mine not in (None, parent_pid) else 2
            finally:
                os.write(w, bytes([code]))
                os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(child, 0)
        assert got == b"\x00"
        # The parent's connection still works: the child did not close it.
        store.update(bump)
        assert watcher.wait(10) is True and watcher.backend_pid == parent_pid
