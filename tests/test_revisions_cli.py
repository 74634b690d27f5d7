"""The command line's ``log``, ``diff``, ``restore``, ``get``, ``set`` and ``edit``.

Run through ``main([...])`` against a store defined in a file the test writes
(``path/to/app.py:store``). ``edit`` is driven through a fake ``$EDITOR`` (a
script that writes what the test queued), including input that does not
validate and a document changed by another program while the editor is open.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

from statestore._cli import main

APP = textwrap.dedent(
    """
    from pydantic import BaseModel, Field
    from statestore import StateStore

    class Item(BaseModel):
        name: str
        done: bool = False

    class Todo(BaseModel):
        title: str = "list"
        limit: int = Field(default=3, ge=1)
        items: list[Item] = []

    store = StateStore(Todo, {path!r}, default=Todo, history=5)
    plain = StateStore(Todo, {path!r}, default=Todo)
    """
)


@pytest.fixture
def app(tmp_path: Path) -> tuple[str, Path]:
    state = tmp_path / "todo.json"
    (tmp_path / "app.py").write_text(APP.format(path=str(state)))
    return str(tmp_path / "app.py"), state


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _revision(state: Path) -> str:
    from statestore._document import revision_of

    return revision_of(state.read_bytes())


def test_set_get_log_diff_restore(
    app: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module, state = app
    ref = f"{module}:store"
    assert run(capsys, "set", ref, "title", "groceries") == (0, "groceries\n", "")
    first = _revision(state)
    assert run(capsys, "set", ref, "limit", "5")[:2] == (0, "5\n")
    code, out, _ = run(capsys, "set", ref, "items", '[{"name": "milk"}]')
    assert code == 0 and json.loads(out) == [{"name": "milk", "done": False}]
    assert run(capsys, "set", ref, "items.0.done", "true")[:2] == (0, "true\n")
    assert run(capsys, "get", ref, "items.0.name")[:2] == (0, "milk\n")
    assert run(capsys, "get", ref, "limit")[:2] == (0, "5\n")
    current = _revision(state)

    code, out, _ = run(capsys, "log", ref)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0].startswith(f"* {current}") and lines[-1].startswith(f"  {first}")
    assert "root@" in lines[0] or "@" in lines[0]
    assert "bytes" in lines[0]

    code, out, _ = run(capsys, "diff", ref, first)
    assert code == 0
    assert f"--- {first}" in out and f"+++ {current}" in out
    assert '-  "limit": 3,' in out and '+  "limit": 5,' in out
    assert "$commit" not in out

    code, out, _ = run(capsys, "restore", ref, first)
    assert code == 0 and "restored" in out
    assert json.loads(state.read_text())["limit"] == 3
    assert json.loads(state.read_text())["title"] == "groceries"
    code, out, _ = run(capsys, "diff", ref)  # the newest kept before the current one
    assert code == 0 and '+  "limit": 3,' in out


def test_set_refuses_what_does_not_validate_and_writes_nothing(
    app: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module, state = app
    ref = f"{module}:store"
    run(capsys, "set", ref, "limit", "4")
    before = state.read_bytes()
    for field, value in (("limit", "0"), ("limit", "many"), ("items", '{"a": 1}')):
        code, _, err = run(capsys, "set", ref, field, value)
        assert code == 1 and ("limit" in err or "items" in err), err
        assert str(state) in err
    assert state.read_bytes() == before
    for field in ("nope", "items.3", "limit.x", "a..b"):
        code, _, err = run(capsys, "set", ref, field, "1")
        assert code == 2 and err.startswith("statestore: error:"), (field, err)
        code, _, err = run(capsys, "get", ref, field)
        assert code == 2, (field, err)
    assert state.read_bytes() == before


def test_set_with_a_stale_expect_is_a_conflict(
    app: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module, state = app
    ref = f"{module}:store"
    run(capsys, "set", ref, "limit", "4")
    stale = _revision(state)
    run(capsys, "set", ref, "limit", "5")
    code, _, err = run(capsys, "set", ref, "limit", "9", "--expect", stale)
    assert code == 1 and stale in err and _revision(state) in err
    assert json.loads(state.read_text())["limit"] == 5
    now = _revision(state)
    assert run(capsys, "set", ref, "limit", "9", "--expect", now)[0] == 0


def test_log_diff_restore_need_a_history(
    app: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module, _ = app
    for argv in (("log",), ("diff",), ("restore", "1-abc")):
        code, _, err = run(capsys, argv[0], f"{module}:plain", *argv[1:])
        assert code == 2 and "history" in err


def test_restore_of_an_unknown_revision_fails(
    app: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module, state = app
    run(capsys, "set", f"{module}:store", "limit", "4")
    before = state.read_bytes()
    code, _, err = run(capsys, "restore", f"{module}:store", "7-0123456789abcdef")
    assert code == 1 and "not in the history" in err
    assert state.read_bytes() == before


FAKE_EDITOR = textwrap.dedent(
    """
    import json, os, sys
    queue = os.environ["FAKE_EDITS"]
    with open(queue) as f:
        edits = json.load(f)
    seen = open(sys.argv[1]).read()
    with open(queue + ".seen", "a") as f:
        f.write(json.dumps(seen) + "\\n")
    edit = edits.pop(0)
    with open(queue, "w") as f:
        json.dump(edits, f)
    if edit.get("meanwhile"):
        target, text = edit["meanwhile"]
        with open(target, "w") as f:  # another program's change while the editor is open
            f.write(text)
    with open(sys.argv[1], "w") as f:
        f.write(edit["write"])
    """
)


@pytest.fixture
def editor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_editor.py"
    script.write_text(FAKE_EDITOR)
    queue = tmp_path / "edits.json"
    monkeypatch.setenv("EDITOR", f"{sys.executable} {script}")
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("FAKE_EDITS", str(queue))
    return queue


def _seen(queue: Path) -> list[str]:
    return [json.loads(line) for line in Path(str(queue) + ".seen").read_text().splitlines()]


def test_edit_validates_reopens_with_the_errors_and_commits(
    app: tuple[str, Path], editor: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module, state = app
    ref = f"{module}:store"
    run(capsys, "set", ref, "limit", "4")
    editor.write_text(
        json.dumps(
            [
                {"write": '{"title": "x", "limit": 0}'},  # does not validate
                {"write": '{"title": "x", "limit": 2}'},
            ]
        )
    )
    code, out, _ = run(capsys, "edit", ref)
    assert code == 0 and "saved as revision" in out
    assert json.loads(state.read_text())["limit"] == 2
    seen = _seen(editor)
    assert json.loads(seen[0])["limit"] == 4  # the state, without the stamp
    assert "$commit" not in seen[0]
    assert seen[1].startswith("// statestore: this does not validate") and "limit" in seen[1]


def test_edit_gives_up_on_the_same_invalid_text_and_on_an_empty_file(
    app: tuple[str, Path], editor: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module, state = app
    ref = f"{module}:store"
    run(capsys, "set", ref, "limit", "4")
    before = state.read_bytes()
    bad = '{"limit": "no"}'
    editor.write_text(json.dumps([{"write": bad}, {"write": bad}]))
    code, out, _ = run(capsys, "edit", ref)
    assert code == 1 and "cancelled" in out
    editor.write_text(json.dumps([{"write": ""}]))
    code, out, _ = run(capsys, "edit", ref)
    assert code == 1 and "cancelled" in out
    assert state.read_bytes() == before


def test_edit_shows_a_change_made_meanwhile_and_asks(
    app: tuple[str, Path],
    editor: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, state = app
    ref = f"{module}:store"
    run(capsys, "set", ref, "limit", "4")
    theirs = state.read_text().replace('"limit": 4', '"limit": 7')
    mine = '{"title": "mine", "limit": 4}'
    editor.write_text(json.dumps([{"write": mine, "meanwhile": [str(state), theirs]}]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, _ = run(capsys, "edit", ref)
    assert code == 1 and "changed by someone else" in out
    assert '-  "limit": 4,' in out and '+  "limit": 7,' in out and "not saved" in out
    assert json.loads(state.read_text())["limit"] == 7  # theirs is kept
    theirs = state.read_text().replace('"limit": 7', '"limit": 8')
    mine = '{"title": "mine", "limit": 7}'
    editor.write_text(json.dumps([{"write": mine, "meanwhile": [str(state), theirs]}]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, out, _ = run(capsys, "edit", ref)
    assert code == 0 and "changed by someone else" in out and "saved as revision" in out
    assert json.loads(state.read_text())["title"] == "mine"
    assert json.loads(state.read_text())["limit"] == 7
