from __future__ import annotations

import os
from pathlib import Path

import pg_server
import pytest
from pydantic import BaseModel, ConfigDict

_pg: pg_server.Server | None = None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> None:
    """Start a throwaway PostgreSQL before the backend's test files are imported.

    Only when no server is named (``STATESTORE_PG_DSN``) and some test of the
    backend is collected: see ``tests/pg_server.py``.
    """
    global _pg
    if not file_path.name.startswith("test_postgres") or "STATESTORE_PG_DSN" in os.environ:
        return
    started = pg_server.start()
    if isinstance(started, str):
        os.environ["STATESTORE_PG_UNAVAILABLE"] = started
        return
    _pg = started
    os.environ["STATESTORE_PG_DSN"] = started.dsn


def pytest_unconfigure(config: pytest.Config) -> None:
    if _pg is not None:
        _pg.stop()


class Counter(BaseModel):
    count: int = 0
    note: str = ""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int = 0


def listing(folder: Path) -> list[str]:
    """Everything in a folder (recursively), to compare before/after."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state.json"


@pytest.fixture(autouse=True)
def _no_leaked_umask() -> None:
    before = os.umask(0o022)
    os.umask(before)
    yield
    after = os.umask(before)
    os.umask(after)
    assert after == before, "a test changed the umask"
