"""What ``import statestore`` costs a program: no asyncio until the async API is used."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_statestore_does_not_import_asyncio() -> None:
    code = (
        "import sys, statestore\n"
        "from statestore import StateStore, StateFolder, DirectoryLock\n"
        "print(sorted(m for m in ('asyncio', 'concurrent.futures') if m in sys.modules))"
    )
    assert _run(code) == "[]"


def test_a_file_store_update_does_not_import_asyncio(tmp_path: object) -> None:
    code = (
        "import sys\n"
        "from pydantic import BaseModel\n"
        "import statestore\n"
        "class S(BaseModel):\n"
        "    n: int = 0\n"
        f"s = statestore.StateStore(S, {str(tmp_path)!r} + '/s.json', default=S)\n"
        "s.update(lambda x: S(n=x.n + 1))\n"
        "print('asyncio' in sys.modules, s.load().n)"
    )
    assert _run(code) == "False 1"


@pytest.mark.parametrize(
    "name",
    [
        "AsyncStateStore",
        "AsyncWatch",
        "AsyncStateFolder",
        "AsyncFolderTransaction",
        "AsyncDirectoryLock",
        "AsyncAcquiredLock",
    ],
)
def test_the_async_names_load_on_first_use(name: str) -> None:
    code = (
        "import sys, statestore\n"
        f"value = getattr(statestore, {name!r})\n"
        f"from statestore import {name} as again\n"
        f"print(value is again, value.__name__, {name!r} in dir(statestore), "
        "'asyncio' in sys.modules)"
    )
    assert _run(code) == f"True {name} True True"


def test_star_import_gives_every_public_name() -> None:
    code = (
        "from statestore import *\n"
        "import statestore\n"
        "print(all(n in globals() for n in statestore.__all__))"
    )
    assert _run(code) == "True"


def test_an_unknown_name_is_an_attribute_error() -> None:
    import statestore

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        statestore.Nope  # type: ignore[attr-defined]  # noqa: B018
