"""JSON Schemas: of the documents a store writes, and of statestore's own records.

pydantic's ``model_json_schema()`` describes the model, not the file: it has no
``"$schema"`` dialect or ``"$id"`` (pydantic#1478, #11916), and it knows nothing
of the ``"schema_version"`` key the store writes or of the ``"$schema"`` key an
editor puts in (a schema that does not allow that key makes editors flag every
file that carries it: gemini-cli#12695). :func:`document_schema` adds all four.

Output is canonical, so the same model always gives byte-identical files:
``"$schema"`` and ``"$id"`` first, ``"$defs"`` last, every other keyword
sorted, ``required`` sorted, ``properties`` in the model's field order (the
order editors offer them in); default and example values are left as pydantic
wrote them. :func:`dump_schema` writes the text: two-space indent, a final
newline.

Draft-07 (the dialect editors support best) is a conversion of pydantic's
2020-12 output: ``$defs`` becomes ``definitions`` (and every ``$ref`` to it),
``prefixItems`` the array form of ``items``, ``dependentRequired`` and
``dependentSchemas`` become ``dependencies``, and a ``$ref`` with sibling
keywords (ignored next to ``$ref`` before 2019-09) is wrapped in ``allOf``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, Literal, get_args
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter

from ._document import COMMIT_KEY, SCHEMA_KEY, VERSION_KEY
from ._lock import FORMAT, FORMAT_VERSION, LockOwner
from ._lock import LIMITS as OWNER_LIMITS

__all__ = [
    "DIALECTS",
    "DRAFTS",
    "Draft",
    "document_schema",
    "draft_of",
    "dump_schema",
    "internal_schemas",
    "schema_filename",
    "schema_name",
]

Draft = Literal["2020-12", "07"]
DRAFTS: Final[tuple[Draft, ...]] = get_args(Draft)
DIALECTS: Final[dict[Draft, str]] = {
    "2020-12": "https://json-schema.org/draft/2020-12/schema",
    "07": "http://json-schema.org/draft-07/schema#",
}
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
# Everything else (default, const, enum, examples, ...) is data and is left alone.
_ONE: Final = frozenset(
    {
        "additionalItems",
        "additionalProperties",
        "contains",
        "contentSchema",
        "else",
        "if",
        "items",
        "not",
        "propertyNames",
        "then",
    }
)
_LIST: Final = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP: Final = frozenset(
    {
        "$defs",
        "definitions",
        "dependentSchemas",
        "patternProperties",
        "properties",
    }
)
_FIRST: Final = ("$schema", "$id")
_LAST: Final = ("$defs", "definitions")
# 2020-12 keywords that draft-07 cannot express: refuse rather than loosen the schema.
_NOT_IN_07: Final = frozenset(
    {
        "$anchor",
        "$dynamicAnchor",
        "$dynamicRef",
        "$recursiveAnchor",
        "$recursiveRef",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)


def schema_name(model: type[BaseModel]) -> str:
    """The file name stem for a model's schema: its class name in kebab case.

    >>> class AppSettings(BaseModel): ...
    >>> schema_name(AppSettings)
    'app-settings'
    """
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", model.__name__).lower()


def schema_filename(name: str, version: int) -> str:
    """``<name>.v<version>.schema.json``."""
    return f"{name}.v{version}.schema.json"


def default_id(model: type[BaseModel], version: int) -> str:
    """A stable URN naming a model's schema at one version (no network location implied)."""
    qualified = quote(f"{model.__module__}.{model.__qualname__}", safe=".-_")
    return f"urn:statestore:model:{qualified}:v{version}"


def _is_absolute_uri(ref: str) -> bool:
    # Two or more letters before the colon: "C:\..." is a Windows path, not a URI.
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", ref) is not None


