"""Schema versions and migrations: chains, the newer-file guard, backups, failures, races."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, JsonValue
from strategies import Chain, json_documents, json_values, migration_chains, step_documents

from statestore import (
    MigrationError,
    MigrationReport,
    SchemaVersionError,
    StateNotFoundError,
    StateStore,
    StateStoreError,
)
from statestore._document import strip_stamp
from statestore.testing import fixture_files, upgrade_fixture, upgrade_fixtures, write_fixture

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry of a folder with its bytes (None for folders), to compare before/after."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


# --------------------------------------------------------------------------- the example
# A settings file that went through four schema versions.


class Size(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int
    unit: str


class Settings(BaseModel):
    """Version 4. extra="forbid": the store's own keys must never reach the model."""

    model_config = ConfigDict(extra="forbid")
    name: str
    color: str
    size: Size
    tags: list[str] = []


def v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """British spelling out."""
    doc["color"] = doc.pop("colour")
    return doc


def v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    """A bare pixel count becomes a size with a unit."""
    return {**doc, "size": {"value": doc["size"], "unit": "px"}}


def v3_to_v4(doc: dict[str, Any]) -> dict[str, Any]:
    """Comma-separated labels become a list of tags."""
    labels = doc.pop("labels", "")
    doc["tags"] = [t.strip() for t in labels.split(",") if t.strip()]
    return doc


STEPS = {1: v1_to_v2, 2: v2_to_v3, 3: v3_to_v4}
VERSION = 4

# The files each release wrote, byte for byte (version 1 predates the version key).
HISTORIC = {
    1: b'{"name": "lamp", "colour": "red", "size": 12, "labels": "desk, warm"}\n',
    2: b'{\n  "schema_version": 2,\n  "name": "lamp",\n  "color": "red",\n  "size": 12,\n'
    b'  "labels": "desk, warm"\n}\n',
    3: b'{\n  "schema_version": 3,\n  "name": "lamp",\n  "color": "red",\n'
    b'  "size": {"value": 12, "unit": "px"},\n  "labels": "desk,warm"\n}\n',
    4: b'{\n  "schema_version": 4,\n  "name": "lamp",\n  "color": "red",\n'
    b'  "size": {"value": 12, "unit": "px"},\n  "tags": ["desk", "warm"]\n}\n',
}
LAMP = Settings(name="lamp", color="red", size=Size(value=12, unit="px"), tags=["desk", "warm"])
NEWER = b'{\n  "schema_version": 5,\n  "title": "lamp",\n  "hue": 0\n}\n'


def settings_store(path: Path, **kw: Any) -> StateStore[Settings]:
    kw.setdefault("version", VERSION)
    kw.setdefault("migrations", STEPS)
    return StateStore(Settings, path, **kw)


def write_historic(path: Path, version: int) -> bytes:
    path.write_bytes(HISTORIC[version])
    return HISTORIC[version]


def on_disk(path: Path) -> dict[str, Any]:
    """The document in the file, without the commit stamp (which every commit changes)."""
    doc: dict[str, Any] = json.loads(path.read_bytes())
    doc.pop("$commit", None)
    return doc


def touch(state: Settings) -> None:
    state.tags.append("touched")


def in_transaction(store: StateStore[Settings]) -> None:
    with store.transaction() as state:
        state.tags.append("touched")


# Every way into a store, for the guards that must hold on all of them.
ENTRY_POINTS: dict[str, Callable[[StateStore[Settings]], object]] = {
    "load": lambda s: s.load(),
    "save": lambda s: s.save(LAMP),
    "update": lambda s: s.update(touch),
    "transaction": in_transaction,
    "migrate": lambda s: s.migrate(),
    "migrate-dry-run": lambda s: s.migrate(dry_run=True),
}
WRITERS = {k: ENTRY_POINTS[k] for k in ("save", "update", "transaction", "migrate")}


# ------------------------------------------------------------------------------ chains


