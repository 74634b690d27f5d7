"""StateStore: a typed JSON document that many processes update without losing a write.

What a save writes (the rule of the serialise, check and publish path):

- The bytes published are the dump of the model that passed validation. The
  model is serialised with pydantic's type checks as errors; a value of another
  type than its field's (``state.count = "3"``: pydantic does not validate
  assignments by default) sends the state through validation first, and the
  validated model is what is dumped, so the file holds ``3`` and matches the
  store's JSON Schema. A value that does not validate is a
  :class:`StateValidationError` whose errors name the field. No pydantic
  serialiser warning leaves the library. (:meth:`StateStore._dump`)
- Before the rename, those exact bytes, framed with the store's keys, are read
  back through the decode and validation that :meth:`StateStore.load` uses
  (``_fast_load``, else ``_decode`` and ``_from_doc``); a save whose file
  ``load()`` would reject is refused, and ``save``/``update`` return the model
  the file loads as. The body must be a JSON object without the store's keys
  at its top level. (:meth:`StateStore._check`, :meth:`StateStore._frame`)
- The store's own keys are never a model's input: a model validator that sees
  the raw input gets the document without them on every path.
- A default (instance or factory) goes through the same dump and check each
  time it is used: ``load()`` hands out what it would load as once saved, and
  a default that breaks the model is a :class:`StateValidationError` naming
  the default. (:meth:`StateStore._make_default`)
- Model shapes whose documents could never load back as saved are refused when
  the store is built, with a ``TypeError`` saying what to use instead
  (:func:`_check_model`): root models, the store's keys as a field's key,
  fields written under one key and read from another, excluded fields without
  a default, computed fields where extra keys are forbidden or kept, secrets
  that pydantic writes masked, bytes written in one encoding and read in
  another (``ser_json_bytes`` without the same ``val_json_bytes``), dates,
  times and durations written as numbers (``ser_json_temporal``).

Cost: a save whose values all have their fields' types is serialised once and
validated once (plus the validation of the file as read); only a save that
holds a value of another type is validated once more.
"""

from __future__ import annotations

import datetime
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
from typing import Any, Final, Generic, TypeVar, get_args, get_origin

from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    PlainSerializer,
    RootModel,
    Secret,
    SecretBytes,
    SecretStr,
    ValidationError,
    WrapSerializer,
)
from pydantic_core import PydanticSerializationError

from ._atomic import DEFAULT_MAX_SIZE
from ._errors import (
    CORRUPT_HINT,
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
from .backends.file import MISSING_WAIT, FileStorage

__all__ = ["ModelT", "StateStore"]

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


# ------------------------------------------------------------ model shapes


def _check_model(model: object) -> None:
    """Refuse, when the store is built, a model whose documents could not be read back.

    Each of these would make a save write bytes that load to something else than
    what was saved (or that no load accepts), whatever the values:

    - not a ``BaseModel`` subclass, or a ``RootModel`` (its document is the root
      value, not an object the store can add its keys to);
    - a key the store writes itself (``"schema_version"``, ``"$schema"``) at the
      top level, as a field's name or alias, as a key a field is read from, or
      as a computed field;
    - a field written under one key (``serialization_alias``) but read from
      another: its value would be dropped on every save;
    - a field left out of the document (``exclude=True``) that has no default;
    - computed fields (written, but not inputs) in a model that forbids extra
      keys (every load would fail) or keeps them (each load would add a copy);
    - a secret field (``SecretStr``...) without a serialiser of the user's:
      pydantic writes ``"**********"``, and the value would be lost;
    - a ``bytes`` field of a model whose ``ser_json_bytes`` differs from its
      ``val_json_bytes``: the encoded text would load back as the bytes, a
      changed value that grows with every save.
    - a date, time or duration field of a model that writes them as numbers
      (``ser_json_temporal``, ``ser_json_timedelta="float"``): they load back
      changed (naive as UTC, milliseconds as seconds, microseconds lost) and
      the file would not match the JSON Schema.

    Nested models are checked too, except for the store's keys (which are only
    the top level's). What remains (validators that change values, custom
    serialisers) is settled save by save: see :meth:`StateStore._check`.
    """
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"StateStore needs a pydantic BaseModel subclass, not {model!r}")
    if issubclass(model, RootModel):
        root = model.model_fields["root"].annotation
        shown = root.__name__ if isinstance(root, type) and not get_args(root) else repr(root)
        raise TypeError(
            f"{model.__name__} is a RootModel: a state file is a JSON object that also "
            f"holds the store's own keys ({', '.join(map(repr, _RESERVED))}), so its root "
            "cannot be the document. Wrap the value in a BaseModel with one field, for "
            f"example class State(BaseModel): value: {shown.replace('typing.', '')}"
        )
    for name, info in model.model_fields.items():
        keys = {_written_key(name, info), *_read_keys(name, info, model, paths=True)}
        clash = sorted(keys.intersection(_RESERVED))
        if clash:
            raise TypeError(
                f"{model.__name__}.{name}: the key {clash[0]!r} is written by the store "
                "itself; rename the field (or its alias)"
            )
    for name, computed in model.model_computed_fields.items():
        key = computed.alias or name
        if key in _RESERVED:
            raise TypeError(
                f"{model.__name__}.{name}: the computed field is written under {key!r}, a "
                "key the store writes itself; rename it"
            )
    for each in _models_in(model):
        _check_round_trip(each)


