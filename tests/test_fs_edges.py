"""Real file-system edges: read-only folders and mounts, a full disk, symbolic links,
a lock folder owned by another user, a state file we may not read.

Root ignores file modes, so the permission tests run the store in a child process
that drops to an unprivileged user (``nobody``) after importing everything it
needs; they are skipped when the tests do not run as root. Mounts (a read-only
bind mount, a small tmpfs) need root too and are skipped, with the reason, where
the machine does not allow them.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter
from pydantic import BaseModel

from statestore import (
    LockError,
    StateReadError,
    StateStore,
    StateStoreError,
    StateWriteError,
)

pytestmark = pytest.mark.timeout(120)

HERE = os.path.dirname(os.path.abspath(__file__))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: to act as another user, and to mount file systems"
)


def _bump(s: Counter) -> None:
    s.count += 1


def _tree(folder: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Everything under ``folder``: mode, owner and content, to compare before/after."""
    out: dict[str, tuple[int, int, bytes | None]] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        content = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_uid, content)
    return out


# ---------------------------------------------------------------- another user


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="statestore-edges-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_PRELUDE = """
import json, os, sys, tempfile, time, traceback
from conftest import Counter
from statestore import DirectoryLock, StateStore, StateStoreError

def _warm_up():
    # Import and run every code path once while we may still read the interpreter's
    # files, so that nothing needs importing after dropping privileges.
    d = tempfile.mkdtemp()
    s = StateStore(Counter, os.path.join(d, "w.json"), default=Counter)
    s.update(lambda c: None)
    s.update(lambda c: c.model_copy(update={"count": 1}))
    s.load()
    with open(os.path.join(d, "w.json"), "w") as f:
        f.write("{")
    for bad in (lambda: StateStore(Counter, os.path.join(d, "w.json"), read_attempts=1).load(),
                lambda: StateStore(Counter, d).load()):
        try:
            bad()
        except StateStoreError as e:
            str(e)
    import shutil
    shutil.rmtree(d)

def attempt(fn):
    started = time.monotonic()
    try:
        value = fn()
    except BaseException as e:
        return {"error": type(e).__name__, "typed": isinstance(e, StateStoreError),
                "errno": getattr(e, "errno", None), "message": str(e),
                "elapsed": time.monotonic() - started,
                "trace": "".join(traceback.format_exception(e))}
    return {"value": repr(value), "elapsed": time.monotonic() - started}