def document_schema(
    model: type[BaseModel],
    version: int,
    *,
    draft: Draft = "2020-12",
    schema_id: str | None = None,
    schema_ref: str | None = None,
) -> dict[str, Any]:
    """The JSON Schema of a stored document (what :meth:`StateStore.json_schema` returns).

    ``$id`` is ``schema_id`` if given; else ``schema_ref`` when that is an absolute
    URI (the schema's published address); else :func:`default_id`.
    """
    if draft not in DIALECTS:
        raise ValueError(f"unknown JSON Schema draft {draft!r}; use one of {', '.join(DRAFTS)}")
    schema = model.model_json_schema(mode="validation")
    if "$ref" in schema and "properties" not in schema:
        # A recursive model: pydantic's root is only a $ref to its own definition.
        # Inline a copy at the root (the store's keys go there, not into the
        # definition that nested occurrences refer to).
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = {**schema["$defs"][name], "$defs": schema["$defs"]}
    properties: dict[str, Any] = {
        SCHEMA_KEY: {
            "description": "Where editors find this document's JSON Schema (a path or URL). "
            "statestore ignores it when loading and keeps it when saving.",
            "type": "string",
        },
        COMMIT_KEY: {
            "description": "The commit stamp, written by statestore: the revision counter, "
            "who wrote the file and when, and a digest of the rest of the file. Leave it "
            "as it is when editing by hand.",
            "type": "object",
        },
        VERSION_KEY: {
            "const": version,
            "description": "The schema version of this document, written by statestore. "
            "Files at an older version are migrated when loaded.",
            "type": "integer",
        },
        **schema.get("properties", {}),
    }
    schema["properties"] = properties
    if version > 1:
        # A file without the key is read as version 1, so at later versions it is required.
        schema["required"] = [*schema.get("required", []), VERSION_KEY]
    schema[SCHEMA_KEY] = DIALECTS[draft]
    if schema_id is None:
        use_ref = schema_ref is not None and _is_absolute_uri(schema_ref)
        schema_id = schema_ref if use_ref and schema_ref else default_id(model, version)
    schema["$id"] = schema_id
    result: dict[str, Any] = _canonical(schema, draft)
    return result


def draft_of(schema: Any) -> Draft | None:
    """The draft a schema document declares in ``"$schema"``, if it is one we write."""
    if isinstance(schema, dict):
        for draft, uri in DIALECTS.items():
            if schema.get(SCHEMA_KEY) == uri:
                return draft
    return None


def dump_schema(schema: dict[str, Any]) -> str:
    """The text of a schema file: canonical order kept, two-space indent, final newline."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- canonical form


def _canonical(node: Any, draft: Draft) -> Any:
    if not isinstance(node, dict):
        return node  # true / false are schemas too
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _ONE:
            value = (
                [_canonical(v, draft) for v in value]
                if isinstance(value, list)
                else _canonical(value, draft)
            )
        elif key in _LIST and isinstance(value, list):
            value = [_canonical(v, draft) for v in value]
        elif key in _MAP and isinstance(value, dict):
            items = value.items() if key == "properties" else sorted(value.items())
            value = {name: _canonical(sub, draft) for name, sub in items}
        elif key == "required" and isinstance(value, list):
            value = sorted(value)
        out[key] = value
    if draft == "07":
        out = _to_draft_07(out)
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    first = [k for k in _FIRST if k in node]
    last = [k for k in _LAST if k in node]
    middle = sorted(k for k in node if k not in _FIRST and k not in _LAST)
    return {k: node[k] for k in (*first, *middle, *last)}


def _ref_07(ref: Any) -> Any:
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return "#/definitions/" + ref[len("#/$defs/") :]
    return ref


def _to_draft_07(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one schema object (its children are already converted)."""
    unsupported = _NOT_IN_07.intersection(node)
    if unsupported:
        raise ValueError(
            f"the schema uses {', '.join(sorted(unsupported))}, which draft-07 cannot "
            "express; export it as 2020-12"
        )
    node = dict(node)
    if "$defs" in node:
        node["definitions"] = {**node.pop("$defs"), **node.get("definitions", {})}
    if "$ref" in node:
        node["$ref"] = _ref_07(node["$ref"])
    found = node.get("discriminator")
    if isinstance(found, dict) and isinstance(found.get("mapping"), dict):
        # pydantic's (OpenAPI) discriminator maps tags to $refs: move them along.
        mapping = {k: _ref_07(v) for k, v in found["mapping"].items()}
        node["discriminator"] = {**found, "mapping": mapping}
    if "prefixItems" in node:
        # 2020-12 "items" next to "prefixItems" is draft-07's "additionalItems".
        rest = node.pop("items", None)
        node["items"] = node.pop("prefixItems")
        if rest is not None:
            node["additionalItems"] = rest
    if "dependentRequired" in node or "dependentSchemas" in node:
        deps = {**node.pop("dependentRequired", {}), **node.pop("dependentSchemas", {})}
        node["dependencies"] = dict(sorted(deps.items()))
    if "$ref" in node and len(node) > 1:
        # Before 2019-09, keywords next to "$ref" are ignored: keep them in force.
        ref = {"$ref": node.pop("$ref")}
        node["allOf"] = [ref, *node.get("allOf", [])]
    return node


