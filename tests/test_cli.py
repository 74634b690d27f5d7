"""The command line: every command and exit code, through ``main([...])``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statestore import StateStore
from statestore._atomic import _host_tag
from statestore._cli import main
from statestore._schema import dump_schema, internal_schemas

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
HOST = socket.gethostname()

import cli_fixtures  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI imports store references and puts the current folder on sys.path;
    # the monkeypatch restores sys.path afterwards.
    monkeypatch.syspath_prepend(str(TESTS))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -------------------------------------------------------------- real processes

HOLD = (
    "import sys, time\n"
    "from statestore import DirectoryLock\n"
    "DirectoryLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def hold_lock(lock: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.fixture
def stale_lock(tmp_path: Path) -> tuple[Path, int]:
    """``state.json.lock`` held by a child process that was then killed."""
    lock = tmp_path / "state.json.lock"
    proc = hold_lock(lock)
    stop(proc)
    assert (lock / "owner.json").exists()
    return lock, proc.pid


@pytest.fixture
def live_lock(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """``state.json.lock`` held by a running child process."""
    lock = tmp_path / "state.json.lock"
    proc = hold_lock(lock)
    try:
        yield lock, proc.pid
    finally:
        stop(proc)


# -------------------------------------------------------------- help and usage


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["show"],
        ["validate"],
        ["migrate"],
        ["schema"],
        ["schema", "export"],
        ["schema", "check"],
        ["schema", "internal"],
        ["lock"],
        ["lock", "status"],
        ["lock", "break"],
        ["doctor"],
        ["demo"],
    ],
    ids=lambda c: " ".join(c) or "statestore",
)
def test_help_everywhere(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    code, out, err = run(capsys, *command, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: {' '.join(['statestore', *command])} [-h] [--debug]")


def test_top_level_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "--help")[1]
    for command in ("show", "validate", "migrate", "schema", "lock", "doctor", "demo"):
        assert re.search(rf"^    {command} ", out, re.M)
    assert "Exit codes: 0 ok, 1 check failed, 2 usage error." in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (["schema"], "the following arguments are required: COMMAND"),
        (
            ["schema", "check", "cli_fixtures:settings"],
            "the following arguments are required: --out",
        ),
        (["schema", "export", "cli_fixtures:settings", "--draft", "04"], "invalid choice: '04'"),
        (["lock", "break"], "the following arguments are required: PATH"),
        (["demo", "-n", "0"], "argument --processes/-n: must be at least 1"),
    ],
    ids=[
        "no-command",
        "unknown",
        "schema-alone",
        "check-without-out",
        "bad-draft",
        "break-without-path",
        "demo-zero",
    ],
)
def test_argparse_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("usage: statestore")
    assert message in err.splitlines()[-1]


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (
            "nocolon",
            "'nocolon' is not a store reference; write module:attribute or "
            "path/to/file.py:attribute, e.g. myapp.state:store",
        ),
        (
            "no_such_module_xyz:store",
            "no_such_module_xyz:store: no module named 'no_such_module_xyz'",
        ),
        ("cli_fixtures:missing", "cli_fixtures:missing: 'cli_fixtures' has no attribute 'missing'"),
        (
            "cli_fixtures:not_a_store",
            "cli_fixtures:not_a_store: expected a StateStore, a StateFolder or a pydantic "
            "model, found int",
        ),
        (
            "cli_fixtures:Settings",
            "cli_fixtures:Settings is a model, not a store: name the file with --path",
        ),
    ],
    ids=["no-colon", "no-module", "no-attribute", "not-a-store", "model-without-path"],
)
def test_bad_store_references_exit_2(
    capsys: pytest.CaptureFixture[str], ref: str, message: str
) -> None:
    assert run(capsys, "show", ref) == (2, "", f"statestore: error: {message}\n")


def test_reference_from_the_current_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The installed `statestore` script does not put the current folder on sys.path:
    # the CLI does, as `python -m` would.
    (tmp_path / "here_app.py").write_text(
        "from pydantic import BaseModel\nfrom statestore import StateStore\n"
        "class Box(BaseModel):\n    size: int = 0\n"
        "store = StateStore(Box, 'box.json', default=Box)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "here_app", raising=False)
    assert run(capsys, "show", "here_app:store") == (0, '{\n  "size": 0\n}\n', "")
    monkeypatch.delitem(sys.modules, "here_app")


# ------------------------------------------------------------------------ show


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_show_prints_the_migrated_state(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", '{"name": "lamp", "colour": "blue"}')
    assert run(capsys, "show", "cli_fixtures:settings", "--path", str(path)) == (
        0,
        '{\n  "name": "lamp",\n  "color": "blue",\n  "size": 1,\n  "tags": []\n}\n',
        "",
    )
    assert path.read_text() == '{"name": "lamp", "colour": "blue"}'  # in memory only


def test_show_with_a_model_reference(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", '{"count": 5}')
    assert run(capsys, "show", "cli_fixtures:Counter", "--path", str(path)) == (
        0,
        '{\n  "count": 5\n}\n',
        "",
    )


def test_show_uses_the_store_s_default(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "show", "cli_fixtures:counter", "--path", str(tmp_path / "none.json")) == (
        0,
        '{\n  "count": 0\n}\n',
        "",
    )


def test_show_errors_are_one_line_on_stderr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.json"
    assert run(capsys, "show", "cli_fixtures:settings", "--path", str(missing)) == (
        1,
        "",
        f"statestore: error: {missing}: no state file; save() one first, or give the "
        "store a default\n",
    )
    bad = write(tmp_path / "bad.json", '{"name": 1, "size": 0}')
    assert run(capsys, "show", "cli_fixtures:settings_v1", "--path", str(bad)) == (
        1,
        "",
        f"statestore: error: {bad}: 2 validation error(s) against the model: name (line 1, "
        "column 2): Input should be a valid string; size (line 1, column 13): Input should be "
        "greater than or equal to 1; fix those fields in the document, or, if the model changed "
        "on purpose, give the store a new version and a migration; the document was left "
        "untouched\n",
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str
) -> None:
    bad = write(tmp_path / "bad.json", "[]")
    args = ["show", "cli_fixtures:settings", "--path", str(bad)]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    code, out, err = run(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith("Traceback (most recent call last):")
    assert "StateCorruptError" in err
    assert err.endswith(
        f"statestore: error: {bad}:1:1: the document is a JSON array, but a state file holds "
        "a JSON object; the file was left untouched; edit it to fix this, or put back a copy, "
        "then load it again\n"
    )


def test_unexpected_errors_name_their_type(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path / "x.json", '{"value": 1}')
    assert run(capsys, "show", "cli_fixtures:exploding", "--path", str(path)) == (
        1,
        "",
        "statestore: error: RuntimeError: validator exploded (--debug shows the traceback)\n",
    )


# -------------------------------------------------------------------- validate


def test_validate_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    StateStore(cli_fixtures.Settings, path, version=2, migrations={1: lambda d: d}).save(
        cli_fixtures.Settings(name="x")
    )
    assert run(capsys, "validate", "cli_fixtures:settings", "--path", str(path)) == (
        0,
        f"{path}: ok\n",
        "",
    )


def test_validate_an_older_version(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", '{"name": "lamp", "colour": "blue"}')
    assert run(capsys, "validate", "cli_fixtures:settings", "--path", str(path)) == (
        0,
        f"{path}: ok at version 1; loads as version 2 (run 'statestore migrate' to upgrade "
        "the file)\n",
        "",
    )


def test_validate_lists_errors_with_positions(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(
        tmp_path / "s.json",
        '{\n  "schema_version": 2,\n  "size": "big",\n  "tags": ["a", 3],\n'
        '  "nested": {"deep": [1, {"x": null}]}\n}\n',
    )
    code, out, err = run(capsys, "validate", "cli_fixtures:settings", "--path", str(path))
    assert (code, err) == (1, "")
    assert out == (
        f"{path}:1:1: name: Field required\n"
        f"{path}:3:3: size: Input should be a valid integer, unable to parse string as an "
        "integer\n"
        f"{path}:4:17: tags.1: Input should be a valid string\n"
        f"{path}:5:3: nested: Extra inputs are not permitted\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{\n  "name": "a",,\n}',
            ":2:15: not valid JSON (Expecting property name enclosed in "
            "double quotes at line 2, column 15); the file was left untouched; "
            "edit it to fix this, or put back a copy, then load it again",
        ),
        (
            "",
            ":1:1: the file is empty; the file was left untouched; edit it to fix this, or put "
            "back a copy, then load it again",
        ),
        (
            '{"schema_version": 7, "name": "a"}',
            ": the file is at schema version 7, newer than "
            "this program's version 2: it was written by a newer release. Upgrade this program; "
            "the file was not changed",
        ),
    ],
    ids=["syntax", "empty", "newer"],
)
def test_validate_reports_unreadable_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path / "s.json", text)
    assert run(capsys, "validate", "cli_fixtures:settings", "--path", str(path)) == (
        1,
        f"{path}{message}\n",
        "",
    )


def test_validate_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "none.json"
    # With a default the program works without the file: say what applies.
    assert run(capsys, "validate", "cli_fixtures:counter", "--path", str(path)) == (
        0,
        f"{path}: no such file yet; the store's default applies (the first update or "
        "save creates it)\n",
        "",
    )
    assert not path.exists()
    # Without one, loading fails until a first save.
    assert run(capsys, "validate", "cli_fixtures:settings", "--path", str(path)) == (
        1,
        f"{path}: no such file, and the store has no default: loading it fails until a "
        "first save creates it\n",
        "",
    )


def test_validate_a_missing_file_that_was_quarantined(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The default does not apply while doctor's quarantined copy says the file existed."""
    path = write(tmp_path / "s.json", '{"count": 1,}')
    assert run(capsys, "doctor", str(tmp_path), "--fix")[0] == 1
    code, out, _ = run(capsys, "validate", "cli_fixtures:counter", "--path", str(path))
    assert code == 1
    assert ".quarantine" in out