_warm_up()
os.setgroups([])
os.setgid(GID)
os.setuid(UID)
assert os.geteuid() == UID and os.getegid() == GID
results = {}
"""


def run_as_nobody(code: str, **names: str) -> dict[str, Any]:
    """Run ``code`` as the user nobody; it fills ``results``, which is returned."""
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("there is no user 'nobody' on this machine")
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = HERE
    ids = f"UID = {user.pw_uid}\nGID = {user.pw_gid}\n"
    assigns = "".join(f"{k} = {v!r}\n" for k, v in names.items())
    script = ids + _PRELUDE + assigns + textwrap.dedent(code) + "\nprint(json.dumps(results))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def _typed(result: dict[str, Any], error: str, code: int) -> None:
    assert "error" in result, f"expected {error}, got {result}"
    assert result["typed"], result["trace"]
    assert result["error"] == error, result["trace"]
    assert result["errno"] == code, result


def _valid_state(folder: Path, mode: int = 0o644) -> Path:
    path = folder / "state.json"
    StateStore(Counter, path).save(Counter(count=5, note="root's"))
    path.chmod(mode)
    return path


@needs_root
def test_read_only_folder_as_another_user(shared: Path) -> None:
    ro = shared / "ro"
    ro.mkdir(mode=0o755)
    path = _valid_state(ro)
    locks = shared / "locks"
    locks.mkdir()
    locks.chmod(0o777)
    before = _tree(shared)
    results = run_as_nobody(
        """
        store = StateStore(Counter, PATH, default=Counter, timeout=10)
        results["load"] = attempt(store.load)
        results["update"] = attempt(lambda: store.update(lambda s: None))
        results["update-change"] = attempt(
            lambda: store.update(lambda s: s.model_copy(update={"count": 6})))
        # The lock in a folder we may write: now the save itself is refused.
        elsewhere = StateStore(Counter, PATH, lock=LOCK, timeout=10)
        results["save"] = attempt(lambda: elsewhere.save(Counter(count=7)))
        """,
        PATH=str(path),
        LOCK=str(locks / "state.lock"),
    )
    assert results["load"]["value"] == repr(Counter(count=5, note="root's"))
    for name in ("update", "update-change"):
        _typed(results[name], "LockPermissionError", errno.EACCES)  # a LockError
        assert "permission denied" in results[name]["message"]
        assert results[name]["elapsed"] < 2, "a permission error must not wait for the timeout"
    _typed(results["save"], "StateWriteError", errno.EACCES)
    assert "permission denied" in results["save"]["message"]
    # Nothing changed: not the file, not the folder; the lock was released.
    assert _tree(shared) == before


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to undo at the end (innermost first)."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _mount(mounts: list[Path], *args: str) -> None:
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting needs root and the mount command")
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this machine does not allow the mount ({proc.stderr.strip()})")
    mounts.append(Path(args[-1]))


def test_read_only_mount(tmp_path: Path, mounts: list[Path]) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _valid_state(source)
    view = tmp_path / "view"
    view.mkdir()
    _mount(mounts, "--bind", str(source), str(view))
    _mount(mounts, "-o", "remount,ro,bind", str(view))
    try:
        (view / "probe").touch()
    except OSError as e:
        assert e.errno == errno.EROFS
    else:  # pragma: no cover
        pytest.skip("the bind mount did not become read-only")
    before = _tree(source)
    path = view / "state.json"
    store = StateStore(Counter, path, default=Counter, timeout=10)
    assert store.load() == Counter(count=5, note="root's")
    started = time.monotonic()
    with pytest.raises(LockError) as info:
        store.update(_bump)
    assert info.value.errno == errno.EROFS
    assert "read-only" in str(info.value)
    assert time.monotonic() - started < 2
    # The lock elsewhere: the save itself is refused, the file stays.
    locks = tmp_path / "locks"
    elsewhere = StateStore(Counter, path, lock=locks / "state.lock", timeout=10)
    with pytest.raises(StateWriteError) as write_info:
        elsewhere.update(_bump)
    assert write_info.value.errno == errno.EROFS
    assert "read-only" in str(write_info.value)
    assert _tree(source) == before
    assert list(locks.iterdir()) == []


class Blob(BaseModel):
    count: int = 0
    data: str = ""


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder``; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            try:
                os.write(fd, bytes(4096))
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


def test_full_file_system(tmp_path: Path, mounts: list[Path]) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount(mounts, "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(disk))
    path = disk / "state.json"
    store = StateStore(Blob, path, default=Blob, timeout=10)
    store.save(Blob(count=1, data="x" * 1000))
    old = path.read_bytes()
    filler = _fill(disk)
    # Leave room for the lock's owner record, not for the new document.
    size = filler.stat().st_size
    os.truncate(filler, size - 3 * 4096)
    listing = sorted(os.listdir(disk))

    def grow(s: Blob) -> Blob:
        return s.model_copy(update={"count": s.count + 1, "data": "y" * 100_000})

    with pytest.raises(StateWriteError) as info:
        store.update(grow)
    assert info.value.errno == errno.ENOSPC
    assert "disk is full" in str(info.value)
    assert path.read_bytes() == old
    assert sorted(os.listdir(disk)) == listing, "a temporary file or the lock was left behind"
    assert store.load() == Blob(count=1, data="x" * 1000)

    # Completely full: not even the lock's owner record fits.
    os.truncate(filler, size + 3 * 4096)
    _fill(disk)
    with pytest.raises(StateStoreError) as full:
        store.update(grow)
    assert isinstance(full.value, (LockError, StateWriteError))
    assert full.value.errno == errno.ENOSPC
    assert path.read_bytes() == old
    assert sorted(os.listdir(disk)) == listing
    started = time.monotonic()

    # Space again: the next update goes through at once (no lock to wait out).
    filler.unlink()
    assert store.update(grow).count == 2
    assert time.monotonic() - started < 2
    assert sorted(os.listdir(disk)) == ["state.json"]


# ------------------------------------------------------------------ symlinks


LINKS = {
    # name: (link text, where the target is, relative to the case folder)
    "relative-same-folder": ("real.json", "data/real.json"),
    "relative-other-folder": ("../elsewhere/real.json", "elsewhere/real.json"),
    "absolute": (None, "elsewhere/real.json"),
    "chain": ("hop.json", "elsewhere/real.json"),  # state.json -> hop.json -> real
}


@pytest.mark.parametrize("kind", sorted(LINKS))
@pytest.mark.parametrize("dangling", [False, True], ids=["existing", "dangling"])
def test_symlinked_state_file_is_written_through(tmp_path: Path, kind: str, dangling: bool) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    link_text, target_rel = LINKS[kind]
    target = tmp_path / target_rel
    if link_text is None:
        link_text = str(target)
    path = tmp_path / "data" / "state.json"
    path.symlink_to(link_text)
    if kind == "chain":
        (tmp_path / "data" / "hop.json").symlink_to(os.path.relpath(target, tmp_path / "data"))
    links_before = {p: os.readlink(p) for p in (tmp_path / "data").iterdir() if p.is_symlink()}
    if not dangling:
        target.write_bytes(b'{"count": 1}')
        target.chmod(0o640)
    store = StateStore(Counter, path, default=Counter)
    assert store.load() == Counter(count=0 if dangling else 1)

    assert store.update(_bump).count == (1 if dangling else 2)
    store.save(store.load().model_copy(update={"note": "saved"}))
    with store.transaction() as state:
        state.count += 10

    # The links are still links, unchanged; the target has the content.
    assert {
        p: os.readlink(p) for p in (tmp_path / "data").iterdir() if p.is_symlink()
    } == links_before
    assert target.is_file() and not target.is_symlink()
    assert StateStore(Counter, target).load() == Counter(count=11 if dangling else 12, note="saved")
    assert store.load() == StateStore(Counter, target).load()
    if not dangling:
        assert stat.S_IMODE(target.stat().st_mode) == 0o640, "the target's mode was not kept"
    # No temporary file in either folder, no lock left.
    everything = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    expected = {"data", "elsewhere", "data/state.json", target_rel}
    if kind == "chain":
        expected.add("data/hop.json")
    assert set(everything) == expected


def test_symlink_loop_is_a_typed_error_and_stays(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.symlink_to("b.json")
    b.symlink_to("a.json")
    store = StateStore(Counter, a, default=Counter)
    with pytest.raises(StateReadError) as info:
        store.load()
    assert info.value.errno == errno.ELOOP
    with pytest.raises(StateReadError):
        store.update(_bump)
    with pytest.raises(StateStoreError):
        store.save(Counter())
    assert os.readlink(a) == "b.json" and os.readlink(b) == "a.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


# ------------------------------------------------------ a lock of another user


def _leave_lock_as_root(lock: Path, mode: int | None = None) -> None:
    """A root process takes the lock and dies without releasing it."""
    code = textwrap.dedent(
        f"""
        import os
        from statestore import DirectoryLock
        os.umask(0o022)
        DirectoryLock({str(lock)!r}).acquire()
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": HERE})
    assert (lock / "owner.json").exists() and lock.stat().st_uid == 0
    if mode is not None:
        lock.chmod(mode)


