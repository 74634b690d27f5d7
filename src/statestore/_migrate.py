"""Schema versions and chained migrations.

A stored document carries its schema version as a top-level ``"schema_version"``
key (a document without it is version 1). A migration step for version ``n`` is
a plain function on JSON data that turns a version-``n`` document into a
version-``n + 1`` document; the chain runs from the file's version up to the
store's, and only the result is validated against the model (validating an old
document against the new model first crashes apps: conf#173).

A document newer than the code is never rewritten by it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import MigrationError, SchemaVersionError

__all__ = ["VERSION_KEY", "MigrationReport", "Migrations", "Migrator"]

VERSION_KEY: Final = "schema_version"

#: ``migrations[n]`` turns a version-``n`` document into a version-``n + 1`` one.
Migrations = Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]]


@dataclass(frozen=True)
class MigrationReport:
    """What :meth:`StateStore.migrate` did (or, with ``dry_run``, would do)."""

    path: str
    from_version: int
    to_version: int
    steps: tuple[int, ...] = ()
    backup: str | None = None
    written: bool = False
    dry_run: bool = False
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        if self.from_version == self.to_version:
            return f"{self.path}: already at version {self.to_version}; nothing to do"
        verb = "would upgrade" if self.dry_run else "upgraded"
        steps = ", ".join(f"{n}->{n + 1}" for n in self.steps)
        text = (
            f"{self.path}: {verb} from version {self.from_version} to {self.to_version} ({steps})"
        )
        if self.backup:
            text += f"; backup {'at' if not self.dry_run else 'would go to'} {self.backup}"
        return text


class Migrator:
    """Checks a migration chain once, then upgrades documents through it."""

    def __init__(self, version: int, migrations: Migrations | None, location: str) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SchemaVersionError(location, f"version must be an integer >= 1, not {version!r}")
        self.version = version
        self.steps: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = dict(migrations or {})
        for n, fn in self.steps.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise SchemaVersionError(location, f"migration key {n!r} is not a version >= 1")
            if n >= version:
                raise SchemaVersionError(
                    location,
                    f"there is a migration step for version {n}, but the store's version is "
                    f"{version}: a step for {n} would produce version {n + 1}. Raise 'version' "
                    f"to {n + 1} or remove the step",
                )
            if not callable(fn):
                raise SchemaVersionError(location, f"migration step {n} is not callable")
        self.oldest = min(self.steps) if self.steps else version
        missing = [n for n in range(self.oldest, version) if n not in self.steps]
        if missing:
            raise SchemaVersionError(
                location,
                f"the migration chain has a gap: no step for version(s) "
                f"{', '.join(map(str, missing))} (steps exist for {sorted(self.steps)}, "
                f"the store is at version {version})",
            )

    def version_of(self, doc: Mapping[str, Any], location: str) -> int:
        """The schema version a document declares (1 when it declares none)."""
        raw = doc.get(VERSION_KEY, 1)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise SchemaVersionError(
                location, f"{VERSION_KEY!r} is {raw!r}; it must be an integer >= 1"
            )
        return raw

    def check_readable(self, found: int, location: str) -> None:
        """Raise unless a document at version ``found`` can be brought to ours."""
        if found > self.version:
            raise SchemaVersionError(
                location,
                f"the file is at schema version {found}, newer than this program's "
                f"version {self.version}: it was written by a newer release. Upgrade this "
                "program; the file was not changed",
            )
        if found < self.oldest and not self.steps:
            # Most often a version bump without its step: "use an older release" misleads.
            raise SchemaVersionError(
                location,
                f"the file is at schema version {found}, but this store is at version "
                f"{self.version} and has no migration steps; add a step for each version "
                f"from {found} to {self.version - 1}. The file was not changed",
            )
        if found < self.oldest:
            raise SchemaVersionError(
                location,
                f"the file is at schema version {found}, older than the oldest migration "
                f"step ({self.oldest}); this release cannot upgrade it. Upgrade it with an "
                "older release first; the file was not changed",
            )

    def upgrade(self, doc: dict[str, Any], location: str) -> tuple[dict[str, Any], tuple[int, ...]]:
        """Run the chain on ``doc``; returns the new document (without the version key)."""
        found = self.version_of(doc, location)
        self.check_readable(found, location)
        doc = {k: v for k, v in doc.items() if k != VERSION_KEY}
        ran = []
        for n in range(found, self.version):
            step = self.steps[n]
            name = getattr(step, "__qualname__", repr(step))
            try:
                out = step(doc)
            except Exception as e:
                raise MigrationError(
                    location,
                    f"migration step {n}->{n + 1} ({name}) raised "
                    f"{type(e).__name__}: {e}; the file was not changed",
                ) from e
            if not isinstance(out, dict):
                raise MigrationError(
                    location,
                    f"migration step {n}->{n + 1} ({name}) returned "
                    f"{type(out).__name__}, not a dict; the file was not changed",
                )
            doc = {k: v for k, v in out.items() if k != VERSION_KEY}
            ran.append(n)
        return doc, tuple(ran)
