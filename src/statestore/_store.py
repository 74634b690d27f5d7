"""StateStore: a typed JSON document that many processes update without losing a write."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from ._errors import (
    MigrationError,
    NestedTransactionError,
    StateCorruptError,
    StateNotFoundError,
    StateValidationError,
)
from ._lock import DirectoryLock
from ._migrate import VERSION_KEY, MigrationReport, Migrations, Migrator
from ._schema import Draft, document_schema
from .backends import Session, Storage
from .backends.file import FileStorage

__all__ = ["SCHEMA_KEY", "ModelT", "StateStore"]

ModelT = TypeVar("ModelT", bound=BaseModel)

#: The key an editor reads to find a document's JSON Schema.
SCHEMA_KEY: Final = "$schema"
_RESERVED: Final = (VERSION_KEY, SCHEMA_KEY)

# (thread, document) pairs inside a transaction, across every store object in the
# process: update() on a second store object for the same file would otherwise
# commit, then be overwritten by the outer transaction's commit.
_active: set[tuple[int, str]] = set()
_active_lock = threading.Lock()


def _forget_transactions_after_fork() -> None:
    """A forked child is inside none of its parent's transactions (it holds no lock)."""
    global _active_lock
    _active_lock = threading.Lock()
    _active.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_transactions_after_fork)


_SCHEMA_LINE: Final = f'  "{SCHEMA_KEY}": '.encode()

_gc_lock = threading.Lock()
#: Objects allocated during a pause above which they are promoted without a scan.
_GC_PROMOTE_AFTER: Final = 10_000
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Keep Python's cyclic garbage collector off while pydantic builds or walks a model.

    Validating a large document allocates hundreds of thousands of objects, none
    of them garbage, and each allocation burst triggers a full collection that
    scans them all again: at 1 MB that is most of an update's time. Pauses nest
    across threads; the collector's state is restored when the last one ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                # Re-enabling alone would only postpone the work: the next allocation
                # would start a collection that scans every object made during the
                # pause. When that is a large model, move the young objects straight
                # to the oldest generation instead (freeze, then unfreeze: no scan).
                # Skipped when the program froze objects itself, so as not to undo it.
                if gc.get_count()[0] > _GC_PROMOTE_AFTER and gc.get_freeze_count() == 0:
                    gc.freeze()
                    gc.unfreeze()
                if _gc_was_enabled:
                    gc.enable()


@dataclass
class _Loaded(Generic[ModelT]):
    """A document as found under the lock."""

    model: ModelT
    raw: bytes | None  # None: no file yet (the default was used)
    version: int
    schema: str | None  # the "$schema" the file carried
    digest: bytes | None = None  # stands in for a large ``raw`` once it was let go

    def shed_raw(self, current: int) -> None:
        """Keep a digest instead of the bytes of a large file at the current version.

        The bytes are needed only to skip a save that changes nothing (and, for
        an older version, for the backup); a collision-resistant digest does the
        first, and a large document should not be held twice during a save.
        ``raw`` becomes empty (the file still exists).
        """
        if self.version == current and self.raw is not None and len(self.raw) > _SHED_ABOVE:
            self.digest = _digest(self.raw)
            self.raw = b""

    def unchanged(self, data: bytes) -> bool:
        """Whether ``data`` is exactly what the file holds."""
        if self.digest is not None:
            # The length first: a save that changes the size needs no hash at all.
            return self.digest.startswith(_length(data)) and _digest(data) == self.digest
        return data == self.raw


#: Files larger than this are compared by digest, not kept in memory during a save.
_SHED_ABOVE: Final = 256 * 1024


