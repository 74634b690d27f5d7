"""Helpers for testing a migration chain against real files from every old version.

Keep one fixture file per historic schema version, written by the release that
used that version, in a folder of your tests::

    tests/state-fixtures/v1.json
    tests/state-fixtures/v2.json
    tests/state-fixtures/v3.json      (optional: the current version)

then check that each one still upgrades to a valid model::

    from statestore.testing import upgrade_fixtures

    def test_old_state_files_upgrade():
        upgrade_fixtures(Settings, "tests/state-fixtures", version=3, migrations=MIGRATIONS)

or one test per file, so a failure names the version::

    @pytest.mark.parametrize("fixture", fixture_files("tests/state-fixtures").values(), ids=str)
    def test_old_state_file_upgrades(fixture):
        upgrade_fixture(Settings, fixture, version=3, migrations=MIGRATIONS)

Fixture files are never modified: each is copied into a temporary folder
first. Before bumping ``version``, save the current format with
:func:`write_fixture`, so that the file of every version stays in the folder.
Helpers raise :class:`AssertionError` when a check fails, and let the store's
own errors (:class:`~statestore.MigrationError`,
:class:`~statestore.SchemaVersionError`, ...) propagate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TypeVar

from pydantic import BaseModel

from ._migrate import VERSION_KEY, Migrations, Migrator
from ._store import StateStore

__all__ = ["fixture_files", "upgrade_fixture", "upgrade_fixtures", "write_fixture"]

ModelT = TypeVar("ModelT", bound=BaseModel)

_NAME: Final = re.compile(r"v([1-9][0-9]*)\.json")


def fixture_files(directory: str | os.PathLike[str]) -> dict[int, Path]:
    """The fixture files ``<directory>/v<N>.json``, by version ``N``, oldest first.

    Other files in the folder are ignored. A folder without any fixture is an
    error (a typo in the path would otherwise test nothing).
    """
    folder = Path(directory)
    found: dict[int, Path] = {}
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and entry.is_file():
            found[int(match.group(1))] = entry
    if not found:
        raise AssertionError(f"{folder}: no fixture files named v<N>.json")
    return dict(sorted(found.items()))


def _declared_version(data: bytes, fixture: Path) -> int:
    try:
        doc = json.loads(data.decode("utf-8-sig"))  # the store accepts a byte-order mark too
    except ValueError as e:
        raise AssertionError(f"{fixture}: not a JSON document ({e})") from e
    if not isinstance(doc, dict):
        raise AssertionError(f"{fixture}: not a JSON object")
    version = doc.get(VERSION_KEY, 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise AssertionError(f"{fixture}: {VERSION_KEY!r} is {version!r}, not an integer")
    return version


def upgrade_fixture(
    model: type[ModelT],
    fixture: str | os.PathLike[str],
    *,
    version: int,
    migrations: Migrations | None = None,
) -> ModelT:
    """Upgrade one fixture file ``v<N>.json`` through the chain; return the model it gives.

    On a copy of the file, checks that:

    * the document declares version ``N``, the one in its name (no key means 1);
    * ``load()`` upgrades it in memory and validates it against ``model``;
    * ``migrate()`` writes version ``version``, keeps a backup equal to the
      original bytes (when ``N < version``), and the written file loads back
      as the same model;
    * a second ``migrate()`` has nothing to do.

    The arguments are the ones given to :class:`~statestore.StateStore`.
    """
    source = Path(fixture)
    match = _NAME.fullmatch(source.name)
    if match is None:
        raise AssertionError(f"{source}: a fixture file is named v<N>.json")
    named = int(match.group(1))
    original = source.read_bytes()
    declared = _declared_version(original, source)
    if declared != named:
        raise AssertionError(
            f"{source}: the file declares {VERSION_KEY} {declared}, but its name says {named}"
        )
    with tempfile.TemporaryDirectory(prefix="statestore-fixture-") as tmp:
        copy = Path(tmp) / "state.json"
        shutil.copyfile(source, copy)
        store = StateStore(model, copy, version=version, migrations=migrations)
        loaded = store.load()
        if copy.read_bytes() != original:
            raise AssertionError(f"{source}: load() changed the file")
        report = store.migrate()
        if (report.from_version, report.to_version) != (named, version):
            raise AssertionError(
                f"{source}: migrate() went from version {report.from_version} to "
                f"{report.to_version}, expected {named} to {version}"
            )
        if named < version and (
            report.backup is None or Path(report.backup).read_bytes() != original
        ):
            raise AssertionError(f"{source}: migrate() kept no backup of the original bytes")
        written = copy.read_bytes()
        if _declared_version(written, copy) != version:
            raise AssertionError(f"{source}: the migrated file does not declare version {version}")
        again = store.load()
        if again != loaded:
            raise AssertionError(
                f"{source}: the migrated file loads as {again!r}, but the upgrade in "
                f"memory gave {loaded!r}"
            )
        if store.migrate().written or copy.read_bytes() != written:
            raise AssertionError(f"{source}: a second migrate() rewrote the file")
    return loaded


def upgrade_fixtures(
    model: type[ModelT],
    directory: str | os.PathLike[str],
    *,
    version: int,
    migrations: Migrations | None = None,
    expected: ModelT | Mapping[int, ModelT] | None = None,
) -> dict[int, ModelT]:
    """Run :func:`upgrade_fixture` on every ``v<N>.json`` in ``directory``.

    Every historic version the chain can read (from the oldest step up to
    ``version - 1``) must have a fixture. ``expected``, if given, is the model
    every fixture must upgrade to, or a mapping from fixture versions to the
    models they must upgrade to (fixtures missing from it are only checked to
    upgrade). Returns the upgraded models by fixture version.
    """
    files = fixture_files(directory)
    oldest = Migrator(version, migrations, os.fspath(directory)).oldest  # checks the chain too
    missing = [n for n in range(oldest, version) if n not in files]
    if missing:
        raise AssertionError(
            f"{directory}: no fixture for version(s) {', '.join(map(str, missing))}; "
            f"add v<N>.json written by the release that used each version"
        )
    results = {
        n: upgrade_fixture(model, path, version=version, migrations=migrations)
        for n, path in files.items()
    }
    if isinstance(expected, Mapping):
        unknown = sorted(set(expected) - set(files))
        if unknown:
            raise AssertionError(
                f"{directory}: expected models for version(s) "
                f"{', '.join(map(str, unknown))}, which have no fixture"
            )
    if expected is not None:
        for n, got in results.items():
            want = expected if isinstance(expected, BaseModel) else expected.get(n)
            if want is not None and got != want:
                raise AssertionError(f"{files[n]}: upgraded to {got!r}, expected {want!r}")
    return results


def write_fixture(state: BaseModel, directory: str | os.PathLike[str], *, version: int) -> Path:
    """Save ``state`` as ``<directory>/v<version>.json``, as a store at ``version`` writes it.

    Run it once, before changing the model, to keep a file of the current
    format. An existing fixture is history and is never replaced.
    """
    path = Path(directory) / f"v{version}.json"
    if path.exists():
        raise FileExistsError(f"{path}: a fixture of version {version} exists; keep it")
    StateStore(type(state), path, version=version).save(state)
    return path
