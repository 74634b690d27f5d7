"""The ``statestore`` command line (standard library only: argparse).

A store is named as ``module:attribute`` or ``path/to/file.py:attribute``, the attribute being a
:class:`StateStore` or a pydantic model (then ``--path`` gives the file, and
the version is 1). ``docs/cli.md`` shows every command.

Results, including failed checks, go to stdout; an error that stops a
command is one line on stderr (``--debug`` adds the traceback). Exit codes:
0 ok, 1 a check or the operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from ._atomic import write_atomic
from ._document import COMMIT_KEY, NO_REVISION
from ._errors import (
    MigrationError,
    SchemaVersionError,
    StateCorruptError,
    StateStoreError,
    StateValidationError,
)
from ._folder import StateFolder
from ._folder_journal import MARKER, read_marker
from ._lock import DirectoryLock
from ._migrate import VERSION_KEY
from ._schema import (
    DRAFTS,
    Draft,
    document_schema,
    draft_of,
    dump_schema,
    internal_schemas,
    schema_filename,
    schema_name,
)
from ._store import StateStore
from .backends import FileStorage

__all__ = ["main"]

_Folder = Any  # a StateFolder, or a PostgresFolder (imported only where psycopg is)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

REF_HELP = (
    "a StateStore, StateFolder or pydantic model, as module:attribute (e.g. myapp.state:store) "
    "or path/to/file.py:attribute"
)


class UsageError(Exception):
    """The command line names something that does not exist or does not fit: exit 2."""


def _out(text: str) -> None:
    print(text, file=sys.stdout)


# ------------------------------------------------------------------ store refs


def _import_file(ref: str, filename: str) -> Any:
    """The module of a ``path/to/file.py:attr`` reference, imported as ``python file.py`` would.

    Its own folder goes first on ``sys.path`` (so its sibling modules import), and
    it is registered under a name of its own, so that pydantic can resolve the
    annotations of models defined in it.
    """
    path = os.path.abspath(filename)
    if not os.path.isfile(path):
        raise UsageError(f"{ref}: no such file {filename!r}")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "_statestore_ref_" + re.sub(r"\W", "_", path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{ref}: {filename!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _resolve(ref: str) -> StateStore[Any] | _Folder | type[BaseModel]:
    module_name, sep, attr = ref.rpartition(":")
    if not (sep and module_name and attr):
        raise UsageError(
            f"{ref!r} is not a store reference; write module:attribute or "
            "path/to/file.py:attribute, e.g. myapp.state:store"
        )
    obj: Any
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        obj = _import_file(ref, module_name)
    else:
        # As with `python -m`: modules in the current folder are importable.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name + ".").startswith(e.name + "."):
                raise UsageError(f"{ref}: no module named {e.name!r}") from e
            raise
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{ref}: {module_name!r} has no attribute {attr!r}") from None
    if (
        isinstance(obj, StateStore)
        or _is_folder(obj)
        or (isinstance(obj, type) and issubclass(obj, BaseModel))
    ):
        return obj
    found = type(obj).__name__
    raise UsageError(
        f"{ref}: expected a StateStore, a StateFolder or a pydantic model, found {found}"
    )


def _is_folder(obj: object) -> bool:
    """A state folder of files (StateFolder) or of rows (PostgresFolder): its stores,
    read together by ``read(*stores)``."""
    if isinstance(obj, StateFolder):
        return True
    folder_type = sys.modules.get("statestore.backends.postgres")
    return folder_type is not None and isinstance(obj, folder_type.PostgresFolder)


def _folder_or_store(ref: str, path: str | None) -> _Folder | StateStore[Any]:
    obj = _resolve(ref)
    if _is_folder(obj):
        if path is not None:
            raise UsageError(f"{ref} is a state folder: --path does not apply to it")
        if not getattr(obj, "stores", ()):
            raise UsageError(f"{ref}: the folder has no stores (make them with folder.store())")
        return obj
    return _store(ref, path, obj)


def _store(
    ref: str, path: str | None, obj: StateStore[Any] | _Folder | type[BaseModel] | None = None
) -> StateStore[Any]:
    obj = _resolve(ref) if obj is None else obj
    if _is_folder(obj):
        raise UsageError(f"{ref} is a state folder; name one of its stores")
    if isinstance(obj, StateStore):
        if path is None:
            return obj
        if not isinstance(obj.storage, FileStorage):
            raise UsageError(f"{ref}: --path applies to stores of files only")
        return obj.with_path(path)
    if path is None:
        raise UsageError(f"{ref} is a model, not a store: name the file with --path")
    return StateStore(obj, path)


def _schema_of(ref: str) -> tuple[str, int, Callable[[Draft], dict[str, Any]]]:
    """(file name, version, draft -> schema) for a store or model reference."""
    obj = _resolve(ref)
    if isinstance(obj, StateStore):
        store = obj
        name, version = schema_filename(schema_name(store.model), store.version), store.version
        return name, version, lambda draft: store.json_schema(draft)
    if _is_folder(obj):
        raise UsageError(f"{ref} is a state folder; name one of its stores")
    model = obj
    return schema_filename(schema_name(model), 1), 1, lambda d: document_schema(model, 1, draft=d)


def _validation_lines(store: StateStore[Any], e: StateValidationError) -> list[str]:
    """One ``location:line:col: field: message`` per error, at the positions the error carries."""
    lines = []
    for i, err in enumerate(e.errors):
        at = e.positions[i] if i < len(e.positions) else None  # one per error, when located
        where = str(store.location) + (f":{at[0]}:{at[1]}" if at is not None else "")
        name = ".".join(map(str, err.get("loc", ()))) or "(document)"
        lines.append(f"{where}: {name}: {err.get('msg')}")
    return lines


# ------------------------------------------------------------------- commands


def _cmd_show(args: argparse.Namespace) -> int:
    found = _folder_or_store(args.ref, args.path)
    if not isinstance(found, StateStore):
        # One consistent snapshot of every document, as {"name": state, ...}.
        snapshot = found.read(*found.stores)
        parts = [
            f"  {json.dumps(os.path.basename(s.location))}: "
            + snapshot[s].model_dump_json(indent=2, by_alias=True).replace("\n", "\n  ")
            for s in found.stores
        ]
        _out("{\n" + ",\n".join(parts) + "\n}")
        return EXIT_OK
    state = found.load()
    _out(state.model_dump_json(indent=2, by_alias=True))
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    found = _folder_or_store(args.ref, args.path)
    if not isinstance(found, StateStore):
        # Every document; exit 1 if any fails.
        codes = [_validate_one(s) for s in found.stores]
        return EXIT_FAILED if EXIT_FAILED in codes else EXIT_OK
    return _validate_one(found)


def _validate_one(store: StateStore[Any]) -> int:
    if not store.exists():
        what = "file" if isinstance(store.storage, FileStorage) else "document"
        if not store.has_default:
            _out(
                f"{store.location}: no such {what}, and the store has no default: "
                "loading it fails until a first save creates it"
            )
            return EXIT_FAILED
        try:
            store.load()  # the default is validated; a quarantined copy is refused
        except (StateStoreError, OSError) as e:
            _out(_one_line(str(e)))
            return EXIT_FAILED
        _out(
            f"{store.location}: no such {what} yet; the store's default applies "
            "(the first update or save creates it)"
        )
        return EXIT_OK
    try:
        store.load()
    except StateValidationError as e:
        for line in _validation_lines(store, e):
            _out(line)
        return EXIT_FAILED
    except (StateCorruptError, SchemaVersionError, MigrationError) as e:
        _out(_one_line(str(e)))
        return EXIT_FAILED
    doc = json.loads((store.storage.read() or b"{}").decode("utf-8-sig"))
    found = doc.get(VERSION_KEY, 1)
    if found == store.version:
        _out(f"{store.location}: ok")
    else:
        _out(
            f"{store.location}: ok at version {found}; loads as version {store.version} "
            "(run 'statestore migrate' to upgrade the file)"
        )
    return EXIT_OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    _out(str(_store(args.ref, args.path).migrate(dry_run=args.dry_run)))
    return EXIT_OK


def _cmd_schema_export(args: argparse.Namespace) -> int:
    made: dict[str, str] = {}
    for ref in args.refs:
        name, _, schema_for = _schema_of(ref)
        schema = schema_for(args.draft or "2020-12")
        path = os.path.join(args.out, name)
        if path in made:
            raise UsageError(f"{made[path]} and {ref} would both write {path}")
        made[path] = ref
        write_atomic(path, dump_schema(schema).encode("utf-8"))
        _out(f"wrote {path}")
    return EXIT_OK


def _cmd_schema_check(args: argparse.Namespace) -> int:
    failed = False
    for ref in args.refs:
        name, version, schema_for = _schema_of(ref)
        path = os.path.join(args.out, name)
        export = f"statestore schema export {ref} --out {args.out}"
        try:
            with open(path, encoding="utf-8", newline="") as f:
                committed = f.read()
        except FileNotFoundError:
            _out(f"{path}: missing; export it with: {export}")
            failed = True
            continue
        try:
            draft = args.draft or draft_of(json.loads(committed)) or "2020-12"
        except ValueError:
            draft = args.draft or "2020-12"
        expected = dump_schema(schema_for(draft))
        if committed == expected:
            _out(f"{path}: up to date")
            continue
        failed = True
        line = next(
            (
                n
                for n, (a, b) in enumerate(
                    zip(committed.splitlines(), expected.splitlines(), strict=False), 1
                )
                if a != b
            ),
            min(len(committed.splitlines()), len(expected.splitlines())) + 1,
        )
        _out(
            f"{path}: the schema of version {version} changed (first difference at line "
            f"{line}), but the version did not. Bump the store's version and add a "
            f"migration; or, if version {version} was never released, re-export: {export}"
        )
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_schema_internal(args: argparse.Namespace) -> int:
    for name, schema in internal_schemas().items():
        path = os.path.join(args.out, name)
        write_atomic(path, dump_schema(schema).encode("utf-8"))
        _out(f"wrote {path}")
    return EXIT_OK


def _lock_of(path: str) -> DirectoryLock:
    """PATH is a lock directory (existing, or ending in .lock), a declared state
    folder, or the state file it guards.

    A state file's lock is the store's: the lock of the declared state folder
    it is in, else beside the file a symlink points to.
    """
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, MARKER)):
        return DirectoryLock(read_marker(path).lock_path)  # a declared state folder
    if os.path.isdir(path) or path.endswith(".lock"):
        return DirectoryLock(path)
    return FileStorage(path).lock  # in a declared state folder, the folder's lock


def _cmd_lock_status(args: argparse.Namespace) -> int:
    lock = _lock_of(args.path)
    seen = lock.status()
    _out(f"lock:     {lock.path}")
    if seen.state == "free":
        _out("state:    free")
        return EXIT_OK
    _out(f"state:    {'stale' if seen.stale else 'held'} ({seen.reason})")
    owner = seen.owner
    if owner is not None:
        alive = {True: "yes", False: "no", None: "unknown (another host or container)"}
        left = owner.expires_at - time.time()
        _out(f"pid:      {owner.pid}")
        _out(f"host:     {owner.host}")
        _out(f"alive:    {alive[seen.alive]}")
        _out(f"age:      {owner.age:.1f} s")
        lease = f"expires in {left:.1f} s" if left >= 0 else f"expired {-left:.1f} s ago"
        _out(f"lease:    {lease}")
    if seen.stale:
        _out(f"break it: statestore lock break {lock.path}")
        return EXIT_FAILED
    return EXIT_OK


def _cmd_lock_break(args: argparse.Namespace) -> int:
    lock = _lock_of(args.path)
    seen = lock.status()
    if seen.state == "free":
        _out(f"{lock.path}: free; nothing to break")
        return EXIT_OK
    if not seen.stale and not args.force:
        raise StateStoreError(
            lock.path, f"the lock is live ({seen.reason}); use --force to break it anyway"
        )
    lock.break_lock(force=args.force)
    forced = "" if seen.stale else "forced: "
    _out(f"{lock.path}: broke the lock ({forced}{seen.reason})")
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import doctor

    if not os.path.isdir(args.dir):
        raise UsageError(f"{args.dir}: not a folder")
    return doctor(args.dir, repair=args.fix, out=_out)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import demo_main

    return demo_main(args.processes, args.updates, args.dir)


# --------------------------------------------------------------------- parser


# ------------------------------------------------ revisions, history, fields


def _kept(ref: str, path: str | None) -> StateStore[Any]:
    store = _store(ref, path)
    if store.history_size is None:
        raise UsageError(f"{ref}: the store keeps no history; give it history=N")
    return store


def _when(seconds: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{int(seconds % 1 * 1000):03d}Z"


def _writer(who: Any) -> str:
    if who is None:
        return "(by hand, or an older version)"
    return f"{who.user}@{who.host} pid {who.pid} {who.program}"


def _cmd_log(args: argparse.Namespace) -> int:
    store = _kept(args.ref, args.path)
    try:
        current: str | None = store.read().revision
    except StateStoreError:
        current = None  # the file does not load now: the history still lists
    entries = store.history()
    if (
        current is not None
        and current != NO_REVISION
        and all(e.revision != current for e in entries)
    ):
        _out(f"* {current}  (current; not in the history: changed by hand since the last commit)")
    for e in entries:
        mark = "*" if e.revision == current else " "
        _out(f"{mark} {e.revision}  {_when(e.time)}  {_writer(e.written_by)}  {e.size} bytes")
    return EXIT_OK


def _as_text(data: bytes, label: str) -> list[str]:
    """A version's document as indented JSON lines, the commit stamp left out."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace").splitlines(keepends=True)
    if isinstance(doc, dict):
        doc.pop(COMMIT_KEY, None)
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").splitlines(keepends=True)


