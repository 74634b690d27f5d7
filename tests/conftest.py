from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict


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