def _check_round_trip(model: type[BaseModel]) -> None:
    where = model.__name__
    for name, info in model.model_fields.items():
        written = _written_key(name, info)
        read = _read_keys(name, info, model, paths=False)
        if info.exclude is True:
            if info.is_required():
                raise TypeError(
                    f"{where}.{name} is excluded from the document (exclude=True) and has "
                    "no default: a saved state could never be loaded again. Give it a "
                    "default, or do not exclude it"
                )
        elif _holds_secret(info.annotation) and not _serialised_by_user(model, name, info):
            raise TypeError(
                f"{where}.{name} holds a secret type, which pydantic writes as "
                "'**********': its value would be lost on every save. Add a "
                "field_serializer that writes the value (the file then holds it in "
                "clear), or keep the secret out of the state"
            )
        elif written not in read:
            raise TypeError(
                f"{where}.{name} is written under the key {written!r} but read from "
                f"{' or '.join(map(repr, sorted(read))) or 'no key'}: its value would be "
                "lost on every save. Give it the same validation alias (for example "
                f"Field(alias={written!r})), or set validate_by_name=True"
            )
    ser_bytes = model.model_config.get("ser_json_bytes", "utf8")
    val_bytes = model.model_config.get("val_json_bytes", "utf8")
    if ser_bytes != val_bytes and any(
        _mentions(info.annotation, bytes) for info in model.model_fields.values()
    ):
        raise TypeError(
            f"{where} writes bytes as {ser_bytes!r} (ser_json_bytes) but reads them as "
            f"{val_bytes!r} (val_json_bytes): every save would change the value (the "
            f"encoded text read back as the bytes). Set val_json_bytes={ser_bytes!r} too"
        )
    config = model.model_config
    temporal = config.get("ser_json_temporal") or (
        "float" if config.get("ser_json_timedelta") == "float" else "iso8601"
    )
    kinds = (datetime.date, datetime.time, datetime.timedelta)  # datetime is a date
    if temporal != "iso8601" and any(
        _mentions(info.annotation, kinds) for info in model.model_fields.values()
    ):
        raise TypeError(
            f"{where} writes dates, times or durations as numbers ({temporal!r}, from "
            "ser_json_temporal or ser_json_timedelta): they would not load back as "
            "saved (a naive time or datetime loads as UTC, a small datetime in "
            "milliseconds as seconds, a long duration loses microseconds), and the "
            "file would not match the JSON Schema, which describes ISO 8601 text. "
            "Leave the default 'iso8601'"
        )
    extra = model.model_config.get("extra")
    if model.model_computed_fields and extra in ("forbid", "allow"):
        names = ", ".join(model.model_computed_fields)
        effect = (
            "refuses them as extra keys, so no saved state would load"
            if extra == "forbid"
            else "keeps them as extra keys, so each load would add a copy"
        )
        raise TypeError(
            f"{where} has computed fields ({names}), which are written to the document "
            f"but are not inputs, and extra={extra!r} {effect}. Use extra='ignore', or "
            "make them properties without @computed_field"
        )


def _written_key(name: str, info: Any) -> str:
    """The key a field is serialised under (the store dumps by alias)."""
    key = info.serialization_alias or info.alias or name
    return str(key)