def _cmd_diff(args: argparse.Namespace) -> int:
    import difflib

    store = _kept(args.ref, args.path)
    revs: list[str] = args.revisions
    if len(revs) > 2:
        raise UsageError("diff takes at most two revisions: REV (against the current) or REV REV")

    def current() -> tuple[str, bytes]:
        data = store.storage.read()
        if data is None:
            raise UsageError(f"{store.location}: there is no document to compare with")
        return store.read().revision, data

    if not revs:
        entries = store.history()
        now, data = current()
        older = [e for e in entries if e.revision != now]
        if not older:
            _out("(no earlier version in the history)")
            return EXIT_OK
        a = (older[0].revision, store.version_bytes(older[0].revision))
        b = (now, data)
    elif len(revs) == 1:
        a, b = (revs[0], store.version_bytes(revs[0])), current()
    else:
        a = (revs[0], store.version_bytes(revs[0]))
        b = (revs[1], store.version_bytes(revs[1]))
    lines = difflib.unified_diff(
        _as_text(a[1], a[0]), _as_text(b[1], b[0]), fromfile=a[0], tofile=b[0]
    )
    text = "".join(lines)
    _out(text.rstrip("\n") if text else "(no difference)")
    return EXIT_OK


def _cmd_restore(args: argparse.Namespace) -> int:
    store = _kept(args.ref, args.path)
    store.restore(args.revision)
    _out(f"{store.location}: restored {args.revision} as revision {store.read().revision}")
    return EXIT_OK