# ------------------------------------------------------ statestore's own records

_OWNER_FIELDS: Final = {
    "token": "Random identifier of this holding of the lock; release and lease "
    "refresh check it before touching the lock.",
    "pid": "Process id of the holder, on its host.",
    "host": "Host name of the holder (socket.gethostname()).",
    "boot_id": "Linux boot id of the holder's host (/proc/sys/kernel/random/boot_id). "
    "Only a record with the reader's own boot id and pid namespace can be judged dead "
    "from its pid; any other is judged by its lease.",
    "start_time": "Start time of the holder process in clock ticks since boot (field 22 "
    "of /proc/<pid>/stat), so that a reused pid is not taken for the holder.",
    "pid_ns": "Inode of the holder's pid namespace; in another namespace (a container) "
    "its pid cannot be checked from here.",
    "acquired_at": "When the lock was acquired, in seconds since the Unix epoch.",
    "expires_at": "End of the holder's lease, in seconds since the Unix epoch; the "
    "holder pushes it forward while alive. Past it (plus clock-skew allowance for "
    "other hosts) the lock may be broken.",
    "lease": "Length of the lease in seconds.",
}


def _lock_owner_schema() -> dict[str, Any]:
    """Derived from :class:`LockOwner` itself, so a new field changes the schema
    (and the drift test notices) and must be described here."""
    generated = TypeAdapter(LockOwner).json_schema()
    fields: dict[str, Any] = {}
    for name, prop in generated["properties"].items():
        if name not in _OWNER_FIELDS:
            raise RuntimeError(f"LockOwner.{name} has no description in _schema._OWNER_FIELDS")
        fields[name] = {
            **{k: v for k, v in prop.items() if k != "title"},
            "description": _OWNER_FIELDS[name],
        }
    # What LockOwner.from_json insists on beyond the types (on the non-null branch).
    for name, limits in OWNER_LIMITS.items():
        branches = fields[name].get("anyOf", [fields[name]])
        next(b for b in branches if b.get("type") != "null").update(limits)
    # The reader requires every field except those that may be null.
    nullable = {n for n, p in fields.items() if {"type": "null"} in p.get("anyOf", [])}
    schema = {
        SCHEMA_KEY: DIALECTS["2020-12"],
        "$id": f"urn:statestore:format:{FORMAT.removeprefix('statestore.')}:v{FORMAT_VERSION}",
        "title": "statestore lock owner record",
        "description": "The owner.json file statestore writes inside a lock directory "
        "(by default <state file>.lock/owner.json): which process holds the lock, and "
        "until when. Readers ignore keys they do not know.",
        "type": "object",
        "properties": {
            "format": {"const": FORMAT, "description": "Names this record.", "type": "string"},
            "format_version": {
                "const": FORMAT_VERSION,
                "description": "Version of this record's format.",
                "type": "integer",
            },
            **fields,
        },
        "required": ["format", "format_version", *(n for n in fields if n not in nullable)],
    }
    result: dict[str, Any] = _canonical(schema, "2020-12")
    return result


def internal_schemas() -> dict[str, dict[str, Any]]:
    """The schemas of the records statestore writes itself, by file name.

    The lock's owner record and the state folder's marker: state files and their backups are
    the user's documents (:func:`document_schema`), temporary files are
    partial copies of them.
    """
    from ._folder_journal import marker_schema  # the folder marker: its own module

    name = FORMAT.removeprefix("statestore.")
    return {
        schema_filename(name, FORMAT_VERSION): _lock_owner_schema(),
        "folder.v1.schema.json": _canonical(marker_schema(), "2020-12"),
    }