def _length(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little")


def _digest(data: bytes) -> bytes:
    # SHA-256, not BLAKE2: CPUs with SHA instructions (most x86-64 and ARMv8 of the
    # last years) hash 2 MB in about 1 ms with it, against 3 ms for BLAKE2b.
    return _length(data) + hashlib.sha256(data).digest()


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of a byte offset."""
    before = data[:offset]
    line = before.count(b"\n") + 1
    return line, offset - (before.rfind(b"\n") + 1) + 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _may_hold_constants(data: bytes) -> bool:
    """Whether ``data`` might hold a ``NaN`` or ``Infinity`` literal (never a false no).

    pydantic's parser accepts both, which JSON does not have; the store refuses
    them everywhere. Two byte searches (memchr) clear almost every document in
    microseconds; only one with these words somewhere (in a string, say) needs
    a closer look.
    """
    if b"N" not in data and b"I" not in data:
        return False
    return b"NaN" in data or b"Infinity" in data


def _constant_in(data: bytes) -> str | None:
    """The first ``NaN``/``Infinity`` literal outside strings in JSON ``data``, if any."""
    if not _may_hold_constants(data):
        return None
    found: list[str] = []

    def seen(name: str) -> None:
        found.append(name)

    try:
        json.loads(data, parse_constant=seen)
    except (ValueError, RecursionError):
        return None  # not JSON at all: the validation that follows says so
    return found[0] if found else None


def _errors_of(e: ValidationError) -> list[dict[str, Any]]:
    # Through JSON so that every value is plain data (picklable, printable).
    try:
        errors: list[dict[str, Any]] = json.loads(e.json(include_url=False))
    except ValueError:
        # The input holds text that is not Unicode (a lone surrogate such as "\ud800",
        # valid JSON escape syntax): pydantic cannot write it as JSON. Keep the rest.
        errors = [
            {"type": err["type"], "loc": list(err["loc"]), "msg": err["msg"]}
            for err in e.errors(include_url=False)
        ]
    return errors


class StateStore(Generic[ModelT]):
    """A JSON state file validated by a pydantic model, safe to update from many processes.

    >>> class Counter(BaseModel):  # doctest: +SKIP
    ...     count: int = 0
    >>> store = StateStore(Counter, "state.json", default=Counter)  # doctest: +SKIP
    >>> store.update(lambda s: s.model_copy(update={"count": s.count + 1}))  # doctest: +SKIP
    Counter(count=1)

    Reading (:meth:`load`) takes no lock; :meth:`save`, :meth:`update` and
    :meth:`transaction` run under the store's lock and publish each save with an
    atomic rename, so readers always see a whole, valid document.
    """

    def __init__(
        self,
        model: type[ModelT],
        path: str | os.PathLike[str] | Storage,
        *,
        default: ModelT | Callable[[], ModelT] | None = None,
        lock: DirectoryLock | str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        durable: bool | None = None,
        version: int = 1,
        migrations: Migrations | None = None,
        schema_ref: str | None = None,
        read_attempts: int = 3,
        read_delay: float = 0.05,
    ) -> None:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"StateStore needs a pydantic BaseModel subclass, not {model!r}")
        for name, info in model.model_fields.items():
            if name in _RESERVED or info.alias in _RESERVED:
                raise TypeError(
                    f"{model.__name__}.{name}: the key {info.alias or name!r} is written by "
                    "the store itself; rename the field"
                )
        if read_attempts < 1:
            raise ValueError("read_attempts must be at least 1")
        self.model = model
        self.timeout = timeout
        self.schema_ref = schema_ref
        self._default = default
        self._read_attempts = read_attempts
        self._read_delay = read_delay
        if isinstance(path, (str, os.PathLike)):
            file = os.path.abspath(os.fspath(path))
            if lock is None:
                # Next to the file a symlink points to, so that stores opened through
                # the link and through the target share one lock; resolved again for
                # every locked operation, so that a link switched meanwhile takes the
                # lock of the file the operation really reads and writes.
                lock = DirectoryLock.for_file(file, timeout=timeout)
            elif not isinstance(lock, DirectoryLock):
                lock = DirectoryLock(lock, timeout=timeout)
            self.lock: DirectoryLock | None = lock
            #: Whether saves are fsynced (file stores), or as the storage makes them.
            self.durable = True if durable is None else durable
            self._storage: Storage = FileStorage(file, lock, durable=self.durable)
        else:
            if lock is not None:
                raise TypeError("lock= applies to file stores only; this storage locks itself")
            if durable is not None:
                # Silently ignoring it would leave a store less durable than asked, or
                # slower than asked, with nothing to show for it.
                raise TypeError(
                    "durable= applies to file stores only; set it on the storage, for "
                    f"example {type(path).__name__}(..., durable=False)"
                )
            self.lock = None
            self.durable = bool(getattr(path, "durable", True))
            self._storage = path
        self._key = os.path.realpath(self._storage.location) if self.lock else self._storage.location
        self._migrator = Migrator(version, migrations, self._storage.location)
        self._version_line = f'  "{VERSION_KEY}": {self.version}'.encode()
        self._ignores_extra = model.model_config.get("extra") in (None, "ignore")

    def __repr__(self) -> str:
        return f"StateStore({self.model.__name__}, {self._storage.location!r})"

    # ------------------------------------------------------------------ public

    @property
    def path(self) -> Path:
        """The state file. A store over another storage has no file: see :attr:`location`."""
        if not isinstance(self._storage, FileStorage):
            raise TypeError(
                f"{self._storage.location}: this store keeps its document in "
                f"{type(self._storage).__name__}, not in a file; use store.location"
            )
        return Path(self._storage.path)

    @property
    def location(self) -> str:
        """Where the document lives, as messages name it: the state file's path, or
        the storage's own name for it (a URL for PostgreSQL)."""
        return self._storage.location

    @property
    def version(self) -> int:
        """The schema version this store reads and writes."""
        return self._migrator.version

    @property
    def storage(self) -> Storage:
        return self._storage

    def exists(self) -> bool:
        """Whether the state file exists (the default does not count)."""
        return self._storage.exists()

    def load(self) -> ModelT:
        """Read, migrate in memory and validate the state, without taking the lock.

        Missing file: the default, or :class:`StateNotFoundError`. A file that does
        not parse is read again (``read_attempts`` times, ``read_delay`` apart) in
        case a writer that does not rename atomically is halfway through.
        """
        return self._load(self._storage.read).model

    def save(self, state: ModelT) -> None:
        """Validate ``state`` and write it, under the lock.

        A file that exists but cannot be read (corrupt, invalid, or written by
        a newer version) is not overwritten: the error says so.
        """
        self._check_type(state, "save()")
        with self._session("save()") as session:
            try:
                loaded = self._load(session.read)
            except StateNotFoundError:  # no file and no default: nothing to protect
                loaded = _Loaded(state, None, self.version, None)
            self._commit(session, state, loaded)

    def update(self, fn: Callable[[ModelT], ModelT | None]) -> ModelT:
        """Load, apply ``fn``, validate and save, all under the lock; return what was saved.

        ``fn`` returns a new model, or None after changing the one it was given.
        If it raises, nothing is written and the exception propagates.
        """
        with self._session("update()") as session:
            loaded = self._load(session.read)
            loaded.shed_raw(self.version)
            result = fn(loaded.model)
            if result is not None:
                loaded.model = result
            del result
            self._check_type(loaded.model, f"update(): {getattr(fn, '__qualname__', 'fn')} returned")
            body = self._dump(loaded.model)
            # Let a large model go before the copy that checks it is built: a parsed
            # model takes several times its JSON size.
            loaded.model = None  # type: ignore[assignment]
            return self._publish(session, body, loaded)

    @contextmanager
    def transaction(self) -> Iterator[ModelT]:
        """``with store.transaction() as state:`` load under the lock; saved on normal exit.

        An exception inside the block discards the changes and writes nothing.
        """
        with self._session("transaction()") as session:
            loaded = self._load(session.read)
            yield loaded.model
            self._commit(session, loaded.model, loaded)

    def migrate(self, *, dry_run: bool = False) -> MigrationReport:
        """Upgrade the file to this store's version, under the lock, keeping a backup."""
        with self._session("migrate()") as session:
            try:
                loaded: _Loaded[ModelT] | None = self._load(session.read)
            except StateNotFoundError:
                loaded = None
            if loaded is None or loaded.raw is None:  # the default does not count
                raise StateNotFoundError(self._storage.location, "there is no state file to migrate")
            found, to = loaded.version, self.version
            steps = tuple(range(found, to))
            location = self._storage.location
            if not steps:
                return MigrationReport(location, found, to, dry_run=dry_run)
            label = f"v{found}"
            if dry_run:
                return MigrationReport(
                    location, found, to, steps, session.backup_location(label), False, True
                )
            self._commit(session, loaded.model, loaded)  # keeps the backup first
            return MigrationReport(
                location, found, to, steps, session.backup_location(label), True
            )

    def json_schema(
        self, draft: Draft = "2020-12", *, schema_id: str | None = None
    ) -> dict[str, Any]:
        """The JSON Schema of the document as stored (``docs/schema.md``).

        The model's schema plus the ``"schema_version"`` and ``"$schema"`` keys the
        file carries, with ``"$schema"`` (the dialect: ``"2020-12"`` or ``"07"``) and
        ``"$id"`` at the top. ``$id`` is ``schema_id``, else ``schema_ref`` when that
        is an absolute URI, else ``urn:statestore:model:<module>.<qualname>:v<version>``.
        The dict is in canonical order: ``json.dumps(schema, indent=2)`` is stable.
        """
        return document_schema(
            self.model, self.version, draft=draft, schema_id=schema_id, schema_ref=self.schema_ref
        )

    # ---------------------------------------------------------------- internals

    @contextmanager
    def _session(self, what: str) -> Iterator[Session]:
        key = (threading.get_ident(), self._key)
        with _active_lock:
            if key in _active:
                raise NestedTransactionError(
                    self._storage.location,
                    f"{what} called inside a transaction on the same file; the outer "
                    "transaction would overwrite its result. Change the state yielded by "
                    "the transaction instead",
                )
            _active.add(key)
        try:
            with self._storage.session(self.timeout) as session:
                yield session
        finally:
            with _active_lock:
                _active.discard(key)

    def _check_type(self, state: object, what: str) -> None:
        if not isinstance(state, self.model):
            raise TypeError(
                f"{self._storage.location}: {what} {type(state).__name__}, expected a "
                f"{self.model.__name__} instance; nothing was written"
            )

    def _decode(self, data: bytes) -> dict[str, Any]:
        location = self._storage.location
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line, col = _position(data, e.start)
            raise StateCorruptError(
                location,
                f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "the file was left untouched",
                line=line,
                column=col,
            ) from e
        if text.startswith("\ufeff"):  # a byte-order mark some editors add
            text = text[1:]
        if not text.strip():
            raise StateCorruptError(
                location, "the file is empty; the file was left untouched", line=1, column=1
            )
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise StateCorruptError(
                location,
                f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                "the file was left untouched",
                line=e.lineno,
                column=e.colno,
            ) from e
        except (ValueError, RecursionError) as e:
            raise StateCorruptError(
                location, f"not usable JSON: {e}; the file was left untouched"
            ) from e
        if not isinstance(doc, dict):
            kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
                type(doc), "number"
            )
            raise StateCorruptError(
                location,
                f"the document is a JSON {kind}, but a state file holds a JSON object; "
                "the file was left untouched",
                line=1,
                column=1,
            )
        return doc

    def _load(self, read: Callable[[], bytes | None]) -> _Loaded[ModelT]:
        attempt = 1
        while True:
            raw = read()
            if raw is None:
                return _Loaded(self._make_default(), None, self.version, None)
            try:
                with _collector_paused():
                    return self._fast_load(raw) or self._from_doc(self._decode(raw), raw)
            except StateCorruptError:
                # A writer that does not rename atomically may be halfway through.
                if attempt >= self._read_attempts:
                    raise
                attempt += 1
                time.sleep(self._read_delay)

    def _fast_load(self, raw: bytes) -> _Loaded[ModelT] | None:
        """Validate a file in the store's own current format straight from its bytes.

        The store writes ``{"$schema": ..., "schema_version": N, <model fields>}``
        with a fixed layout; when the file starts that way at this store's version,
        pydantic parses and validates the rest in one pass, without building the
        intermediate dict. Anything else (older versions, other layouts, errors)
        returns None and takes the general path, which reports errors precisely.
        """
        if not raw.startswith(b"{\n") or _may_hold_constants(raw):
            # (pydantic's parser accepts NaN and Infinity; the general path refuses
            # them and says where, so a file that may hold them goes there at once.)
            return None
        pos = 2
        schema: str | None = None
        if raw.startswith(_SCHEMA_LINE, pos):
            end = raw.find(b",\n", pos)  # JSON strings cannot hold a raw newline
            if end < 0:
                return None
            try:
                value = json.loads(raw[pos + len(_SCHEMA_LINE) : end])
            except ValueError:
                return None
            if not isinstance(value, str):
                return None
            schema, pos = value, end + 2
        if not raw.startswith(self._version_line, pos):
            return None
        pos += len(self._version_line)
        body: bytes | bytearray
        if raw.startswith(b",\n", pos):
            if self._ignores_extra:
                body = raw  # the store's own keys are extra keys, which the model ignores
            else:
                body = bytearray(b"{\n")
                body += memoryview(raw)[pos + 2 :]  # one copy, not two
        elif raw[pos:].strip() == b"}":
            body = b"{}"
        else:
            return None
        try:
            model = self.model.model_validate_json(body)
        except ValidationError:
            return None
        return _Loaded(model, raw, self.version, schema)

    def _from_doc(self, doc: dict[str, Any], raw: bytes) -> _Loaded[ModelT]:
        location = self._storage.location
        found = self._migrator.version_of(doc, location)
        schema = doc.pop(SCHEMA_KEY, None)
        upgraded, steps = self._migrator.upgrade(doc, location)
        try:
            # JSON-mode validation, as for every other document the store reads and
            # writes: strict models accept what JSON can express (dates as strings).
            model = self.model.model_validate_json(json.dumps(upgraded, ensure_ascii=False))
        except ValidationError as e:
            if steps:
                raise MigrationError(
                    location,
                    f"after migration step {steps[-1]}->{steps[-1] + 1} "
                    f"({getattr(self._migrator.steps[steps[-1]], '__qualname__', '?')}) "
                    "the document does not "
                    f"fit {self.model.__name__}: {e.error_count()} error(s), first: "
                    f"{e.errors()[0]['msg']} at {'.'.join(map(str, e.errors()[0]['loc']))}; "
                    "the file was not changed",
                ) from e
            raise StateValidationError(location, errors=_errors_of(e)) from e
        return _Loaded(model, raw, found, schema if isinstance(schema, str) else None)

    def _make_default(self) -> ModelT:
        default = self._default
        if default is None:
            raise StateNotFoundError(
                self._storage.location,
                "no state file; save() one first, or give the store a default",
            )
        if isinstance(default, BaseModel):
            made: object = default.model_copy(deep=True)
        else:
            made = default()
        self._check_type(made, "the default gave")
        return made  # type: ignore[return-value]

    def _dump(self, state: ModelT) -> bytes:
        """The model's JSON document, in field order, indented by 2, as UTF-8."""
        try:
            with _collector_paused():
                # As model_dump_json(), but bytes: no str copy of a large document.
                return state.__pydantic_serializer__.to_json(state, indent=2, by_alias=True)
        except PydanticSerializationError as e:
            raise StateValidationError(
                self._storage.location,
                f"the new state cannot be written as JSON ({e}); nothing was written",
            ) from e

    def _check(self, body: bytes) -> ModelT:
        """The model ``body`` loads back as: what would be read after the save.

        Validation is of the serialised document itself: a model changed by
        attribute assignment (which pydantic does not validate by default) must
        not reach disk if it would not load again.
        """
        constant = _constant_in(body)
        if constant is not None:
            # Written by a model configured with ser_json_inf_nan="constants": the file
            # would not load again (JSON has no such numbers).
            raise StateValidationError(
                self._storage.location,
                f"the new state holds {constant}, which JSON cannot represent (the model "
                "writes it because of ser_json_inf_nan='constants'); nothing was written. "
                "Use None, or a finite number",
            )
        try:
            with _collector_paused():
                return self.model.model_validate_json(body)
        except ValidationError as e:
            raise StateValidationError(
                self._storage.location,
                "the new state does not fit the model, so nothing was written:\n"
                + StateValidationError(self._storage.location, errors=_errors_of(e)).message,
                errors=_errors_of(e),
            ) from e

    def _frame(self, body: bytes, schema: str | None) -> bytes:
        """The file's bytes: the store's own keys first, then the model's fields."""
        head = ""
        ref = self.schema_ref if self.schema_ref is not None else schema
        if ref is not None:
            head += f'  "{SCHEMA_KEY}": {json.dumps(ref, ensure_ascii=False)},\n'
        head += f'  "{VERSION_KEY}": {self.version}'
        if body == b"{}":
            return ("{\n" + head + "\n}\n").encode()
        return b"".join((("{\n" + head + ",\n").encode(), memoryview(body)[2:], b"\n"))

    def _commit(self, session: Session, state: ModelT, loaded: _Loaded[ModelT]) -> ModelT:
        return self._publish(session, self._dump(state), loaded)

    def _publish(self, session: Session, body: bytes, loaded: _Loaded[ModelT]) -> ModelT:
        checked = self._check(body)
        data = self._frame(body, loaded.schema)
        del body
        if loaded.raw is not None:
            if loaded.unchanged(data):
                return checked  # nothing changed: no need to rewrite the file
            if loaded.version < self.version:
                session.backup(f"v{loaded.version}", loaded.raw)
        session.write(data)
        return checked
