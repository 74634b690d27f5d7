"""The command line as a person meets it: help for every argument, file references, pipes."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from statestore._cli import _parser, main

APP = """
from pydantic import BaseModel
from statestore import StateStore

from helper_model import Item  # a sibling module: the file's folder is importable


class Big(BaseModel):
    items: list[Item] = [Item(n=i) for i in range(20000)]


store = StateStore(Big, "big.json", default=Big)
"""


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "proj" / "src"
    folder.mkdir(parents=True)
    (folder / "helper_model.py").write_text(
        "from pydantic import BaseModel\n\nclass Item(BaseModel):\n    n: int\n"
    )
    (folder / "app.py").write_text(textwrap.dedent(APP))
    monkeypatch.chdir(tmp_path)
    # The CLI puts the file's folder on sys.path; restore it afterwards.
    monkeypatch.setattr(sys, "path", list(sys.path))
    return folder / "app.py"


def _actions(parser: argparse.ArgumentParser, trail: str = "statestore") -> list[tuple[str, str]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _actions(child, f"{trail} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((f"{trail} {action.dest}", action.help or ""))
    return found


def test_every_argument_and_option_has_help() -> None:
    missing = [where for where, text in _actions(_parser()) if not text.strip()]
    assert missing == []


def test_a_file_reference_loads_the_file_with_its_folder_importable(
    app: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for ref in (f"{app.relative_to(app.parents[2])}:store", f"{app}:store"):
        assert main(["show", ref, "--path", str(app.parent / "s.json")]) == 0, ref
        assert '"n": 19999' in capsys.readouterr().out


def test_a_missing_file_reference_is_a_usage_error(
    app: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", "proj/src/nope.py:store"]) == 2
    assert "no such file 'proj/src/nope.py'" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly_with_status_0(app: Path) -> None:
    """`statestore show REF | head`: the reader leaves early; no "Broken pipe", exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "statestore", "show", f"{app}:store"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=app.parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10)  # much more than a pipe's buffer is coming
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert err == b""


def test_with_path_keeps_everything_but_the_file(tmp_path: Path) -> None:
    """`--path` builds the store through with_path(): model, default, version and limits kept."""
    from pydantic import BaseModel

    from statestore import StateStore

    class S(BaseModel):
        n: int = 0

    store = StateStore(
        S,
        tmp_path / "a.json",
        default=S,
        version=3,
        migrations={1: dict, 2: dict},
        max_size=4096,
        missing_wait=0.5,
    )
    other = store.with_path(tmp_path / "b.json")
    assert other.path == tmp_path / "b.json" and other.lock is not None
    assert other.lock.path == str(tmp_path / "b.json.lock")
    assert (other.model, other.version, other.has_default) == (S, 3, True)
    assert other.storage.max_size == 4096 and other.storage.missing_wait == 0.5  # type: ignore[attr-defined]
    assert other.update(lambda s: S(n=s.n + 1)) == S(n=1)
    assert not (tmp_path / "a.json").exists()
    assert not StateStore(S, tmp_path / "c.json").has_default