def _walk(doc: Any, dotted: str) -> tuple[Any, Any]:
    """(the container holding the field, its key) for ``a.b.0.c``; UsageError if absent."""
    parts = dotted.split(".") if dotted else []
    if not parts or any(p == "" for p in parts):
        raise UsageError(f"{dotted!r} is not a dotted path (e.g. settings.theme or items.0.name)")
    holder: Any = None
    key: Any = None
    node = doc
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if isinstance(node, dict):
            if part not in node:
                raise UsageError(f"the document has no field {where!r}")
            holder, key = node, part
        elif isinstance(node, list):
            try:
                index = int(part)
                node[index]
            except (ValueError, IndexError):
                raise UsageError(f"{where!r}: no item {part!r} in a list of {len(node)}") from None
            holder, key = node, index
        else:
            raise UsageError(f"{'.'.join(parts[:i]) or dotted!r} is a value, not an object")
        node = holder[key]
    return holder, key


def _show_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _cmd_get(args: argparse.Namespace) -> int:
    store = _store(args.ref, args.path)
    doc = store.load().model_dump(mode="json", by_alias=True)
    holder, key = _walk(doc, args.field)
    _out(_show_value(holder[key]))
    return EXIT_OK


def _cmd_set(args: argparse.Namespace) -> int:
    from ._document import errors_of

    store = _store(args.ref, args.path)
    try:
        value = json.loads(args.value)
    except ValueError:
        value = args.value  # not JSON: the text itself
    model = store.model

    def change(state: Any) -> Any:
        doc = state.model_dump(mode="json", by_alias=True)
        holder, key = _walk(doc, args.field)
        holder[key] = value
        try:
            return model.model_validate_json(json.dumps(doc, ensure_ascii=False))
        except ValidationError as e:
            raise StateValidationError(
                store.location,
                f"{args.field} = {args.value!r} does not fit the model; nothing was written",
                errors=errors_of(e),
            ) from e

    if args.expect is not None:
        snap = store.read()
        store.save(change(snap.state), expect=args.expect)
        saved = store.load()
    else:
        saved = store.update(change)
    holder, key = _walk(saved.model_dump(mode="json", by_alias=True), args.field)
    _out(_show_value(holder[key]))
    return EXIT_OK


