"""The error tree: what each class promises, pinned; a published save is never a StateWriteError."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter
from faultfs import Interposer

import statestore
from statestore import (
    ConflictError,
    CrossDeviceError,
    DurabilityError,
    LockCompromisedError,
    LockError,
    LockTimeout,
    MigrationError,
    NestedTransactionError,
    SchemaVersionError,
    StateCorruptError,
    StateNotFoundError,
    StateReadError,
    StateStore,
    StateStoreError,
    StateValidationError,
    StateWriteError,
)

#: Each error class, its parent in the tree, and the builtin it also is.
TREE: dict[type[StateStoreError], tuple[type[StateStoreError], type[BaseException]]] = {
    LockTimeout: (StateStoreError, TimeoutError),
    LockCompromisedError: (StateStoreError, RuntimeError),
    LockError: (StateStoreError, OSError),
    StateNotFoundError: (StateStoreError, FileNotFoundError),
    StateReadError: (StateStoreError, OSError),
    StateCorruptError: (StateStoreError, ValueError),
    StateValidationError: (StateStoreError, ValueError),
    StateWriteError: (StateStoreError, OSError),
    CrossDeviceError: (StateWriteError, OSError),
    DurabilityError: (StateStoreError, OSError),
    SchemaVersionError: (StateStoreError, ValueError),
    MigrationError: (StateStoreError, ValueError),
    NestedTransactionError: (StateStoreError, RuntimeError),
    ConflictError: (StateStoreError, RuntimeError),
}


def _public_errors() -> set[type[StateStoreError]]:
    return {
        obj
        for name in statestore.__all__
        if isinstance(obj := getattr(statestore, name), type) and issubclass(obj, StateStoreError)
    }


@pytest.mark.parametrize("cls", list(TREE), ids=lambda c: c.__name__)
def test_each_error_sits_where_the_tree_says(cls: type[StateStoreError]) -> None:
    parent, builtin = TREE[cls]
    assert issubclass(cls, parent)
    assert issubclass(cls, builtin)
    # The nearest StateStoreError ancestor is the drawn parent, not a deeper one.
    ancestors = [c for c in cls.__mro__[1:] if issubclass(c, StateStoreError)]
    public = [c for c in ancestors if c.__name__ in statestore.__all__]
    assert public[0] is parent


def test_durability_error_is_a_sibling_of_the_write_error() -> None:
    assert not issubclass(DurabilityError, StateWriteError)
    assert not issubclass(StateWriteError, DurabilityError)
    assert issubclass(DurabilityError, OSError)
    # Only what leaves the old document intact is a StateWriteError.
    assert {c for c in _public_errors() if issubclass(c, StateWriteError)} == {
        StateWriteError,
        CrossDeviceError,
    }


def test_the_tree_covers_every_public_error() -> None:
    # A public error is drawn above, or is a refinement of one that is.
    for cls in _public_errors() - {StateStoreError}:
        assert cls in TREE or any(issubclass(cls, drawn) for drawn in TREE), cls
    assert set(TREE) <= _public_errors()


def test_the_drawn_tree_matches_the_classes() -> None:
    doc = statestore._errors.__doc__ or ""
    lines = doc.splitlines()

    def depth(name: str) -> int:
        line = next(line for line in lines if f"── {name} " in line)
        return line.index("──")

    for cls, (parent, _) in TREE.items():
        expected = 5 if parent is StateStoreError else 9  # "    ├── X" or "    │   └── X"
        assert depth(cls.__name__) == expected, cls.__name__


class _FailDirFsync(Interposer):
    """Every fsync of a folder fails with EIO; every other call goes through."""

    def __init__(self) -> None:
        super().__init__()
        self.fired = 0

    def call(
        self, name: str, real: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if name in ("fsync", "fdatasync") and stat.S_ISDIR(os.fstat(args[0]).st_mode):
            self.fired += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(*args, **kwargs)


def test_a_failed_folder_fsync_is_not_caught_as_a_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))
    fs = _FailDirFsync()
    fs.install(monkeypatch)
    applied = 0

    def bump(state: Counter) -> None:
        nonlocal applied
        applied += 1
        state.count += 1

    # A caller that retries on StateWriteError, as its docstring invites.
    with pytest.raises(DurabilityError) as info, fs.active():
        for _ in range(3):
            try:
                store.update(bump)
                break
            except StateWriteError:
                continue
    assert fs.fired == 1, "the folder fsync was not reached"
    assert applied == 1
    assert info.value.errno == errno.EIO
    assert str(path) in str(info.value)
    # The change is in place: exactly once.
    assert store.load().count == 2


def test_a_failed_write_is_a_write_error_and_saves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The positive control of the test above: a fault before the rename is a
    # StateWriteError, and then nothing was saved, so a retry applies fn once.
    path = tmp_path / "state.json"
    store = StateStore(Counter, path, default=Counter)
    store.save(Counter(count=1))

    class _FailFileFsyncOnce(Interposer):
        fired = 0

        def call(
            self,
            name: str,
            real: Callable[..., Any],
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> Any:
            if name == "fsync" and not self.fired and stat.S_ISREG(os.fstat(args[0]).st_mode):
                self.fired += 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(*args, **kwargs)

    fs = _FailFileFsyncOnce()
    fs.install(monkeypatch)
    caught: list[StateWriteError] = []
    with fs.active():
        for _ in range(3):
            try:
                store.update(lambda s: s.model_copy(update={"count": s.count + 1}))
                break
            except StateWriteError as e:
                caught.append(e)
    assert fs.fired == 1 and len(caught) == 1
    assert not isinstance(caught[0], DurabilityError)
    assert store.load().count == 2