@needs_root
@pytest.mark.parametrize("mode", [None, 0o700], ids=["stale-readable", "unreadable"])
def test_lock_folder_owned_by_another_user_is_a_permission_error(
    shared: Path, mode: int | None
) -> None:
    data = shared / "data"
    data.mkdir()
    data.chmod(0o777)
    path = _valid_state(data)
    lock = Path(f"{path}.lock")
    _leave_lock_as_root(lock, mode)
    before = _tree(shared)
    results = run_as_nobody(
        """
        store = StateStore(Counter, PATH, default=Counter, timeout=10)
        results["update"] = attempt(lambda: store.update(lambda s: None))
        results["acquire"] = attempt(lambda: DirectoryLock(PATH + ".lock", timeout=10).acquire())
        results["load"] = attempt(store.load)
        """,
        PATH=str(path),
    )
    for name in ("update", "acquire"):
        _typed(results[name], "LockPermissionError", errno.EACCES)  # a LockError
        assert results[name]["elapsed"] < 2, "a permission error must not wait for the timeout"
        assert "permission denied" in results[name]["message"]
    assert results["load"]["value"] == repr(Counter(count=5, note="root's"))
    assert _tree(shared) == before
    # Root (the lock's owner) breaks the dead holder's lock at once.
    started = time.monotonic()
    assert StateStore(Counter, path).update(_bump).count == 6
    assert time.monotonic() - started < 2


@needs_root
def test_state_file_without_read_permission(shared: Path) -> None:
    data = shared / "data"
    data.mkdir()
    data.chmod(0o777)
    path = _valid_state(data, mode=0o600)
    before = _tree(shared)
    results = run_as_nobody(
        """
        store = StateStore(Counter, PATH, default=Counter, timeout=10)
        results["load"] = attempt(store.load)
        results["update"] = attempt(lambda: store.update(lambda s: None))
        results["save"] = attempt(lambda: store.save(Counter(count=9)))
        results["transaction"] = attempt(lambda: store.transaction().__enter__())
        """,
        PATH=str(path),
    )
    for name in ("load", "update", "save", "transaction"):
        _typed(results[name], "StateReadError", errno.EACCES)
        assert "permission denied" in results[name]["message"]
        assert str(path) in results[name]["message"]
    assert _tree(shared) == before