@pytest.mark.parametrize("start", sorted(HISTORIC), ids=lambda v: f"v{v}")
def test_every_historic_file_loads_through_the_chain(tmp_path: Path, start: int) -> None:
    path = tmp_path / "state.json"
    original = write_historic(path, start)
    store = settings_store(path)
    assert store.load() == LAMP
    assert path.read_bytes() == original  # load() never writes
    assert listing(tmp_path) == {"state.json": original}


@pytest.mark.parametrize("start", [1, 2, 3], ids=lambda v: f"v{v}")
def test_update_upgrades_and_writes_the_current_version(tmp_path: Path, start: int) -> None:
    path = tmp_path / "state.json"
    write_historic(path, start)
    saved = settings_store(path).update(touch)
    assert saved.tags == ["desk", "warm", "touched"]
    doc = on_disk(path)
    assert doc["schema_version"] == VERSION
    assert next(iter(doc)) == "schema_version"
    assert Settings.model_validate({k: v for k, v in doc.items() if k != "schema_version"}) == saved


def test_steps_run_in_order_once_each_on_plain_data(tmp_path: Path) -> None:
    seen: list[tuple[int, dict[str, Any]]] = []

    def step(n: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def run(doc: dict[str, Any]) -> dict[str, Any]:
            seen.append((n, json.loads(json.dumps(doc))))
            return {**doc, "trail": [*doc.get("trail", []), n]}

        return run

    class Trail(BaseModel):
        model_config = ConfigDict(extra="forbid")
        trail: list[int]

    path = tmp_path / "state.json"
    path.write_bytes(b'{"$schema": "trail.json", "schema_version": 2, "trail": []}')
    store = StateStore(Trail, path, version=6, migrations={n: step(n) for n in range(2, 6)})
    assert store.load() == Trail(trail=[2, 3, 4, 5])
    # Each step got the previous step's output, without the store's own keys.
    assert seen == [
        (2, {"trail": []}),
        (3, {"trail": [2]}),
        (4, {"trail": [2, 3]}),
        (5, {"trail": [2, 3, 4]}),
    ]


def test_a_document_without_the_key_is_version_1(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_bytes(b'{"name": "lamp", "colour": "red", "size": 12, "labels": "desk, warm"}')
    b.write_bytes(
        b'{"schema_version": 1, "name": "lamp", "colour": "red", "size": 12, '
        b'"labels": "desk, warm"}'
    )
    assert settings_store(a).load() == settings_store(b).load() == LAMP
    assert settings_store(a).migrate().from_version == 1


def test_no_migrations_and_version_1_behaves_as_before(tmp_path: Path) -> None:
    class Counter(BaseModel):
        count: int = 0

    path = tmp_path / "state.json"
    path.write_bytes(b'{"count": 4}')
    store = StateStore(Counter, path)
    assert store.version == 1
    assert store.load() == Counter(count=4)
    assert store.update(lambda s: Counter(count=s.count + 1)) == Counter(count=5)
    assert on_disk(path) == {"schema_version": 1, "count": 5}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # same version: no backup
    assert store.migrate() == MigrationReport(str(path), 1, 1)


def test_a_forbid_model_keeps_working_with_the_store_keys(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"$schema": "settings.schema.json", ' + HISTORIC[1][1:])
    store = settings_store(path)
    assert store.load() == LAMP
    store.update(touch)
    doc = on_disk(path)
    assert list(doc)[:2] == ["$schema", "schema_version"]
    assert doc["$schema"] == "settings.schema.json"
    assert store.load().tags == ["desk", "warm", "touched"]
    store.save(LAMP)
    assert store.load() == LAMP


@pytest.mark.parametrize("key", ["schema_version", "$schema"])
def test_a_model_cannot_declare_the_store_keys(tmp_path: Path, key: str) -> None:
    from pydantic import Field

    class Clash(BaseModel):
        value: int = Field(0, alias=key)

    with pytest.raises(TypeError, match="written by the store itself"):
        StateStore(Clash, tmp_path / "state.json", version=2, migrations={1: dict})


# ---------------------------------------------------------------- fixtures per version


@pytest.fixture
def fixture_dir(tmp_path: Path) -> Path:
    """A fixture folder as a project keeps it: one file per historic version."""
    folder = tmp_path / "state-fixtures"
    folder.mkdir()
    for version, data in HISTORIC.items():
        (folder / f"v{version}.json").write_bytes(data)
    (folder / "README.md").write_text("Files written by each release.\n")
    return folder


def test_upgrade_fixtures_checks_every_version(fixture_dir: Path) -> None:
    before = listing(fixture_dir)
    results = upgrade_fixtures(
        Settings, fixture_dir, version=VERSION, migrations=STEPS, expected=LAMP
    )
    assert results == {1: LAMP, 2: LAMP, 3: LAMP, 4: LAMP}
    assert list(results) == [1, 2, 3, 4]
    assert listing(fixture_dir) == before  # fixtures are never modified


def test_fixture_files_for_parametrize(fixture_dir: Path) -> None:
    (fixture_dir / "v01.json").write_bytes(b"{}")  # not a version name: ignored
    (fixture_dir / "v7.json.orig").write_bytes(b"{}")
    files = fixture_files(fixture_dir)
    assert files == {n: fixture_dir / f"v{n}.json" for n in (1, 2, 3, 4)}
    for fixture in files.values():
        assert upgrade_fixture(Settings, fixture, version=VERSION, migrations=STEPS) == LAMP


def test_upgrade_fixtures_wants_every_historic_version(fixture_dir: Path) -> None:
    (fixture_dir / "v2.json").unlink()
    with pytest.raises(AssertionError, match=r"no fixture for version\(s\) 2"):
        upgrade_fixtures(Settings, fixture_dir, version=VERSION, migrations=STEPS)


def test_upgrade_fixtures_compares_with_expected(fixture_dir: Path) -> None:
    other = LAMP.model_copy(update={"color": "blue"})
    with pytest.raises(AssertionError, match=r"v1\.json: upgraded to"):
        upgrade_fixtures(Settings, fixture_dir, version=VERSION, migrations=STEPS, expected=other)
    upgrade_fixtures(
        Settings, fixture_dir, version=VERSION, migrations=STEPS, expected={2: LAMP, 4: LAMP}
    )
    with pytest.raises(AssertionError, match=r"v3\.json: upgraded to"):
        upgrade_fixtures(
            Settings, fixture_dir, version=VERSION, migrations=STEPS, expected={3: other}
        )
    with pytest.raises(AssertionError, match=r"version\(s\) 9, which have no fixture"):
        upgrade_fixtures(
            Settings, fixture_dir, version=VERSION, migrations=STEPS, expected={9: LAMP}
        )


def test_a_misnamed_fixture_is_reported(fixture_dir: Path) -> None:
    (fixture_dir / "v2.json").write_bytes(HISTORIC[3])
    with pytest.raises(AssertionError, match=r"v2\.json: the file declares schema_version 3"):
        upgrade_fixtures(Settings, fixture_dir, version=VERSION, migrations=STEPS)


def test_a_fixture_with_a_byte_order_mark_is_read_like_the_store_reads_it(
    fixture_dir: Path,
) -> None:
    (fixture_dir / "v2.json").write_bytes(b"\xef\xbb\xbf" + HISTORIC[2])
    assert upgrade_fixture(
        Settings, fixture_dir / "v2.json", version=VERSION, migrations=STEPS
    ) == (LAMP)


def test_an_empty_fixture_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="no fixture files"):
        upgrade_fixtures(Settings, tmp_path, version=VERSION, migrations=STEPS)


def test_a_broken_step_fails_the_fixture_check(fixture_dir: Path) -> None:
    def lost_unit(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "size": {"value": doc["size"]}}

    with pytest.raises(MigrationError, match=r"v1\.json|state\.json"):
        upgrade_fixtures(Settings, fixture_dir, version=VERSION, migrations={**STEPS, 2: lost_unit})


def test_a_step_that_drops_data_is_caught_by_expected(fixture_dir: Path) -> None:
    def forget_tags(doc: dict[str, Any]) -> dict[str, Any]:
        doc.pop("labels", None)
        return doc

    with pytest.raises(AssertionError, match=r"v1\.json: upgraded to"):
        upgrade_fixtures(
            Settings,
            fixture_dir,
            version=VERSION,
            migrations={**STEPS, 3: forget_tags},
            expected=LAMP,
        )


def test_write_fixture_keeps_the_current_format(tmp_path: Path) -> None:
    path = write_fixture(LAMP, tmp_path, version=VERSION)
    assert path == tmp_path / "v4.json"
    assert sorted(os.listdir(tmp_path)) == ["v4.json"]
    other = tmp_path / "other.json"
    settings_store(other).save(LAMP)
    assert strip_stamp(path.read_bytes()) == strip_stamp(other.read_bytes())
    with pytest.raises(FileExistsError):
        write_fixture(LAMP.model_copy(update={"name": "new"}), tmp_path, version=VERSION)
    assert strip_stamp(path.read_bytes()) == strip_stamp(other.read_bytes())
    assert upgrade_fixture(Settings, path, version=VERSION, migrations=STEPS) == LAMP


# -------------------------------------------------------------------- newer-file guard


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("which", ["previous-release", "first-release", "with-default"])
def test_a_newer_file_is_refused_and_never_written(tmp_path: Path, entry: str, which: str) -> None:
    path = tmp_path / "state.json"
    if which == "first-release":  # a release from before migrations existed
        path.write_bytes(HISTORIC[4])
        store: StateStore[Settings] = StateStore(Settings, path)
        found, ours = 4, 1
    else:
        path.write_bytes(NEWER)
        store = (
            settings_store(path, default=LAMP)
            if which == "with-default"
            else (settings_store(path))
        )
        found, ours = 5, VERSION
    before = listing(tmp_path)
    mtime = path.stat().st_mtime_ns
    with pytest.raises(SchemaVersionError) as info:
        ENTRY_POINTS[entry](store)
    assert str(path) in str(info.value)
    assert f"version {found}" in str(info.value) and f"version {ours}" in str(info.value)
    assert info.value.path == str(path)
    assert listing(tmp_path) == before
    assert path.stat().st_mtime_ns == mtime


def test_user_code_never_sees_a_newer_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(NEWER)
    store = settings_store(path)
    called: list[object] = []
    with pytest.raises(SchemaVersionError):
        store.update(called.append)
    with pytest.raises(SchemaVersionError), store.transaction() as state:
        called.append(state)  # pragma: no cover - the guard comes first
    assert called == []
    assert path.read_bytes() == NEWER


def test_schema_version_error_is_a_value_error_and_pickles(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(NEWER)
    with pytest.raises(SchemaVersionError) as info:
        settings_store(path).load()
    assert isinstance(info.value, StateStoreError) and isinstance(info.value, ValueError)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is SchemaVersionError and str(again) == str(info.value)


@pytest.mark.parametrize(
    "value", ['"2"', "2.0", "0", "-1", "true", "null", "[2]"], ids=lambda v: f"schema_version={v}"
)
def test_a_bad_version_key_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "state.json"
    data = f'{{"schema_version": {value}, "name": "lamp"}}'.encode()
    path.write_bytes(data)
    for entry in ("load", "update", "migrate"):
        with pytest.raises(SchemaVersionError, match="schema_version"):
            ENTRY_POINTS[entry](settings_store(path))
    assert listing(tmp_path) == {"state.json": data}


# ------------------------------------------------------------------------------- backups


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("start", [1, 2, 3], ids=lambda v: f"v{v}")
def test_the_first_upgrading_write_keeps_the_original_bytes(
    tmp_path: Path, writer: str, start: int
) -> None:
    path = tmp_path / "state.json"
    original = write_historic(path, start)
    WRITERS[writer](settings_store(path))
    backup = tmp_path / f"state.json.v{start}.bak"
    assert backup.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == sorted(["state.json", backup.name])
    assert on_disk(path)["schema_version"] == VERSION


def test_the_backup_is_written_once_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    backup = tmp_path / "state.json.v1.bak"
    original = write_historic(path, 1)
    store = settings_store(path)
    store.update(touch)
    first = backup.stat()
    store.update(touch)
    store.save(LAMP)
    assert store.migrate().written is False
    assert backup.read_bytes() == original
    assert (backup.stat().st_ino, backup.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    # Another version-1 file upgraded later does not replace the first backup.
    path.write_bytes(HISTORIC[1].replace(b"lamp", b"desk"))
    report = store.migrate()
    assert report.written and report.backup == str(backup)
    assert backup.read_bytes() == original
    assert store.load().name == "desk"
    # A file of another version gets its own backup.
    path.write_bytes(HISTORIC[2])
    store.update(touch)
    assert (tmp_path / "state.json.v2.bak").read_bytes() == HISTORIC[2]
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.v1.bak", "state.json.v2.bak"]


def test_no_backup_without_an_upgrade_or_without_a_write(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_historic(path, 4)
    store = settings_store(path)
    store.update(touch)
    store.save(LAMP)
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # already current

    original = write_historic(path, 1)

    def refuse(state: Settings) -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.update(refuse)
    with pytest.raises(RuntimeError), store.transaction():
        raise RuntimeError("no")
    store.load()
    assert listing(tmp_path) == {"state.json": original}


def test_the_backup_keeps_the_mode_of_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_historic(path, 1)
    path.chmod(0o600)
    settings_store(path).migrate()
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state.json.v1.bak").stat().st_mode & 0o777 == 0o600


def test_a_missing_file_is_created_at_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = settings_store(path, default=LAMP)
    store.update(touch)
    assert on_disk(path)["schema_version"] == VERSION
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
    with pytest.raises(StateNotFoundError):
        settings_store(tmp_path / "none.json").migrate()
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


# ----------------------------------------------------------------------------- migrate()


def test_dry_run_writes_nothing_and_reports_what_migrate_does(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_historic(path, 2)
    store = settings_store(path)
    mtime = path.stat().st_mtime_ns
    dry = store.migrate(dry_run=True)
    assert listing(tmp_path) == {"state.json": original}
    assert path.stat().st_mtime_ns == mtime
    backup = str(tmp_path / "state.json.v2.bak")
    assert (dry.from_version, dry.to_version, dry.steps) == (2, 4, (2, 3))
    assert (dry.backup, dry.written, dry.dry_run) == (backup, False, True)
    assert "would upgrade from version 2 to 4" in str(dry)

    real = store.migrate()
    assert (real.from_version, real.to_version, real.steps) == (2, 4, (2, 3))
    assert (real.backup, real.written, real.dry_run) == (backup, True, False)
    assert Path(backup).read_bytes() == original
    assert store.load() == LAMP
    assert str(real) == f"{path}: upgraded from version 2 to 4 (2->3, 3->4); backup at {backup}"

    after = listing(tmp_path)
    for dry_run in (True, False):
        done = store.migrate(dry_run=dry_run)
        assert (done.from_version, done.to_version, done.steps) == (4, 4, ())
        assert (done.backup, done.written) == (None, False)
        assert listing(tmp_path) == after


# ------------------------------------------------------------------------ failing steps


def _raises(doc: dict[str, Any]) -> dict[str, Any]:
    raise KeyError("size_px")


def _returns_none(doc: dict[str, Any]) -> dict[str, Any]:
    doc["size"] = {"value": doc["size"], "unit": "px"}  # changes its input, then forgets to return


def _returns_list(doc: dict[str, Any]) -> Any:
    return list(doc.items())


def _breaks_the_model(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "size": {"value": "twelve", "unit": "px"}}


FAILING = {
    "raises": (_raises, r"\(_raises\) raised KeyError: 'size_px'"),
    "returns-none": (_returns_none, r"\(_returns_none\) returned NoneType, not a dict"),
    "returns-list": (_returns_list, r"\(_returns_list\) returned list, not a dict"),
    "fails-the-model": (_breaks_the_model, r"does not fit Settings"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", FAILING)
def test_a_failing_step_raises_and_leaves_the_file_untouched(
    tmp_path: Path, kind: str, entry: str
) -> None:
    path = tmp_path / "state.json"
    write_historic(path, 1)
    bad, detail = FAILING[kind]
    # The failing step is 2->3; for "fails-the-model" it is also the last step.
    steps = {1: v1_to_v2, 2: bad} if kind == "fails-the-model" else {**STEPS, 2: bad}
    version = 3 if kind == "fails-the-model" else VERSION
    before = listing(tmp_path)
    store = settings_store(path, version=version, migrations=steps)
    with pytest.raises(MigrationError) as info:
        ENTRY_POINTS[entry](store)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "step 2->3" in message
    assert re.search(detail, message), message
    assert "the file was not changed" in message
    assert info.value.path == str(path)
    assert isinstance(info.value, StateStoreError) and isinstance(info.value, ValueError)
    if kind == "raises":
        assert isinstance(info.value.__cause__, KeyError)
    assert listing(tmp_path) == before


def test_a_failing_step_does_not_block_a_store_at_the_file_version(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_historic(path, 2)
    with pytest.raises(MigrationError):
        settings_store(path, migrations={**STEPS, 2: _raises}).migrate()
    assert path.read_bytes() == original
    # The fixed release upgrades the untouched original.
    assert settings_store(path).migrate().written
    assert (tmp_path / "state.json.v2.bak").read_bytes() == original


# ---------------------------------------------------------------------- bad chains


@pytest.mark.parametrize(
    ("version", "migrations", "named"),
    [
        (4, {1: v1_to_v2, 3: v3_to_v4}, r"gap: no step for version\(s\) 2 "),
        (6, {1: v1_to_v2, 4: v3_to_v4}, r"gap: no step for version\(s\) 2, 3, 5 "),
        (4, {**STEPS, 4: v3_to_v4}, r"step for version 4, but the store's version is 4"),
        (4, {**STEPS, 7: v3_to_v4}, r"step for version 7, but the store's version is 4"),
        (1, {1: v1_to_v2}, r"step for version 1, but the store's version is 1"),
        (4, {0: v1_to_v2, **STEPS}, r"migration key 0 is not a version"),
        (4, {"1": v1_to_v2, 2: v2_to_v3, 3: v3_to_v4}, r"migration key '1' is not a version"),
        (4, {True: v1_to_v2, 2: v2_to_v3, 3: v3_to_v4}, r"migration key True is not a version"),
        (4, {1: v1_to_v2, 2: "v2_to_v3", 3: v3_to_v4}, r"migration step 2 is not callable"),
        (0, None, r"version must be an integer >= 1, not 0"),
        (True, None, r"version must be an integer >= 1, not True"),
        ("2", None, r"version must be an integer >= 1, not '2'"),
    ],
    ids=[
        "gap",
        "gaps",
        "step-at-version",
        "step-above-version",
        "step-at-version-1",
        "key-0",
        "key-str",
        "key-bool",
        "not-callable",
        "version-0",
        "version-bool",
        "version-str",
    ],
)
def test_a_bad_chain_is_refused_when_the_store_is_created(
    tmp_path: Path, version: Any, migrations: Any, named: str
) -> None:
    path = tmp_path / "state.json"
    with pytest.raises(SchemaVersionError, match=named) as info:
        StateStore(Settings, path, version=version, migrations=migrations)
    assert info.value.path == str(path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_file_older_than_the_oldest_step_is_refused_on_read(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "state.json"
    original = write_historic(path, 1)
    store = settings_store(path, migrations={2: v2_to_v3, 3: v3_to_v4})  # created fine
    with pytest.raises(SchemaVersionError, match=r"version 1, older than the oldest .* \(2\)"):
        ENTRY_POINTS[entry](store)
    assert listing(tmp_path) == {"state.json": original}
    path.write_bytes(HISTORIC[2])
    assert store.load() == LAMP


def test_a_version_bump_without_steps_says_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_historic(path, 2)
    store = settings_store(path, version=4, migrations=None)  # the steps were forgotten
    for entry in ("load", "update", "migrate"):
        with pytest.raises(
            SchemaVersionError,
            match=r"version 2, but this store is at version 4 and has no migration steps; "
            r"add a step for each version from 2 to 3",
        ):
            ENTRY_POINTS[entry](store)
    assert listing(tmp_path) == {"state.json": original}


# ------------------------------------------------------------------ racing processes


def _tally_1_to_2(doc: dict[str, Any]) -> dict[str, Any]:
    _log_step(1)
    return {"count": doc["n"]}


def _tally_2_to_3(doc: dict[str, Any]) -> dict[str, Any]:
    _log_step(2)
    return {**doc, "by": {}}


TALLY_STEPS = {1: _tally_1_to_2, 2: _tally_2_to_3}


class Tally(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int
    by: dict[str, int]


def _log_step(n: int) -> None:
    # Every run of a step, in any process, leaves a line: the upgrade must happen once.
    with open(os.environ["STATESTORE_TEST_STEP_LOG"], "a") as f:
        f.write(f"{n} {os.getpid()}\n")


def _wait_for(path: str) -> None:
    end = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.001)


def _race_store(path: str) -> StateStore[Tally]:
    return StateStore(Tally, path, version=3, migrations=TALLY_STEPS, timeout=60)


def _race_update(path: str, ctl: str, name: str, times: int) -> None:
    store = _race_store(path)
    Path(ctl, f"ready-{name}").touch()
    _wait_for(os.path.join(ctl, "start"))
    for _ in range(times):

        def bump(state: Tally) -> None:
            state.count += 1
            state.by[name] = state.by.get(name, 0) + 1

        store.update(bump)


def _race_migrate(path: str, ctl: str) -> None:
    store = _race_store(path)
    Path(ctl, "ready-migrate").touch()
    _wait_for(os.path.join(ctl, "start"))
    report = store.migrate()
    report_file = Path(ctl, "report")
    report_file.write_text(json.dumps({"from": report.from_version, "written": report.written}))


@pytest.mark.timeout(90)
def test_a_migration_racing_with_updates_from_other_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, ctl = tmp_path / "data", tmp_path / "ctl"
    data.mkdir()
    ctl.mkdir()
    path = data / "state.json"
    original = b'{"n": 7}\n'
    path.write_bytes(original)
    log = ctl / "steps.log"
    monkeypatch.setenv("STATESTORE_TEST_STEP_LOG", str(log))  # inherited by the children
    workers, times = 4, 25
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_race_update, args=(str(path), str(ctl), f"w{i}", times))
        for i in range(workers)
    ]
    procs.append(ctx.Process(target=_race_migrate, args=(str(path), str(ctl))))
    for p in procs:
        p.start()
    try:
        for name in [f"w{i}" for i in range(workers)] + ["migrate"]:
            _wait_for(str(ctl / f"ready-{name}"))
        (ctl / "start").touch()  # every child is ready: release them together
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():  # pragma: no cover - only after a failure
                p.kill()
    steps = [line.split()[0] for line in log.read_text().splitlines()]
    assert steps == ["1", "2"]  # the chain ran once, in one process
    assert (data / "state.json.v1.bak").read_bytes() == original
    final = _race_store(str(path)).load()
    assert final == Tally(count=7 + workers * times, by={f"w{i}": times for i in range(workers)})
    assert on_disk(path)["schema_version"] == 3
    report = json.loads((ctl / "report").read_text())
    assert report["from"] in (1, 3) and report["written"] == (report["from"] == 1)
    assert sorted(os.listdir(data)) == ["state.json", "state.json.v1.bak"]


# -------------------------------------------------------------------- property-based


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    count: int
    ratio: float
    tags: list[str]
    data: dict[str, JsonValue]
    parent: int | None = None


records = st.builds(
    Record,
    name=st.text(st.characters(codec="utf-8")),
    count=st.integers(-(2**63), 2**63 - 1),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    tags=st.lists(st.text(st.characters(codec="utf-8"), max_size=5), max_size=4),
    data=json_documents(),
    parent=st.none() | st.integers(0, 10**6),
)


class Loose(BaseModel):
    """Whatever the steps leave: the document's keys are the model's extra fields."""

    model_config = ConfigDict(extra="allow")


@PROPERTY
@given(record=records, version=st.integers(1, 5))
def test_save_then_load_round_trips_with_deterministic_bytes(
    tmp_path_factory: pytest.TempPathFactory, record: Record, version: int
) -> None:
    folder = tmp_path_factory.mktemp("roundtrip")
    steps = {n: dict for n in range(1, version)}
    a = StateStore(Record, folder / "a.json", version=version, migrations=steps, durable=False)
    b = StateStore(Record, folder / "b.json", version=version, migrations=steps, durable=False)
    a.save(record)
    assert a.load() == record
    data = (folder / "a.json").read_bytes()
    doc = json.loads(data)
    assert doc.pop("schema_version") == version
    doc.pop("$commit")
    assert Record.model_validate(doc) == record
    b.save(record.model_copy(deep=True))
    # The same state, the same bytes (but for the commit stamp).
    assert strip_stamp((folder / "b.json").read_bytes()) == strip_stamp(data)
    inode = (folder / "a.json").stat().st_ino
    a.save(a.load())  # nothing changed: the file is not rewritten
    assert (folder / "a.json").stat().st_ino == inode
    assert (folder / "a.json").read_bytes() == data


@PROPERTY
@given(chain=migration_chains(), doc=step_documents(), data=st.data())
def test_a_chain_gives_the_steps_applied_in_order(
    tmp_path_factory: pytest.TempPathFactory, chain: Chain, doc: dict[str, Any], data: st.DataObject
) -> None:
    start = data.draw(st.integers(chain.start, chain.version), label="file version")
    folder = tmp_path_factory.mktemp("chain")
    path = folder / "state.json"
    original = json.dumps({"schema_version": start, **doc}).encode()
    path.write_bytes(original)
    expected = chain.apply(doc, start)
    store = StateStore(
        Loose, path, version=chain.version, migrations=chain.migrations(), durable=False
    )
    assert store.load().model_dump() == expected
    assert path.read_bytes() == original
    report = store.migrate()
    assert report.steps == tuple(range(start, chain.version))
    assert report.written == (start < chain.version)
    assert on_disk(path) == {"schema_version": chain.version, **expected}
    backup = folder / f"state.json.v{start}.bak"
    if start < chain.version:
        assert backup.read_bytes() == original
    else:
        assert not backup.exists()
    assert store.load().model_dump() == expected


@PROPERTY
@given(doc=json_documents(), value=json_values())
def test_steps_see_the_json_data_of_the_file(
    tmp_path_factory: pytest.TempPathFactory, doc: dict[str, Any], value: Any
) -> None:
    seen: list[dict[str, Any]] = []

    def keep(d: dict[str, Any]) -> dict[str, Any]:
        seen.append(json.loads(json.dumps(d)))
        return {"data": {**d, "added": value}}

    class Wrapped(BaseModel):
        data: dict[str, JsonValue]

    path = tmp_path_factory.mktemp("data") / "state.json"
    path.write_text(json.dumps(doc))
    store = StateStore(Wrapped, path, version=2, migrations={1: keep}, durable=False)
    assert store.load() == Wrapped(data={**doc, "added": value})
    assert seen == [doc]
