"""The on-disk format of a state document, in one place: read, check, write.

A state file is a JSON object: the store's own keys first (``"$schema"`` when
the store or the file names one, then ``"schema_version"``), then the model's
fields, indented by 2, UTF-8, with a final newline. :func:`decode` reads any
such object by the store's rules (UTF-8, no ``NaN``/``Infinity``, an object at
the top, errors with line and column); :class:`Document` is one model's view of
the format: parse and validate (with the migrations of older versions), the
default, the dump of the validated model, and the proof that the bytes about
to be published load back. The store, the CLI and ``statestore doctor`` all
read through this module.

What a save writes (the rule of the serialise, check and publish path):

- The bytes published are the dump of the model that passed validation. The
  model is serialised with pydantic's type checks as errors; a value of another
  type than its field's (``state.count = "3"``: pydantic does not validate
  assignments by default) sends the state through validation first, and the
  validated model is what is dumped, so the file holds ``3`` and matches the
  store's JSON Schema. A value that does not validate is a
  :class:`StateValidationError` whose errors name the field. No pydantic
  serialiser warning leaves the library. (:meth:`Document.dump`)
- Before the rename, those exact bytes, framed with the store's keys, are read
  back through the decode and validation that :meth:`StateStore.load` uses
  (``Document.parse``: the fast path, else :func:`decode` and the migrations); a save whose file
  ``load()`` would reject is refused, and ``save``/``update`` return the model
  the file loads as. The body must be a JSON object without the store's keys
  at its top level. (:meth:`Document.check`, :meth:`Document.frame`)
- The store's own keys are never a model's input: a model validator that sees
  the raw input gets the document without them on every path.
- A default (instance or factory) goes through the same dump and check each
  time it is used: ``load()`` hands out what it would load as once saved, and
  a default that breaks the model is a :class:`StateValidationError` naming
  the default. (:meth:`Document.make_default`)
- Model shapes whose documents could never load back as saved are refused when
  the store is built, with a ``TypeError`` saying what to use instead
  (``_shapes.check_model``): root models, the store's keys as a field's key,
  fields written under one key and read from another, excluded fields without
  a default, computed fields where extra keys are forbidden or kept, secrets
  that pydantic writes masked, bytes written in one encoding and read in
  another (``ser_json_bytes`` without the same ``val_json_bytes``), dates,
  times and durations written as numbers (``ser_json_temporal``).

Cost: a save whose values all have their fields' types is serialised once and
validated once (plus the validation of the file as read); only a save that
holds a value of another type is validated once more.

Revisions (the rule of the commit stamp, ``docs/revisions.md``):

- Every commit writes one line ``"$commit": {...}`` right after ``"$schema"``
  (first when there is none): ``revision``, a counter one above the one the
  commit replaced (0 for a file without the line), and who wrote it (``pid``,
  ``host``, ``user``, ``program``, ``time``), and ``sha256``, a digest of the
  file's bytes without that line.
- A document's revision is ``"<counter>-<first 16 hex digits of the SHA-256 of
  the file's exact bytes>"`` (``"0"`` when there is no document): it changes on
  every commit (the stamp holds the time and the counter) and on every edit by
  hand (any byte), and the counter orders statestore's commits.
- ``written_by`` is trusted only while ``sha256`` matches the rest of the file:
  a hand edit anywhere outside the line (or a reformatting) makes it None.
- The stamp is never a model's input (a reserved key, like ``schema_version``),
  and load()'s fast path skips the line without parsing it; files without it
  (written by older versions, or by hand) load as before.
"""

from __future__ import annotations

import gc
import getpass
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from ._errors import (
    CORRUPT_HINT,
    MigrationError,
    StateCorruptError,
    StateNotFoundError,
    StateValidationError,
)
from ._migrate import VERSION_KEY, Migrations, Migrator

if TYPE_CHECKING:
    from .backends import Session

__all__ = [
    "COMMIT_KEY",
    "NO_REVISION",
    "RESERVED",
    "SCHEMA_KEY",
    "VERSION_KEY",
    "Document",
    "Loaded",
    "ModelT",
    "Snapshot",
    "WrittenBy",
    "decode",
    "errors_of",
    "read_stamp",
    "revision_of",
    "strip_stamp",
]

