"""A save's temporary file is its own: made with O_EXCL, never followed, never someone else's.

Temp names are random, so a collision needs an attacker who can predict one (or
bad luck): another user in a shared folder who plants a link under the name
between the store's choice of it and its ``open``. The write must then fail
without following the link, and without removing the planted entry, which the
library did not make.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter
from test_protocol_steps import Script

from statestore import StateStore, StateWriteError


def _is_temp_create(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return str(args[0]).endswith(".tmp") and bool(args[1] & os.O_CREAT)


def test_a_link_planted_at_the_temp_name_is_neither_followed_nor_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state.json"
    store = StateStore(Counter, state, default=Counter)
    store.save(Counter(count=1))
    before = state.read_bytes()
    victim = tmp_path / "victim.txt"
    victim.write_text("not statestore's")
    planted: list[str] = []

    def plant(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if not _is_temp_create(args, kwargs):
            return False
        os.symlink(victim, args[0])  # the other party wins the race for the name
        planted.append(str(args[0]))
        return True

    script = Script().at("open", plant)
    script.install(monkeypatch)
    with script.active(), pytest.raises(StateWriteError):
        store.save(Counter(count=2))
    assert script.done and planted
    assert victim.read_text() == "not statestore's"  # not written through the link
    assert os.path.islink(planted[0])  # and the planted link is not ours to remove
    assert state.read_bytes() == before