# --------------------------------------------------------------------- migrate


def test_migrate_dry_run_then_for_real(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    original = '{"name": "lamp", "colour": "blue"}'
    path = write(tmp_path / "s.json", original)
    args = ["migrate", "cli_fixtures:settings", "--path", str(path)]
    assert run(capsys, *args, "--dry-run") == (
        0,
        f"{path}: would upgrade from version 1 to 2 (1->2); backup would go to {path}.v1.bak\n",
        "",
    )
    assert path.read_text() == original and not Path(f"{path}.v1.bak").exists()
    assert run(capsys, *args) == (
        0,
        f"{path}: upgraded from version 1 to 2 (1->2); backup at {path}.v1.bak\n",
        "",
    )
    migrated = json.loads(path.read_text())
    assert migrated.pop("$commit")["revision"] == 1
    assert migrated == {
        "schema_version": 2,
        "name": "lamp",
        "color": "blue",
        "size": 1,
        "tags": [],
    }
    assert Path(f"{path}.v1.bak").read_text() == original
    assert run(capsys, *args) == (0, f"{path}: already at version 2; nothing to do\n", "")


def test_migrate_a_missing_file_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "none.json"
    assert run(capsys, "migrate", "cli_fixtures:settings", "--path", str(path)) == (
        1,
        "",
        f"statestore: error: {path}: there is no state file to migrate\n",
    )


# ---------------------------------------------------------------------- schema


def test_schema_export(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "schemas"
    code, out, err = run(
        capsys,
        "schema",
        "export",
        "cli_fixtures:settings",
        "cli_fixtures:Counter",
        "--out",
        str(out_dir),
    )
    assert (code, err) == (0, "")
    assert out == (
        f"wrote {out_dir}/settings.v2.schema.json\nwrote {out_dir}/counter.v1.schema.json\n"
    )
    assert (out_dir / "settings.v2.schema.json").read_text(encoding="utf-8") == dump_schema(
        cli_fixtures.settings.json_schema()
    )
    counter = json.loads((out_dir / "counter.v1.schema.json").read_text())
    assert counter["$id"] == "urn:statestore:model:cli_fixtures.Counter:v1"


def test_schema_export_draft_07(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert (
        run(
            capsys,
            "schema",
            "export",
            "cli_fixtures:settings",
            "--out",
            str(tmp_path),
            "--draft",
            "07",
        )[0]
        == 0
    )
    text = (tmp_path / "settings.v2.schema.json").read_text(encoding="utf-8")
    assert text == dump_schema(cli_fixtures.settings.json_schema("07"))
    assert '"$schema": "http://json-schema.org/draft-07/schema#"' in text


def test_schema_export_refuses_two_stores_for_one_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(
        capsys,
        "schema",
        "export",
        "cli_fixtures:settings_v1",
        "cli_fixtures:Settings",
        "--out",
        str(tmp_path),
    )
    assert code == 2
    assert err == (
        f"statestore: error: cli_fixtures:settings_v1 and cli_fixtures:Settings would both "
        f"write {tmp_path}/settings.v1.schema.json\n"
    )


def test_schema_check_passes_and_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ref, out_dir = "cli_fixtures:settings", str(tmp_path)
    target = tmp_path / "settings.v2.schema.json"
    export = f"statestore schema export {ref} --out {out_dir}"
    assert run(capsys, "schema", "check", ref, "--out", out_dir) == (
        1,
        f"{target}: missing; export it with: {export}\n",
        "",
    )
    run(capsys, "schema", "export", ref, "--out", out_dir)
    assert run(capsys, "schema", "check", ref, "--out", out_dir) == (
        0,
        f"{target}: up to date\n",
        "",
    )
    target.write_text(target.read_text().replace('"minimum": 1', '"minimum": 0'))
    line = next(n for n, t in enumerate(target.read_text().splitlines(), 1) if '"minimum": 0' in t)
    assert run(capsys, "schema", "check", ref, "--out", out_dir) == (
        1,
        f"{target}: the schema of version 2 changed (first difference at line {line}), but the "
        f"version did not. Bump the store's version and add a migration; or, if version 2 was "
        f"never released, re-export: {export}\n",
        "",
    )


def test_schema_check_uses_the_file_s_dialect(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ref = "cli_fixtures:settings"
    run(capsys, "schema", "export", ref, "--out", str(tmp_path), "--draft", "07")
    assert run(capsys, "schema", "check", ref, "--out", str(tmp_path))[0] == 0
    assert run(capsys, "schema", "check", ref, "--out", str(tmp_path), "--draft", "2020-12")[0] == 1


APP_V1 = """
from pydantic import BaseModel
from statestore import StateStore

class Prefs(BaseModel):
    theme: str = "light"

store = StateStore(Prefs, "prefs.json", version={version}, migrations={migrations})
"""
APP_V2 = APP_V1.replace('theme: str = "light"', 'theme: str = "light"\n    volume: int')


def test_schema_check_catches_a_model_change_without_a_version_bump(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # each rewrite must be re-read

    def release(source: str, version: int) -> None:
        migrations = "{1: lambda d: {**d, 'volume': 5}}" if version == 2 else "None"
        text = source.format(version=version, migrations=migrations)
        (tmp_path / "drift_app.py").write_text(text)
        monkeypatch.delitem(sys.modules, "drift_app", raising=False)

    check = ["schema", "check", "drift_app:store", "--out", "schemas"]
    release(APP_V1, 1)
    assert run(capsys, "schema", "export", "drift_app:store", "--out", "schemas")[0] == 0
    assert run(capsys, *check) == (0, "schemas/prefs.v1.schema.json: up to date\n", "")

    release(APP_V2, 1)  # a required field added, version left at 1: CI must fail
    code, out, _ = run(capsys, *check)
    assert code == 1
    assert out.startswith("schemas/prefs.v1.schema.json: the schema of version 1 changed")

    release(APP_V2, 2)  # bumped: the new version's schema is still to be exported
    assert run(capsys, *check)[1] == (
        "schemas/prefs.v2.schema.json: missing; export it with: statestore schema export "
        "drift_app:store --out schemas\n"
    )
    run(capsys, "schema", "export", "drift_app:store", "--out", "schemas")
    assert run(capsys, *check) == (0, "schemas/prefs.v2.schema.json: up to date\n", "")
    assert sorted(p.name for p in (tmp_path / "schemas").iterdir()) == [
        "prefs.v1.schema.json",
        "prefs.v2.schema.json",
    ]
    monkeypatch.delitem(sys.modules, "drift_app")


def test_schema_internal_regenerates_the_committed_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, "schema", "internal", "--out", str(tmp_path)) == (
        0,
        f"wrote {tmp_path}/lock-owner.v1.schema.json\nwrote {tmp_path}/folder.v1.schema.json\n",
        "",
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert (
        names
        == sorted(internal_schemas())
        == [
            "folder.v1.schema.json",
            "lock-owner.v1.schema.json",
        ]
    )
    for name in names:
        assert (tmp_path / name).read_bytes() == (ROOT / "schemas" / name).read_bytes()


# ------------------------------------------------------------------------ lock


def test_lock_status_free(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert run(capsys, "lock", "status", str(path)) == (
        0,
        f"lock:     {path}.lock\nstate:    free\n",
        "",
    )


@pytest.mark.parametrize("name", ["state.json", "state.json.lock"])
def test_lock_status_stale(
    capsys: pytest.CaptureFixture[str], stale_lock: tuple[Path, int], name: str
) -> None:
    lock, pid = stale_lock
    code, out, err = run(capsys, "lock", "status", str(lock.parent / name))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[:5] == [
        f"lock:     {lock}",
        f"state:    stale (holder pid {pid} on {HOST} is no longer running)",
        f"pid:      {pid}",
        f"host:     {HOST}",
        "alive:    no",
    ]
    assert re.fullmatch(r"age:      \d+\.\d s", lines[5])
    assert re.fullmatch(r"lease:    expires in \d+\.\d s", lines[6])
    assert lines[7:] == [f"break it: statestore lock break {lock}"]


def test_lock_status_live(capsys: pytest.CaptureFixture[str], live_lock: tuple[Path, int]) -> None:
    lock, pid = live_lock
    code, out, err = run(capsys, "lock", "status", str(lock))
    assert (code, err) == (0, "")
    assert out.splitlines()[:5] == [
        f"lock:     {lock}",
        f"state:    held (held by pid {pid} on {HOST})",
        f"pid:      {pid}",
        f"host:     {HOST}",
        "alive:    yes",
    ]
    assert len(out.splitlines()) == 7


def test_lock_without_owner_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # A creator that died between mkdir and writing its owner record.
    lock = tmp_path / "state.json.lock"
    lock.mkdir()
    old = time.time() - 60
    os.utime(lock, (old, old))
    code, out, err = run(capsys, "lock", "status", str(lock))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == f"lock:     {lock}"
    assert re.fullmatch(
        r"state:    stale \(no owner record for 6\d\.\d s \(being created, or its creator "
        r"died\)\)",
        lines[1],
    )
    assert lines[2:] == [f"break it: statestore lock break {lock}"]
    code, out, _ = run(capsys, "lock", "break", str(lock))
    assert code == 0 and out.startswith(f"{lock}: broke the lock (no owner record for ")
    assert not lock.exists()


def test_lock_break_stale(capsys: pytest.CaptureFixture[str], stale_lock: tuple[Path, int]) -> None:
    lock, pid = stale_lock
    assert run(capsys, "lock", "break", str(lock.parent / "state.json")) == (
        0,
        f"{lock}: broke the lock (holder pid {pid} on {HOST} is no longer running)\n",
        "",
    )
    assert not lock.exists()
    assert run(capsys, "lock", "break", str(lock)) == (0, f"{lock}: free; nothing to break\n", "")


def test_lock_break_refuses_a_live_lock_without_force(
    capsys: pytest.CaptureFixture[str], live_lock: tuple[Path, int]
) -> None:
    lock, pid = live_lock
    assert run(capsys, "lock", "break", str(lock)) == (
        1,
        "",
        f"statestore: error: {lock}: the lock is live (held by pid {pid} on {HOST}); use "
        "--force to break it anyway\n",
    )
    assert (lock / "owner.json").exists()
    assert run(capsys, "lock", "break", str(lock), "--force") == (
        0,
        f"{lock}: broke the lock (forced: held by pid {pid} on {HOST})\n",
        "",
    )
    assert not lock.exists()


# ---------------------------------------------------------------------- doctor

STAMP = r"\d{8}T\d{6}Z"


def crash_site(folder: Path, dead_pid: int) -> None:
    """What a crash leaves behind, next to healthy files."""
    StateStore(cli_fixtures.Counter, folder / "good.json").save(cli_fixtures.Counter(count=1))
    write(folder / "good.json.v1.bak", '{"count": 0}')
    write(folder / "broken.json", '{"count": ')
    write(folder / "notes.txt", "not a state file, not looked at")
    write(folder / f".good.json.{_host_tag()}-{dead_pid}-0123456789ab.tmp", '{"cou')
    write(folder / f".good.json.{_host_tag()}-{os.getpid()}-0123456789ab.tmp", "in progress")
    (folder / "old.json.lock.0123456789ab.broken").mkdir()


def test_doctor_reports(capsys: pytest.CaptureFixture[str], stale_lock: tuple[Path, int]) -> None:
    lock, pid = stale_lock
    folder = lock.parent
    crash_site(folder, pid)
    assert run(capsys, "doctor", str(folder)) == (
        1,
        "problem   broken.json: unparseable: line 1, column 11: not valid JSON (Expecting value "
        "at line 1, column 11)\n"
        f"problem   state.json.lock: stale lock: holder pid {pid} on {HOST} is no longer "
        "running\n"
        "problem   old.json.lock.0123456789ab.broken: leftover: a lock directory set aside by "
        "a release or break that did not finish\n"
        f"problem   .good.json.{_host_tag()}-{pid}-0123456789ab.tmp: temp file: left by pid "
        f"{pid}, which is no longer running\n"
        "backup    good.json.v1.bak: backup of good.json at schema version 1\n"
        f"4 problem(s); run 'statestore doctor {folder} --fix' to repair them\n",
        "",
    )


def test_doctor_fix(capsys: pytest.CaptureFixture[str], stale_lock: tuple[Path, int]) -> None:
    lock, pid = stale_lock
    folder = lock.parent
    crash_site(folder, pid)
    code, out, err = run(capsys, "doctor", str(folder), "--fix")
    # The quarantined file is not a fresh start: its store refuses to start, and says so.
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[:4] == [
        "problem   broken.json: unparseable: line 1, column 11: not valid JSON (Expecting value "
        "at line 1, column 11)",
        f"problem   state.json.lock: stale lock: holder pid {pid} on {HOST} is no longer running",
        "problem   old.json.lock.0123456789ab.broken: leftover: a lock directory set aside by a "
        "release or break that did not finish",
        f"problem   .good.json.{_host_tag()}-{pid}-0123456789ab.tmp: temp file: left by pid "
        f"{pid}, which is no longer running",
    ]
    assert lines[5:8] == [
        f"fixed     state.json.lock: broke the stale lock (holder pid {pid} on {HOST} is no "
        "longer running)",
        "fixed     old.json.lock.0123456789ab.broken: removed",
        f"fixed     .good.json.{_host_tag()}-{pid}-0123456789ab.tmp: removed",
    ]
    assert re.fullmatch(
        rf"fixed     broken.json: moved to \.quarantine/broken\.json\.{STAMP}", lines[8]
    )
    (kept,) = (folder / ".quarantine").iterdir()
    next_step = (
        "a store of broken.json now refuses to start (StateMissingError) rather than start "
        f"over from its default; repair the copy, then move it back: mv {kept} "
        f"{folder / 'broken.json'}; or, to start from the default, delete the copy"
    )
    assert lines[9:] == ["fixed 4 of 4 problem(s); 1 remain", f"next      broken.json: {next_step}"]
    # Quarantined, never deleted; healthy files, backups and live temp files untouched.
    assert kept.read_text() == '{"count": '
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            ".quarantine",
            "good.json",
            "good.json.v1.bak",
            "notes.txt",
            f".good.json.{_host_tag()}-{os.getpid()}-0123456789ab.tmp",
        ]
    )
    assert run(capsys, "doctor", str(folder)) == (
        1,
        f"problem   .quarantine/{kept.name}: quarantined: broken.json is missing: {next_step}\n"
        "backup    good.json.v1.bak: backup of good.json at schema version 1\n"
        "1 problem(s), which need a person (see above)\n",
        "",
    )
    # Deleting the copy is the deliberate fresh start.
    kept.unlink()
    assert run(capsys, "doctor", str(folder)) == (
        0,
        "backup    good.json.v1.bak: backup of good.json at schema version 1\nno problems found\n",
        "",
    )


def test_doctor_leaves_files_of_a_live_holder_alone(
    capsys: pytest.CaptureFixture[str],
    live_lock: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from statestore import _doctor

    monkeypatch.setattr(_doctor, "LOCK_WAIT", 0.2)
    lock, pid = live_lock
    folder = lock.parent
    write(folder / "state.json", "{")
    code, out, err = run(capsys, "doctor", str(folder), "--fix")
    assert (code, err) == (1, "")
    assert out == (
        "problem   state.json: unparseable: line 1, column 2: not valid JSON (Expecting "
        "property name enclosed in double quotes at line 1, column 2)\n"
        f"lock      state.json.lock: held by pid {pid} on {HOST}\n"
        f"not fixed state.json: state.json is locked by pid {pid}; run doctor again later\n"
        "fixed 0 of 1 problem(s); 1 remain\n"
    )
    assert (folder / "state.json").read_text() == "{"


def test_doctor_of_a_clean_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "doctor", str(tmp_path)) == (0, "no problems found\n", "")
    assert run(capsys, "doctor", str(tmp_path), "--fix") == (0, "no problems found\n", "")


def test_doctor_needs_a_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "doctor", str(tmp_path / "nope")) == (
        2,
        "",
        f"statestore: error: {tmp_path / 'nope'}: not a folder\n",
    )


# ------------------------------------------------------------------ demo, -m


def test_demo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "demo", "-n", "2", "-k", "5", "--dir", str(tmp_path))
    assert code == 0
    assert "final count:      10" in out and out.endswith("OK: no update lost\n")


def test_python_dash_m(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "statestore", "lock", "status", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        f"lock:     {tmp_path}/s.json.lock\nstate:    free\n",
        "",
    )