def _read_keys(name: str, info: Any, model: type[BaseModel], *, paths: bool) -> set[str]:
    """The top-level keys a field is validated from (``paths``: also the first key
    of every multi-step ``AliasPath``, which reads inside that key)."""
    config = model.model_config
    keys: set[str] = set()
    if config.get("validate_by_alias", True):
        alias = info.validation_alias
        if alias is None:
            keys.add(info.alias or name)
        else:
            for choice in alias.choices if isinstance(alias, AliasChoices) else [alias]:
                if isinstance(choice, str):
                    keys.add(choice)
                elif isinstance(choice, AliasPath) and choice.path:
                    first = choice.path[0]
                    if isinstance(first, str) and (paths or len(choice.path) == 1):
                        keys.add(first)
    if config.get("validate_by_name") or config.get("populate_by_name"):
        keys.add(name)
    return keys


def _mentions(annotation: object, kind: type | tuple[type, ...]) -> bool:
    """Whether ``kind`` (or a subclass) appears in a field's type, outside nested models."""
    todo = [annotation]
    while todo:
        tp = todo.pop()
        origin = get_origin(tp) or tp
        if isinstance(origin, type) and issubclass(origin, kind):
            return True
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):  # checked on its own
            todo.extend(get_args(tp))
    return False


def _holds_secret(annotation: object) -> bool:
    todo = [annotation]
    while todo:
        tp = todo.pop()
        origin = get_origin(tp) or tp
        if isinstance(origin, type) and issubclass(origin, (SecretStr, SecretBytes, Secret)):
            return True
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):  # checked on its own
            todo.extend(get_args(tp))
    return False


def _serialised_by_user(model: type[BaseModel], name: str, info: Any) -> bool:
    """Whether the field's JSON comes from the user's own serialiser."""
    decorators = model.__pydantic_decorators__
    if decorators.model_serializers:
        return True
    for serializer in decorators.field_serializers.values():
        if name in serializer.info.fields or "*" in serializer.info.fields:
            return True
    found = list(info.metadata)
    todo = [info.annotation]
    while todo:
        tp = todo.pop()
        args = get_args(tp)
        found.extend(args)
        todo.extend(args)
    return any(isinstance(m, (PlainSerializer, WrapSerializer)) for m in found)