ModelT = TypeVar("ModelT", bound=BaseModel)

#: The key an editor reads to find a document's JSON Schema.
SCHEMA_KEY: Final = "$schema"
#: The key of the commit stamp: the revision counter and who wrote the file.
COMMIT_KEY: Final = "$commit"
#: The keys the store writes itself: never a model's field, never a model's input.
RESERVED: Final = (VERSION_KEY, SCHEMA_KEY, COMMIT_KEY)
#: The revision of a document that does not exist (``save(expect=NO_REVISION)``
#: commits only if there is none yet).
NO_REVISION: Final = "0"

_SCHEMA_LINE: Final = f'  "{SCHEMA_KEY}": '.encode()
_COMMIT_LINE: Final = f'  "{COMMIT_KEY}": '.encode()
#: Hex digits of the file's SHA-256 in a revision; of the content's in the stamp.
_REVISION_HEX: Final = 16
_STAMP_HEX: Final = 16


@dataclass(frozen=True)
class WrittenBy:
    """Who made a commit: from the stamp of the file (None in a snapshot when the
    file was changed by hand since)."""

    pid: int
    host: str
    user: str
    program: str
    time: datetime

    @classmethod
    def from_stamp(cls, stamp: dict[str, Any] | None) -> WrittenBy | None:
        if stamp is None:
            return None
        try:
            when = datetime.fromisoformat(str(stamp["time"]).replace("Z", "+00:00"))
            return cls(
                int(stamp["pid"]),
                str(stamp["host"]),
                str(stamp["user"]),
                str(stamp["program"]),
                when,
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Snapshot(Generic[ModelT]):
    """A document as read: its validated ``state``, its ``revision`` (pass it to
    ``save(state, expect=...)``) and who committed it (None: changed by hand,
    written by an older version, or no document yet)."""

    state: ModelT
    revision: str
    written_by: WrittenBy | None


_user_by_uid: dict[int, str] = {}


def _user() -> str:
    uid = os.geteuid() if hasattr(os, "geteuid") else -1
    name = _user_by_uid.get(uid)
    if name is None:
        try:
            import pwd

            name = pwd.getpwuid(uid).pw_name
        except (ImportError, KeyError, OSError):
            try:
                name = getpass.getuser()
            except Exception:  # no name for this uid anywhere
                name = str(uid)
        _user_by_uid[uid] = name
    return name


_writer_cache: dict[tuple[int, int, str], str] = {}


def _writer_fields() -> str:
    """``"pid": ..., "host": ..., "user": ..., "program": ...`` as JSON, made once per
    process, user and host name (a commit only adds the time)."""
    pid = os.getpid()
    uid = os.geteuid() if hasattr(os, "geteuid") else -1
    host = socket.gethostname()
    key = (pid, uid, host)
    found = _writer_cache.get(key)
    if found is None:
        found = (
            f'"pid": {pid}, "host": {json.dumps(host)}, "user": {json.dumps(_user())}, '
            f'"program": {json.dumps(_program())}'
        )
        _writer_cache.clear()  # one entry: a fork or setuid makes a new one
        _writer_cache[key] = found
    return found


def _now() -> str:
    ms = int(time.time() * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


_COUNTER_RE: Final = re.compile(rb'\{"revision": ([0-9]{1,18})[,}]')


def read_counter(raw: bytes) -> int:
    """The revision counter of the stamp, without checking the stamp (a commit
    only needs the number to count on from)."""
    span = stamp_span(raw)
    if span is not None and span[0] != span[1]:
        m = _COUNTER_RE.match(raw, span[0] + len(_COMMIT_LINE))
        if m is not None:
            return int(m.group(1))
    return read_stamp(raw)[0]


def _program() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else sys.executable
    name = os.path.basename(argv0)
    if name == "__main__.py":  # python -m package: the package's name
        name = os.path.basename(os.path.dirname(argv0))
    return name or "python"


def stamp_span(raw: bytes | bytearray) -> tuple[int, int] | None:
    """Where the commit line is in bytes of the store's layout: (start, end), end
    included its newline; (p, p) at the place it would go when there is none;
    None for bytes not in the store's layout (the stamp then cannot be trusted)."""
    if not raw.startswith(b"{\n"):
        return None
    pos = 2
    if raw.startswith(_SCHEMA_LINE, pos):
        end = raw.find(b",\n", pos)  # JSON strings hold no raw newline
        if end < 0:
            return None
        pos = end + 2
    if raw.startswith(_COMMIT_LINE, pos):
        end = raw.find(b"\n", pos)
        if end < 0 or raw[end - 1 : end] != b",":
            return None
        return pos, end + 1
    return pos, pos


def strip_stamp(data: bytes) -> bytes:
    """``data`` without its commit line: what the document holds, whoever wrote it
    (bytes not in the store's layout are returned as they are)."""
    span = stamp_span(data)
    if span is None or span[0] == span[1]:
        return data
    return data[: span[0]] + data[span[1] :]


def _content_hash(raw: bytes | bytearray, span: tuple[int, int]) -> Any:
    view = memoryview(raw)
    h = hashlib.sha256(view[: span[0]])
    h.update(view[span[1] :])
    return h


def read_stamp(raw: bytes) -> tuple[int, dict[str, Any] | None]:
    """(the revision counter, the stamp when it still matches the bytes, else None)."""
    span = stamp_span(raw)
    if span is not None and span[0] != span[1]:
        start, end = span
        try:
            stamp = json.loads(raw[start + len(_COMMIT_LINE) : end - 2])
        except ValueError:
            stamp = None
        if isinstance(stamp, dict):
            n = stamp.get("revision")
            counter = n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0
            own = stamp.get("sha256") == _content_hash(raw, span).hexdigest()[:_STAMP_HEX]
            return counter, (stamp if own and counter else None)
        return 0, None
    if span is not None:
        return 0, None  # the store's layout, no stamp: a file of an older version
    # Not in the store's layout (reformatted by hand): the counter as the JSON says.
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return 0, None
    stamp = doc.get(COMMIT_KEY) if isinstance(doc, dict) else None
    n = stamp.get("revision") if isinstance(stamp, dict) else None
    return (n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0), None


def revision_of(raw: bytes | None, counter: int | None = None) -> str:
    """The revision of a document's exact bytes (``NO_REVISION`` for no document)."""
    if raw is None:
        return NO_REVISION
    if counter is None:
        counter = read_stamp(raw)[0]
    return f"{counter}-{hashlib.sha256(raw).hexdigest()[:_REVISION_HEX]}"


_gc_lock = threading.Lock()
#: Objects allocated during a pause above which they are promoted without a scan.
_GC_PROMOTE_AFTER: Final = 10_000
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
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
class Loaded(Generic[ModelT]):
    """A document as found under the lock."""

    model: ModelT
    raw: bytes | None  # None: no file yet (the default was used)
    version: int
    schema: str | None  # the "$schema" the file carried
    digest: bytes | None = None  # stands in for a large ``raw`` once it was let go
    _stamp: tuple[int, dict[str, Any] | None] | None = None
    _revision: str | None = None
    _counter: int | None = None

    def counter(self) -> int:
        """The revision counter of the bytes found (0: none, or no stamp)."""
        if self._counter is None:
            if self._stamp is not None:
                self._counter = self._stamp[0]
            else:
                self._counter = read_counter(self.raw) if self.raw else 0
        return self._counter

    def stamp(self) -> tuple[int, dict[str, Any] | None]:
        """(the revision counter, the trusted stamp or None), read from the bytes once."""
        if self._stamp is None:
            self._stamp = (0, None) if self.raw is None else read_stamp(self.raw)
        return self._stamp

    @property
    def revision(self) -> str:
        """The revision of the bytes found (``NO_REVISION``: no document)."""
        if self._revision is None:
            self._revision = revision_of(self.raw, self.counter() if self.raw else 0)
        return self._revision

    @property
    def written_by(self) -> WrittenBy | None:
        return WrittenBy.from_stamp(self.stamp()[1])

    def shed_raw(self, current: int) -> None:
        """Keep digests instead of the bytes of a large file at the current version.

        The bytes are needed only to skip a save that changes nothing (and, for
        an older version, for the backup) and for the revision; collision-resistant
        digests do both, and a large document should not be held twice during a
        save. ``raw`` becomes empty (the file still exists).
        """
        if self.version == current and self.raw is not None and len(self.raw) > _SHED_ABOVE:
            _ = self.revision, self.counter()  # while the bytes are there
            self.digest = _content_digest(self.raw)
            self.raw = b""

    def unchanged(self, data: bytes) -> bool:
        """Whether ``data`` holds what the file holds, the commit stamps aside."""
        if self.digest is not None:
            return _content_digest(data) == self.digest
        raw = self.raw
        if raw is None:
            return False
        ours, theirs = stamp_span(data), stamp_span(raw)
        if ours is None or theirs is None:
            return data == raw
        a, b = memoryview(data), memoryview(raw)
        return a[: ours[0]] == b[: theirs[0]] and a[ours[1] :] == b[theirs[1] :]


#: Files larger than this are compared by digest, not kept in memory during a save.
_SHED_ABOVE: Final = 256 * 1024


def _length(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little")


def _content_digest(data: bytes) -> bytes:
    """A digest of ``data`` without its commit stamp (of all of it outside the layout)."""
    span = stamp_span(data) or (0, 0)
    size = len(data) - (span[1] - span[0])
    found: bytes = _content_hash(data, span).digest()
    return size.to_bytes(8, "little") + found


def digest(data: bytes) -> bytes:
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


def errors_of(e: ValidationError) -> list[dict[str, Any]]:
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


def decode(data: bytes, location: str) -> dict[str, Any]:
    """The JSON object of a state file's bytes, by the store's reading rules.

    UTF-8 (a byte-order mark is skipped), not empty, JSON without ``NaN`` or
    ``Infinity``, an object at the top: else :class:`StateCorruptError` with
    the line and column where that is known.
    """
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


class Document(Generic[ModelT]):
    """One model's view of the format: how its documents are read, checked and written.

    ``location`` names the document in messages. ``default`` is an instance or a
    factory (or None: a missing document is :class:`StateNotFoundError`).
    """

    def __init__(
        self,
        model: type[ModelT],
        location: str,
        *,
        default: ModelT | Callable[[], ModelT] | None = None,
        version: int = 1,
        migrations: Migrations | None = None,
        schema_ref: str | None = None,
        read_attempts: int = 3,
        read_delay: float = 0.05,
    ) -> None:
        if read_attempts < 1:
            raise ValueError("read_attempts must be at least 1")
        self.model = model
        self.location = location
        self.schema_ref = schema_ref
        self.default = default
        self.read_attempts = read_attempts
        self.read_delay = read_delay
        self.migrator = Migrator(version, migrations, location)
        self._version_line = f'  "{VERSION_KEY}": {self.version}'.encode()
        # Whether the file's bytes can be validated as they are, the store's keys left
        # in as extra keys the model ignores: not when a model validator sees the raw
        # input (the store's keys are never the model's input, on any path).
        self._ignores_extra = model.model_config.get("extra") in (None, "ignore") and not any(
            d.info.mode in ("before", "wrap")
            for d in model.__pydantic_decorators__.model_validators.values()
        )

    @property
    def version(self) -> int:
        """The schema version this document is read and written at."""
        return self.migrator.version

    def check_type(self, state: object, what: str) -> None:
        if not isinstance(state, self.model):
            raise TypeError(
                f"{self.location}: {what} {type(state).__name__}, expected a "
                f"{self.model.__name__} instance; nothing was written"
            )

    def parse(self, raw: bytes) -> Loaded[ModelT]:
        """Bytes to a validated model, as ``load()`` reads them and a save proves them."""
        with collector_paused():
            return self._fast_load(raw) or self._from_doc(decode(raw, self.location), raw)

    def load(
        self, read: Callable[[], bytes | None], known: Loaded[ModelT] | None = None
    ) -> Loaded[ModelT]:
        """The document ``read`` gives, parsed; ``known``: a document parsed before,
        returned itself when the bytes read now are its bytes, every one of them
        (the same bytes parse to the same model: no stat, no time stamp is trusted)."""
        attempt = 1
        while True:
            raw = read()
            if raw is None:
                return Loaded(self.make_default(), None, self.version, None)
            if known is not None and known.raw == raw:
                return known
            try:
                return self.parse(raw)
            except StateCorruptError:
                # A writer that does not rename atomically may be halfway through.
                if attempt >= self.read_attempts:
                    raise
                attempt += 1
                time.sleep(self.read_delay)

    def _fast_load(self, raw: bytes) -> Loaded[ModelT] | None:
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
        if raw.startswith(_COMMIT_LINE, pos):
            # The commit stamp: not the model's, and not needed to load (one search).
            end = raw.find(b"\n", pos)
            if end < 0 or raw[end - 1] != 0x2C:  # ","
                return None
            pos = end + 1
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
        return Loaded(model, raw, self.version, schema)

    def _from_doc(self, doc: dict[str, Any], raw: bytes) -> Loaded[ModelT]:
        location = self.location
        found = self.migrator.version_of(doc, location)
        schema = doc.pop(SCHEMA_KEY, None)
        doc.pop(COMMIT_KEY, None)
        upgraded, steps = self.migrator.upgrade(doc, location)
        try:
            # JSON-mode validation, as for every other document the store reads and
            # writes: strict models accept what JSON can express (dates as strings).
            model = self.model.model_validate_json(json.dumps(upgraded, ensure_ascii=False))
        except ValidationError as e:
            if steps:
                raise MigrationError(
                    location,
                    f"after migration step {steps[-1]}->{steps[-1] + 1} "
                    f"({getattr(self.migrator.steps[steps[-1]], '__qualname__', '?')}) "
                    "the document does not "
                    f"fit {self.model.__name__}: {e.error_count()} error(s), first: "
                    f"{e.errors()[0]['msg']} at {'.'.join(map(str, e.errors()[0]['loc']))}; "
                    "the file was not changed",
                ) from e
            raise StateValidationError(location, errors=errors_of(e), source=raw) from e
        return Loaded(model, raw, found, schema if isinstance(schema, str) else None)

    def make_default(self) -> ModelT:
        """The default as :meth:`StateStore.load` hands it out: validated like a saved state.

        A default instance or what the factory returns is serialised and read
        back through the load path, exactly as if it had just been saved (so each
        call gives a fresh model, and the instance given is never handed out);
        one that does not fit the model is a :class:`StateValidationError` that
        says it is the default, not a state found on disk.
        """
        default = self.default
        if default is None:
            raise StateNotFoundError(
                self.location,
                "no state file; save() one first, or give the store a default",
            )
        made: object = default if isinstance(default, BaseModel) else default()
        self.check_type(made, "the default gave")
        what = (
            f"the default {type(made).__name__} instance given as default="
            if isinstance(default, BaseModel)
            else f"the default made by {getattr(default, '__qualname__', repr(default))}()"
        )
        data = self.frame(self.dump(made, what), None, what)  # type: ignore[arg-type]
        return self.check(data, what, "fix the store's default")

    def dump(self, state: ModelT, what: str = "the new state") -> bytes:
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
            with collector_paused():
                # As model_dump_json(), but bytes: no str copy of a large document.
                return serializer.to_json(state, indent=2, by_alias=True, warnings="error")
        except PydanticSerializationError:
            pass  # a value of the wrong type (or one that has no JSON): see below
        try:
            with collector_paused():
                loose = serializer.to_json(state, indent=2, by_alias=True, warnings=False)
        except PydanticSerializationError as e:
            raise StateValidationError(
                self.location,
                f"{what} cannot be written as JSON ({e}); nothing was written",
            ) from e
        valid = self.check(self.frame(loose, None, what), what)
        del loose
        try:
            with collector_paused():
                return serializer.to_json(valid, indent=2, by_alias=True, warnings="error")
        except PydanticSerializationError as e:
            raise StateValidationError(
                self.location,
                f"{what} still holds a value its serialiser does not expect after "
                f"validation, so the model cannot be saved as it would load ({e}); "
                "nothing was written. Check the model's validators and serialisers",
            ) from e

    def check(
        self,
        data: bytes,
        what: str = "the new state",
        then: str = "nothing was written",
    ) -> ModelT:
        """The model the bytes ``data`` load as, by the very path ``load()`` takes.

        Run on the exact bytes about to be published: whatever the model's shape,
        validators or serialisers, a save whose file would not load again (or
        would load only by a path ``load()`` does not take) is refused here.
        Validation is of the serialised document itself: a model changed by
        attribute assignment (which pydantic does not validate by default) must
        not reach disk if it would not load again.
        """
        location = self.location
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
            found = self.parse(data)  # load()'s own path, so the proof is of what it reads
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

    def frame(
        self,
        body: bytes,
        schema: str | None,
        what: str = "the new state",
        after: Loaded[ModelT] | None = None,
    ) -> bytes:
        """The file's bytes: the store's own keys first, then the model's fields.

        ``body`` must be a JSON object (the model's dump) without the store's keys
        at its top level: a model serialiser that returns something else, or an
        extra key named like the store's own, is refused rather than framed into
        a document that would read back differently. ``after``: the document this
        commit replaces (as found under the lock): the bytes carry the commit
        stamp, its counter one above that document's.
        """
        if not (body == b"{}" or body.startswith(b"{\n")):
            raise StateValidationError(
                self.location,
                f"{what} serialises to {body[:40]!r}..., not a JSON object (a model "
                "serialiser changes its shape); a state file is a JSON object the "
                "store adds its own keys to, so nothing was written",
            )
        for key in RESERVED:
            # With indent=2, a line starting with exactly two spaces and a quote is a
            # top-level key (JSON strings hold no raw newline): one byte search each.
            if b'\n  "' + key.encode() + b'": ' in body:
                raise StateValidationError(
                    self.location,
                    f"{what} has a top-level key {key!r} (an extra key of a model with "
                    "extra='allow', or from a serialiser), which the store writes itself; "
                    "nothing was written. Remove that key",
                )
        first = "{\n"
        ref = self.schema_ref if self.schema_ref is not None else schema
        if ref is not None:
            first += f'  "{SCHEMA_KEY}": {json.dumps(ref, ensure_ascii=False)},\n'
        head = f'  "{VERSION_KEY}": {self.version}'
        if body == b"{}":
            parts: tuple[bytes | memoryview, ...] = (first.encode(), (head + "\n}\n").encode())
        else:
            parts = (first.encode(), (head + ",\n").encode(), memoryview(body)[2:], b"\n")
        if after is None:
            return b"".join(parts)
        content = hashlib.sha256()
        for part in parts:
            content.update(part)
        stamp = (
            f'{{"revision": {after.counter() + 1}, "time": "{_now()}", {_writer_fields()}, '
            f'"sha256": "{content.hexdigest()[:_STAMP_HEX]}"}}'
        )
        line = _COMMIT_LINE + stamp.encode() + b",\n"
        return b"".join((parts[0], line, *parts[1:]))

    def commit(self, session: Session, state: ModelT, loaded: Loaded[ModelT]) -> ModelT:
        # The body is framed at once and let go: a large document is not held twice
        # while it is checked.
        return self.publish(
            session, self.frame(self.dump(state), loaded.schema, after=loaded), loaded
        )

    def publish(self, session: Session, data: bytes, loaded: Loaded[ModelT]) -> ModelT:
        """Write the file's bytes ``data`` unless they would not load back; return
        the model they load as (what :meth:`StateStore.load` gives after this save)."""
        checked, changed = self.prepare(session, data, loaded)
        if changed:
            session.write(data)
        return checked

    def stage(self, session: Session, state: ModelT, loaded: Loaded[ModelT]) -> bytes | None:
        """A group's part of a commit: the bytes ``state`` would be published as
        (framed with the stamp after ``loaded``, proved to load back, the backup
        of an older version kept), or None when they are what the document holds.
        The group writes the changed documents together afterwards."""
        self.check_type(state, "the transaction's state is")
        data = self.frame(self.dump(state), loaded.schema, after=loaded)
        _, changed = self.prepare(session, data, loaded)
        return data if changed else None

    def prepare(
        self,
        session: Session,
        data: bytes,
        loaded: Loaded[ModelT],
        checked: ModelT | None = None,
    ) -> tuple[ModelT, bool]:
        """Everything of a commit but the write: prove ``data`` loads back, keep the
        backup of an older version; return (the model it loads as, whether it
        differs from what the file holds). A group commit writes the changed
        documents of a folder together afterwards. ``checked``: what
        :meth:`check` already returned for these very bytes."""
        if checked is None:
            checked = self.check(data)
        if loaded.raw is not None:
            if loaded.unchanged(data):
                return checked, False  # nothing changed: no need to rewrite the file
            if loaded.version < self.version:
                session.backup(f"v{loaded.version}", loaded.raw)
        return checked, True