_NOTE = "//"


def _run_editor(path: str) -> None:
    import shlex
    import subprocess

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        done = subprocess.run([*shlex.split(editor), path], check=False)
    except OSError as e:
        raise UsageError(f"cannot run the editor {editor!r} ($VISUAL / $EDITOR): {e}") from e
    if done.returncode != 0:
        raise UsageError(f"the editor {editor!r} exited with {done.returncode}; nothing was saved")


def _cmd_edit(args: argparse.Namespace) -> int:
    import tempfile

    from ._document import errors_of
    from ._errors import ConflictError

    store = _store(args.ref, args.path)
    snap = store.read()
    model = store.model
    start = snap.state.model_dump_json(indent=2, by_alias=True) + "\n"
    text, notes = start, ""
    last_bad: str | None = None
    with tempfile.TemporaryDirectory(prefix="statestore-edit-") as tmp:  # 0700
        draft = os.path.join(tmp, os.path.basename(store.location) or "state.json")
        while True:
            with open(draft, "w", encoding="utf-8") as f:
                f.write(notes + text)
            _run_editor(draft)
            with open(draft, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines(keepends=True)
            text = "".join(line for line in lines if not line.lstrip().startswith(_NOTE))
            if not text.strip():
                _out(f"{store.location}: the document was left empty; edit cancelled")
                return EXIT_FAILED
            if text == start:
                _out(f"{store.location}: no change")
                return EXIT_OK
            try:
                new = model.model_validate_json(text)
            except ValidationError as e:
                if text == last_bad:
                    _out(f"{store.location}: still does not validate; edit cancelled")
                    return EXIT_FAILED
                last_bad = text
                found = [
                    f"{_NOTE} {'.'.join(map(str, err['loc'])) or '(document)'}: {err['msg']}\n"
                    for err in errors_of(e)
                ]
                notes = (
                    f"{_NOTE} statestore: this does not validate; fix it and save (lines "
                    f"starting with {_NOTE} are ignored; an empty file cancels):\n" + "".join(found)
                )
                continue
            expect = snap.revision
            while True:
                try:
                    store.save(new, expect=expect)
                except ConflictError as e:
                    now = store.read()
                    import difflib

                    changed = difflib.unified_diff(
                        start.splitlines(keepends=True),
                        (now.state.model_dump_json(indent=2, by_alias=True) + "\n").splitlines(
                            keepends=True
                        ),
                        fromfile=f"{e.expected} (you started from)",
                        tofile=f"{e.found} (now)",
                    )
                    _out(f"{store.location}: changed by someone else meanwhile:")
                    _out("".join(changed).rstrip("\n"))
                    sys.stdout.write("Save your version over it? [y/N] ")
                    sys.stdout.flush()
                    answer = sys.stdin.readline().strip().lower()
                    if answer not in ("y", "yes"):
                        _out(f"{store.location}: not saved; your version was:")
                        _out(text.rstrip("\n"))
                        return EXIT_FAILED
                    start, expect = text, now.revision
                    continue
                break
            _out(f"{store.location}: saved as revision {store.read().revision}")
            return EXIT_OK


def _at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command; SUPPRESS keeps a subcommand
    # from resetting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    parser = argparse.ArgumentParser(
        prog="statestore",
        description="Typed, crash-safe JSON state files shared by many processes.",
        epilog="A store is named as module:attribute (a StateStore, or a pydantic model "
        "with --path). Exit codes: 0 ok, 1 check failed, 2 usage error.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(owner: Any, name: str, text: str, run: Any = None, **kw: Any) -> Any:
        p = owner.add_parser(
            name, help=text, description=kw.pop("description", text), parents=[common], **kw
        )
        if run is not None:
            p.set_defaults(run=run)
        return p

    def ref_and_path(p: argparse.ArgumentParser) -> None:
        p.add_argument("ref", metavar="REF", help=REF_HELP)
        p.add_argument("--path", metavar="P", help="the state file (overrides the store's)")

    p = command(sub, "show", "print the state (migrated in memory, validated) as JSON", _cmd_show)
    ref_and_path(p)
    p = command(
        sub,
        "validate",
        "check that the file loads and validates (exit 1 if not)",
        _cmd_validate,
        description="Exit 0 if the file loads and validates; else 1, "
        "listing the errors as file:line:col where known.",
    )
    ref_and_path(p)
    p = command(
        sub, "migrate", "upgrade the file to the store's version, keeping a backup", _cmd_migrate
    )
    ref_and_path(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be done; write nothing")

    schema = command(sub, "schema", "export and check JSON Schemas")
    schema_sub = schema.add_subparsers(dest="schema_command", metavar="COMMAND", required=True)
    drafts = {"choices": DRAFTS, "metavar": "{2020-12,07}"}
    p = command(
        schema_sub,
        "export",
        "write <name>.v<version>.schema.json for each store",
        _cmd_schema_export,
    )
    p.add_argument("refs", nargs="+", metavar="REF", help=REF_HELP + " (one or more)")
    p.add_argument("--out", default=".", metavar="DIR", help="folder to write to (default: .)")
    p.add_argument("--draft", **drafts, help="JSON Schema dialect (default: 2020-12)")
    p = command(
        schema_sub,
        "check",
        "exit 1 if an exported schema is missing or out of date",
        _cmd_schema_check,
        description="For CI: exit 1 if the schema file of a store's "
        "current version is missing, or differs from what the model gives now (the "
        "schema of an exported version changed without a version bump).",
    )
    p.add_argument("refs", nargs="+", metavar="REF", help=REF_HELP + " (one or more)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the exported schemas")
    p.add_argument("--draft", **drafts, help="dialect (default: the one the file declares)")
    p = command(
        schema_sub,
        "internal",
        "write the schemas of statestore's own records",
        _cmd_schema_internal,
    )
    p.add_argument("--out", default=".", metavar="DIR", help="folder to write to (default: .)")

    lock = command(sub, "lock", "inspect or break a state file's lock")
    lock_sub = lock.add_subparsers(dest="lock_command", metavar="COMMAND", required=True)
    where = "a state file, or its lock directory"
    p = command(
        lock_sub,
        "status",
        "who holds the lock, or that it is free (exit 1 if stale)",
        _cmd_lock_status,
    )
    p.add_argument("path", metavar="PATH", help=where)
    p = command(lock_sub, "break", "break a stale lock", _cmd_lock_break)
    p.add_argument("path", metavar="PATH", help=where)
    p.add_argument("--force", action="store_true", help="break it even if its holder is alive")

    p = command(
        sub,
        "doctor",
        "find (and --fix) what a crash left in a state folder",
        _cmd_doctor,
        description="List state files that do not parse, stale locks, temporary files "
        "of dead writers, and backups. Exit 1 if problems remain.",
    )
    p.add_argument("dir", metavar="DIR", help="the state folder to look over (not its subfolders)")
    p.add_argument(
        "--fix",
        action="store_true",
        help="break stale locks, remove dead temp "
        "files, move unparseable files into DIR/.quarantine/",
    )

    p = command(
        sub,
        "demo",
        "run N processes incrementing one counter and check that no update is lost",
        _cmd_demo,
        description="Start N real processes that each increment one counter K times "
        "through StateStore.update, then print the tally. Exit 1 if any update was lost.",
    )
    p.add_argument(
        "--processes",
        "-n",
        type=_at_least_1,
        default=4,
        metavar="N",
        help="how many processes to start (default: 4)",
    )
    p.add_argument(
        "--updates",
        "-k",
        type=_at_least_1,
        default=250,
        metavar="K",
        help="increments per process (default: 250)",
    )
    p.add_argument("--dir", metavar="D", help="folder for the state file (default: a temp folder)")

    p = command(
        sub,
        "log",
        "list the kept versions: revision, time, writer, size (history=N)",
        _cmd_log,
        description="List the versions the store's history keeps, newest first; the "
        "current one is marked with *.",
    )
    ref_and_path(p)
    p = command(
        sub,
        "diff",
        "show what changed between two versions, as a JSON diff",
        _cmd_diff,
        description="No REV: the newest kept version before the current one against the "
        "current document; REV: that version against the current; REV REV: the two "
        "versions. The commit stamp is left out.",
    )
    ref_and_path(p)
    p.add_argument("revisions", nargs="*", metavar="REV", help="a revision (statestore log)")
    p = command(
        sub,
        "restore",
        "make a kept version current again, as a new commit (validated, migrated)",
        _cmd_restore,
    )
    ref_and_path(p)
    p.add_argument("revision", metavar="REV", help="a revision from statestore log")
    p = command(
        sub,
        "get",
        "print one field of the state (strings as text, the rest as JSON)",
        _cmd_get,
    )
    ref_and_path(p)
    p.add_argument("field", metavar="FIELD", help="a dotted path: settings.theme, items.0.name")
    p = command(
        sub,
        "set",
        "change one field, validated, under the lock; print the value stored",
        _cmd_set,
        description='VALUE is JSON (3, true, null, [1, 2], "text"), else taken as text. '
        "The field must exist. The new state is validated by the model: nothing is "
        "written if it does not fit.",
    )
    ref_and_path(p)
    p.add_argument("field", metavar="FIELD", help="a dotted path: settings.theme, items.0.name")
    p.add_argument("value", metavar="VALUE", help="the new value (JSON, or text)")
    p.add_argument(
        "--expect", metavar="REV", help="commit only if the document is at this revision"
    )
    p = command(
        sub,
        "edit",
        "edit the state in $EDITOR; validated, committed only if nobody changed it meanwhile",
        _cmd_edit,
        description="Opens the state in $VISUAL or $EDITOR without holding the lock. What "
        "you save is validated (the editor reopens with the errors on top if it does not "
        "fit), then committed with the revision you started from; if the document changed "
        "meanwhile, the change is shown and you are asked whether to save over it.",
    )
    ref_and_path(p)
    return parser


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else ""


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``--help`` and usage errors included)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has printed
        return EXIT_OK if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
    # The library logs what it repairs (a broken stale lock); the commands say it
    # themselves, so its records are shown only with --debug.
    handler: logging.Handler = logging.StreamHandler() if args.debug else logging.NullHandler()
    log = logging.getLogger("statestore")
    level = log.level
    log.addHandler(handler)
    if args.debug:
        log.setLevel(logging.DEBUG)
    try:
        code: int = args.run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`statestore show REF | head`): end quietly, as other
        # Unix tools do, and keep the interpreter's last flush from failing too.
        _silence_stdout()
        return EXIT_OK
    except UsageError as e:
        print(f"statestore: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        if isinstance(e, (StateStoreError, OSError)):
            text = _one_line(str(e))
        else:
            text = f"{type(e).__name__}: {_one_line(str(e))} (--debug shows the traceback)"
        print(f"statestore: error: {text}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