def _models_in(model: type[BaseModel]) -> list[type[BaseModel]]:
    """``model`` and every model class its field types mention, each once."""
    found: list[type[BaseModel]] = []
    todo: list[object] = [model]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in found:
                continue
            found.append(tp)
            todo.extend(info.annotation for info in tp.model_fields.values())
        else:
            todo.extend(get_args(tp))
    return found


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
        max_size: int | None = None,
        missing_wait: float | None = None,
    ) -> None:
        _check_model(model)
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
            self._storage: Storage = FileStorage(
                file,
                lock,
                durable=self.durable,
                max_size=DEFAULT_MAX_SIZE if max_size is None else max_size,
                missing_wait=MISSING_WAIT if missing_wait is None else missing_wait,
            )
        else:
            if max_size is not None or missing_wait is not None:
                raise TypeError("max_size= and missing_wait= apply to file stores only")
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
        self._key = (
            os.path.realpath(self._storage.location) if self.lock else self._storage.location
        )
        self._migrator = Migrator(version, migrations, self._storage.location)
        self._version_line = f'  "{VERSION_KEY}": {self.version}'.encode()
        # Whether the file's bytes can be validated as they are, the store's keys left
        # in as extra keys the model ignores: not when a model validator sees the raw
        # input (the store's keys are never the model's input, on any path).
        self._ignores_extra = model.model_config.get("extra") in (None, "ignore") and not any(
            d.info.mode in ("before", "wrap")
            for d in model.__pydantic_decorators__.model_validators.values()
        )

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

    @property
    def has_default(self) -> bool:
        """Whether a missing document loads as the default (else :class:`StateNotFoundError`)."""
        return self._default is not None

    def with_path(self, path: str | os.PathLike[str]) -> StateStore[ModelT]:
        """The same store (model, default, version, migrations, options) over another file.

        Its lock is the one beside the new file. Only for stores of files: a
        store over another storage raises :class:`TypeError`.
        """
        storage = self._storage
        if not isinstance(storage, FileStorage):
            raise TypeError(f"{self.location}: with_path() applies to stores of files only")
        return StateStore(
            self.model,
            path,
            default=self._default,
            timeout=self.timeout,
            durable=self.durable,
            version=self.version,
            migrations=self._migrator.steps,
            schema_ref=self.schema_ref,
            read_attempts=self._read_attempts,
            read_delay=self._read_delay,
            max_size=storage.max_size,
            missing_wait=storage.missing_wait,
        )

    def load(self) -> ModelT:
        """Read, migrate in memory and validate the state, without taking the lock.

        Missing file: the default, or :class:`StateNotFoundError`; but when something
        says the file existed (a copy quarantined by ``statestore doctor``, an
        editor's ``<name>~`` backup while it saves), :class:`StateMissingError`
        instead, after waiting up to ``missing_wait`` for an editor's new file
        (``docs/store.md``). Only a regular file of at most ``max_size`` bytes is
        read (:class:`StateReadError` otherwise). A file that does not parse is
        read again (``read_attempts`` times, ``read_delay`` apart) in case a writer
        that does not rename atomically is halfway through.
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
            self._check_type(
                loaded.model, f"update(): {getattr(fn, '__qualname__', 'fn')} returned"
            )
            data = self._frame(self._dump(loaded.model), loaded.schema)
            # Let a large model go before the copy that checks it is built: a parsed
            # model takes several times its JSON size.
            loaded.model = None  # type: ignore[assignment]
            return self._publish(session, data, loaded)

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
                raise StateNotFoundError(
                    self._storage.location, "there is no state file to migrate"
                )
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
            return MigrationReport(location, found, to, steps, session.backup_location(label), True)

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
                hint=CORRUPT_HINT,
            ) from e
        if text.startswith("\ufeff"):  # a byte-order mark some editors add
            text = text[1:]
        if not text.strip():
            raise StateCorruptError(
                location,
                "the file is empty; the file was left untouched",
                line=1,
                column=1,
                hint=CORRUPT_HINT,
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
                hint=CORRUPT_HINT,
            ) from e
        except (ValueError, RecursionError) as e:
            raise StateCorruptError(
                location, f"not usable JSON: {e}; the file was left untouched", hint=CORRUPT_HINT
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
                hint=CORRUPT_HINT,
            )
        return doc

    def _parse(self, raw: bytes) -> _Loaded[ModelT]:
        """Bytes to a validated model, as ``load()`` reads them and a save proves them."""
        with _collector_paused():
            return self._fast_load(raw) or self._from_doc(self._decode(raw), raw)

    def _load(self, read: Callable[[], bytes | None]) -> _Loaded[ModelT]:
        attempt = 1
        while True:
            raw = read()
            if raw is None:
                return _Loaded(self._make_default(), None, self.version, None)
            try:
                return self._parse(raw)
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
            raise StateValidationError(location, errors=_errors_of(e), source=raw) from e
        return _Loaded(model, raw, found, schema if isinstance(schema, str) else None)

    def _make_default(self) -> ModelT:
        """The default as :meth:`load` hands it out: validated like a saved state.

        A default instance or what the factory returns is serialised and read
        back through the load path, exactly as if it had just been saved (so each
        call gives a fresh model, and the instance given is never handed out);
        one that does not fit the model is a :class:`StateValidationError` that
        says it is the default, not a state found on disk.
        """
        default = self._default
        if default is None:
            raise StateNotFoundError(
                self._storage.location,
                "no state file; save() one first, or give the store a default",
            )
        made: object = default if isinstance(default, BaseModel) else default()
        self._check_type(made, "the default gave")
        what = (
            f"the default {type(made).__name__} instance given as default="
            if isinstance(default, BaseModel)
            else f"the default made by {getattr(default, '__qualname__', repr(default))}()"
        )
        data = self._frame(self._dump(made, what), None, what)  # type: ignore[arg-type]
        return self._check(data, what, "fix the store's default")

    def _dump(self, state: ModelT, what: str = "the new state") -> bytes:
        """The JSON body (without the store's keys) of the model that passes validation.

        In field order, indented by 2, as UTF-8. Usually ``state``'s own dump: the
        serialiser runs with its type checks as errors, and a model whose every
        value has its field's type dumps without one. A value of another type
        (``state.count = "3"`` on an ``int`` field, which pydantic does not check
        on assignment) makes the dump stop; then ``state`` is validated first and
        the validated model (``count == 3``) is dumped instead, so the file never
        holds the uncoerced value, and pydantic's serialiser warning never
        reaches the caller. Only this path validates once more.
        """
        # The store's model's serialiser: a subclass instance is saved as the document
        # of the model it loads as, without the subclass's own fields.
        serializer = self.model.__pydantic_serializer__
        try:
            with _collector_paused():
                # As model_dump_json(), but bytes: no str copy of a large document.
                return serializer.to_json(state, indent=2, by_alias=True, warnings="error")
        except PydanticSerializationError:
            pass  # a value of the wrong type (or one that has no JSON): see below
        try:
            with _collector_paused():
                loose = serializer.to_json(state, indent=2, by_alias=True, warnings=False)
        except PydanticSerializationError as e:
            raise StateValidationError(
                self._storage.location,
                f"{what} cannot be written as JSON ({e}); nothing was written",
            ) from e
        valid = self._check(self._frame(loose, None, what), what)
        del loose
        try:
            with _collector_paused():
                return serializer.to_json(valid, indent=2, by_alias=True, warnings="error")
        except PydanticSerializationError as e:
            raise StateValidationError(
                self._storage.location,
                f"{what} still holds a value its serialiser does not expect after "
                f"validation, so the model cannot be saved as it would load ({e}); "
                "nothing was written. Check the model's validators and serialisers",
            ) from e

    def _check(
        self,
        data: bytes,
        what: str = "the new state",
        then: str = "nothing was written",
    ) -> ModelT:
        """The model the file's bytes ``data`` load as, by the very path :meth:`load` takes.

        Run on the exact bytes about to be published: whatever the model's shape,
        validators or serialisers, a save whose file would not load again (or
        would load only by a path ``load()`` does not take) is refused here.
        Validation is of the serialised document itself: a model changed by
        attribute assignment (which pydantic does not validate by default) must
        not reach disk if it would not load again.
        """
        location = self._storage.location
        constant = _constant_in(data)
        if constant is not None:
            # Written by a model configured with ser_json_inf_nan="constants": the file
            # would not load again (JSON has no such numbers).
            raise StateValidationError(
                location,
                f"{what} holds {constant}, which JSON cannot represent (the model "
                f"writes it because of ser_json_inf_nan='constants'); {then}. "
                "Use None, or a finite number",
            )
        try:
            found = self._parse(data)  # load()'s own path, so the proof is of what it reads
        except StateValidationError as e:
            raise StateValidationError(
                location, f"{what} does not fit the model; {then}:\n{e.message}", errors=e.errors
            ) from e
        except StateCorruptError as e:
            raise StateValidationError(
                location,
                f"{what} would be written as a document the store cannot read back "
                f"({e.message}); {then}. Check the model's serialisers",
            ) from e
        return found.model

    def _frame(self, body: bytes, schema: str | None, what: str = "the new state") -> bytes:
        """The file's bytes: the store's own keys first, then the model's fields.

        ``body`` must be a JSON object (the model's dump) without the store's keys
        at its top level: a model serialiser that returns something else, or an
        extra key named like the store's own, is refused rather than framed into
        a document that would read back differently.
        """
        if not (body == b"{}" or body.startswith(b"{\n")):
            raise StateValidationError(
                self._storage.location,
                f"{what} serialises to {body[:40]!r}..., not a JSON object (a model "
                "serialiser changes its shape); a state file is a JSON object the "
                "store adds its own keys to, so nothing was written",
            )
        for key in _RESERVED:
            # With indent=2, a line starting with exactly two spaces and a quote is a
            # top-level key (JSON strings hold no raw newline): one byte search each.
            if b'\n  "' + key.encode() + b'": ' in body:
                raise StateValidationError(
                    self._storage.location,
                    f"{what} has a top-level key {key!r} (an extra key of a model with "
                    "extra='allow', or from a serialiser), which the store writes itself; "
                    "nothing was written. Remove that key",
                )
        head = ""
        ref = self.schema_ref if self.schema_ref is not None else schema
        if ref is not None:
            head += f'  "{SCHEMA_KEY}": {json.dumps(ref, ensure_ascii=False)},\n'
        head += f'  "{VERSION_KEY}": {self.version}'
        if body == b"{}":
            return ("{\n" + head + "\n}\n").encode()
        return b"".join((("{\n" + head + ",\n").encode(), memoryview(body)[2:], b"\n"))

    def _commit(self, session: Session, state: ModelT, loaded: _Loaded[ModelT]) -> ModelT:
        # The body is framed at once and let go: a large document is not held twice
        # while it is checked.
        return self._publish(session, self._frame(self._dump(state), loaded.schema), loaded)

    def _publish(self, session: Session, data: bytes, loaded: _Loaded[ModelT]) -> ModelT:
        """Write the file's bytes ``data`` unless they would not load back; return
        the model they load as (what :meth:`load` gives after this save)."""
        checked = self._check(data)
        if loaded.raw is not None:
            if loaded.unchanged(data):
                return checked  # nothing changed: no need to rewrite the file
            if loaded.version < self.version:
                session.backup(f"v{loaded.version}", loaded.raw)
        session.write(data)
        return checked
