"""Errors: typed, carrying the path, resembling builtins, picklable; the public names."""

from __future__ import annotations

import errno
import pickle

import pytest

import statestore
from statestore import (
    ConflictError,
    CrossDeviceError,
    DurabilityError,
    LockCompromisedError,
    LockError,
    LockPermissionError,
    LockTimeout,
    MigrationError,
    NestedTransactionError,
    SchemaVersionError,
    StateCorruptError,
    StateNotFoundError,
    StateReadError,
    StateStoreError,
    StateValidationError,
    StateWriteError,
)

EXAMPLES = [
    LockTimeout(
        "/s/x.lock", timeout=2.0, holder={"pid": 42, "host": "box", "age": 3.5}, alive=True
    ),
    LockCompromisedError("/s/x.lock", "our lease ran out"),
    LockError("/s/x.lock", "permission denied", errno=errno.EACCES),
    StateNotFoundError("/s/x.json", "no state file"),
    StateReadError("/s/x.json", "is a folder", errno=errno.EISDIR),
    StateCorruptError("/s/x.json", "not valid JSON", line=3, column=7),
    StateValidationError("/s/x.json", errors=[{"loc": ["count"], "msg": "bad", "type": "int"}]),
    StateWriteError("/s/x.json", "disk full", errno=errno.ENOSPC),
    CrossDeviceError("/s/x.json", "different mounts", errno=errno.EXDEV),
    DurabilityError("/s/x.json", "folder fsync failed", errno=errno.EIO),
    SchemaVersionError("/s/x.json", "newer"),
    MigrationError("/s/x.json", "step 1 failed"),
    NestedTransactionError("/s/x.json", "nested"),
    ConflictError("/s/x.json", expected="1-aa", found="2-bb"),
]

BUILTINS = {
    LockTimeout: TimeoutError,
    LockCompromisedError: RuntimeError,
    ConflictError: RuntimeError,
    LockError: OSError,
    LockPermissionError: PermissionError,  # a LockError made with EACCES/EPERM
    StateNotFoundError: FileNotFoundError,
    StateReadError: OSError,
    StateCorruptError: ValueError,
    StateValidationError: ValueError,
    StateWriteError: OSError,
    CrossDeviceError: OSError,
    DurabilityError: OSError,
    SchemaVersionError: ValueError,
    MigrationError: ValueError,
    NestedTransactionError: RuntimeError,
}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_errors_carry_the_path_and_survive_pickling(error: StateStoreError) -> None:
    assert isinstance(error, StateStoreError)
    assert isinstance(error, BUILTINS[type(error)])
    assert error.path in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert clone.path == error.path
    assert vars(clone) == vars(error)


def test_oserror_subclasses_keep_errno() -> None:
    e = StateWriteError("/s/x.json", "disk full", errno=errno.ENOSPC)
    assert e.errno == errno.ENOSPC
    assert e.filename == "/s/x.json"


def test_lock_timeout_names_the_holder() -> None:
    e = LockTimeout(
        "/s/x.lock", timeout=2.0, holder={"pid": 42, "host": "box", "age": 3.5}, alive=False
    )
    text = str(e)
    assert "pid 42" in text and "'box'" in text and "3.5 s" in text and "not alive" in text


def test_corrupt_error_names_line_and_column() -> None:
    assert str(StateCorruptError("/s/x.json", "bad", line=3, column=7)) == "/s/x.json:3:7: bad"


def test_public_names() -> None:
    assert statestore.__all__ == sorted(statestore.__all__)
    assert set(statestore.__all__) == {
        name for name in dir(statestore) if not name.startswith("_")
    } - {"backends", "testing"}
    for name in statestore.__all__:
        assert getattr(statestore, name) is not None
