"""JSON Schema export: canonical output, both dialects, and schemas that agree with the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, Draft202012Validator
from jsonschema.protocols import Validator
from pydantic import BaseModel, ConfigDict, Field

from statestore import LockOwner, StateStore, StateValidationError
from statestore._document import strip_stamp
from statestore._lock.record import new_owner
from statestore._schema import DIALECTS, document_schema, dump_schema, internal_schemas

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
REGENERATE = "python -m statestore schema internal --out schemas/"
VALIDATORS: dict[str, type[Validator]] = {"2020-12": Draft202012Validator, "07": Draft7Validator}


class Address(BaseModel):
    street: str
    number: int = Field(ge=1)


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    lives: int = 9


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    good: bool = True


class Person(BaseModel):
    """A model that makes pydantic emit $defs, $ref with siblings, prefixItems,
    a discriminated union, nullable fields, an alias and set/dict defaults."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    age: int = Field(default=0, ge=0)
    home: Address = Address(street="Main", number=1)
    work: Address | None = None
    point: tuple[int, str] = (0, "origin")
    history: tuple[float, ...] = ()
    pet: Annotated[Cat | Dog, Field(discriminator="kind")] = Cat()
    tags: frozenset[str] = frozenset({"b", "a", "c"})
    scores: dict[str, int] = {"z": 1, "a": 2}
    nick: str = Field(default="", alias="nickName", description="shown in the UI")


class Node(BaseModel):
    """Recursive: pydantic's root schema is only a $ref."""

    name: str
    children: list[Node] = []


class Empty(BaseModel):
    pass


MODELS: dict[str, type[BaseModel]] = {"person": Person, "node": Node, "empty": Empty}
GOOD: dict[str, BaseModel] = {
    "person": Person(
        name="Ada",
        age=36,
        work=Address(street="Lab", number=7),
        point=(3, "x"),
        history=(1.5, 2.0),
        pet=Dog(good=False),
        tags=frozenset({"x"}),
        nickName="ada",
    ),
    "node": Node(name="root", children=[Node(name="a", children=[Node(name="b")])]),
    "empty": Empty(),
}
# Documents the model rejects for a type or a missing field (without the store's keys).
BAD: list[tuple[str, dict[str, Any]]] = [
    ("person", {}),
    ("person", {"name": 3}),
    ("person", {"name": "a", "age": "old"}),
    ("person", {"name": "a", "age": -1}),
    ("person", {"name": "a", "home": {"street": "x"}}),
    ("person", {"name": "a", "home": {"street": "x", "number": 0}}),
    ("person", {"name": "a", "work": {"number": 1}}),
    ("person", {"name": "a", "point": [1]}),
    ("person", {"name": "a", "point": [1, "b", 3]}),
    ("person", {"name": "a", "point": ["a", "b"]}),
    ("person", {"name": "a", "history": [1, "x"]}),
    ("person", {"name": "a", "pet": {"kind": "fish"}}),
    ("person", {"name": "a", "pet": {"kind": "cat", "lives": "many"}}),
    ("person", {"name": "a", "tags": "abc"}),
    ("person", {"name": "a", "scores": {"a": "x"}}),
    ("person", {"name": "a", "nickName": 5}),
    ("person", {"name": "a", "surprise": 1}),
    ("node", {"children": []}),
    ("node", {"name": "a", "children": [{"name": "b", "children": [{"children": []}]}]}),
    ("node", {"name": "a", "children": {"name": "b"}}),
]


def validator(store: StateStore[Any], draft: str) -> Validator:
    schema = store.json_schema(draft)  # type: ignore[arg-type]
    cls = VALIDATORS[draft]
    cls.check_schema(schema)
    return cls(schema)


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [v for k, v in node.items() if k == "$ref"]
        return own + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in keys(v)}
    return set()


# ------------------------------------------------------------------ canonical form


def test_layout_is_canonical(tmp_path: Path) -> None:
    schema = StateStore(Person, tmp_path / "p.json", version=3).json_schema()
    assert list(schema)[:2] == ["$schema", "$id"]
    assert list(schema)[-1] == "$defs"
    middle = list(schema)[2:-1]
    assert middle == sorted(middle)
    # Properties keep the model's order, after the keys the store itself writes.
    assert list(schema["properties"]) == [
        "$schema",
        "$commit",
        "schema_version",
        "name",
        "age",
        "home",
        "work",
        "point",
        "history",
        "pet",
        "tags",
        "scores",
        "nickName",
    ]
    assert schema["required"] == ["name", "schema_version"]
    assert schema["properties"]["schema_version"] == {
        "const": 3,
        "description": "The schema version of this document, written by statestore. "
        "Files at an older version are migrated when loaded.",
        "type": "integer",
    }
    assert schema["properties"]["$schema"]["type"] == "string"
    assert schema["properties"]["tags"]["default"] == ["a", "b", "c"]
    text = dump_schema(schema)
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text.startswith(
        '{\n  "$schema": "https://json-schema.org/draft/2020-12/schema",\n  "$id": '
    )
    assert json.loads(text) == schema


def test_version_1_does_not_require_the_version_key(tmp_path: Path) -> None:
    schema = StateStore(Person, tmp_path / "p.json").json_schema()
    assert schema["required"] == ["name"]
    assert Draft202012Validator(schema).is_valid({"name": "no version key"})


@pytest.mark.parametrize("draft", ["2020-12", "07"])
def test_same_model_same_bytes_in_other_processes(tmp_path: Path, draft: str) -> None:
    here = dump_schema(document_schema(Person, 2, draft=draft))  # type: ignore[arg-type]
    assert here == dump_schema(document_schema(Person, 2, draft=draft))  # type: ignore[arg-type]
    # Set defaults and dict order must not depend on string hashing.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from test_schema import Person; from statestore._schema import *; "
        f"sys.stdout.write(dump_schema(document_schema(Person, 2, draft={draft!r})))"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        # The $id names the model's module, which is test_schema in both.
        assert out.replace("test_schema.Person", "MODULE") == here.replace(
            f"{Person.__module__}.Person", "MODULE"
        )


# ---------------------------------------------------------------------- dialects


def test_2020_12_is_pydantic_s_dialect(tmp_path: Path) -> None:
    schema = StateStore(Person, tmp_path / "p.json").json_schema("2020-12")
    assert schema["$schema"] == DIALECTS["2020-12"]
    assert DIALECTS["2020-12"] == "https://json-schema.org/draft/2020-12/schema"
    assert "prefixItems" in schema["properties"]["point"]
    assert set(refs(schema)) == {"#/$defs/Address", "#/$defs/Cat", "#/$defs/Dog"}
    Draft202012Validator.check_schema(schema)


def test_draft_07_conversion(tmp_path: Path) -> None:
    schema = StateStore(Person, tmp_path / "p.json").json_schema("07")
    Draft7Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert list(schema)[-1] == "definitions"
    assert sorted(schema["definitions"]) == ["Address", "Cat", "Dog"]
    assert "$defs" not in keys(schema) and "prefixItems" not in keys(schema)
    assert set(refs(schema)) == {"#/definitions/Address", "#/definitions/Cat", "#/definitions/Dog"}
    point = schema["properties"]["point"]
    assert point["items"] == [{"type": "integer"}, {"type": "string"}]
    assert "additionalItems" not in point  # maxItems already bounds it
    # A $ref with siblings is wrapped: before 2019-09 its siblings would be ignored.
    assert schema["properties"]["home"] == {
        "allOf": [{"$ref": "#/definitions/Address"}],
        "default": {"number": 1, "street": "Main"},
    }
    assert schema["properties"]["pet"]["discriminator"]["mapping"] == {
        "cat": "#/definitions/Cat",
        "dog": "#/definitions/Dog",
    }


def test_draft_07_converts_keywords_pydantic_emits_only_by_request() -> None:
    class Mixed(BaseModel):
        model_config = ConfigDict(json_schema_extra={"dependentRequired": {"b": ["a"]}})
        a: int = 0
        b: int = 0
        # tuple[int, *tuple[str, ...]], as pydantic writes it where it supports it.
        rest: list[Any] = Field(
            default=[0],
            json_schema_extra={"prefixItems": [{"type": "integer"}], "items": {"type": "string"}},
        )

    schema = document_schema(Mixed, 1, draft="07")
    assert schema["dependencies"] == {"b": ["a"]}
    assert schema["properties"]["rest"]["items"] == [{"type": "integer"}]
    assert schema["properties"]["rest"]["additionalItems"] == {"type": "string"}
    check = Draft7Validator(schema)
    assert check.is_valid({"a": 1, "b": 2, "rest": [1, "x", "y"]})
    assert not check.is_valid({"b": 2})
    assert not check.is_valid({"rest": [1, 2]})


def test_draft_07_refuses_what_it_cannot_express() -> None:
    class Closed(BaseModel):
        model_config = ConfigDict(json_schema_extra={"unevaluatedProperties": False})
        a: int = 0

    assert document_schema(Closed, 1)["unevaluatedProperties"] is False
    with pytest.raises(ValueError, match=r"unevaluatedProperties.*export it as 2020-12"):
        document_schema(Closed, 1, draft="07")


def test_unknown_draft_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown JSON Schema draft '04'; use one of 2020-12, 07"):
        StateStore(Person, tmp_path / "p.json").json_schema("04")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- $id


def test_id_is_a_stable_urn_by_default(tmp_path: Path) -> None:
    schema = StateStore(Person, tmp_path / "p.json", version=4).json_schema()
    assert schema["$id"] == f"urn:statestore:model:{Person.__module__}.Person:v4"


def test_id_of_a_local_class_is_a_valid_uri() -> None:
    class Local(BaseModel):
        a: int = 0

    schema_id = document_schema(Local, 1)["$id"]
    assert "<" not in schema_id
    assert schema_id.endswith(".test_id_of_a_local_class_is_a_valid_uri.%3Clocals%3E.Local:v1")


@pytest.mark.parametrize(
    ("schema_ref", "schema_id", "expected"),
    [
        ("https://example.org/p.v1.schema.json", None, "https://example.org/p.v1.schema.json"),
        ("./person.schema.json", None, "urn:statestore:model:{module}.Person:v1"),
        ("C:\\schemas\\person.json", None, "urn:statestore:model:{module}.Person:v1"),
        ("https://example.org/x.json", "urn:example:person", "urn:example:person"),
    ],
    ids=["absolute-ref", "relative-ref", "windows-path", "explicit-id"],
)
def test_id_choice(tmp_path: Path, schema_ref: str, schema_id: str | None, expected: str) -> None:
    store = StateStore(Person, tmp_path / "p.json", schema_ref=schema_ref)
    expected = expected.format(module=Person.__module__)
    assert store.json_schema(schema_id=schema_id)["$id"] == expected


# ------------------------------------------------ the schema agrees with the model


@pytest.mark.parametrize("draft", ["2020-12", "07"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("schema_ref", [None, "./model.schema.json"], ids=["plain", "schema_ref"])
@pytest.mark.parametrize("name", list(MODELS))
def test_documents_the_store_writes_validate(
    tmp_path: Path, name: str, schema_ref: str | None, version: int, draft: str
) -> None:
    path = tmp_path / "state.json"
    migrations = {1: lambda d: d} if version == 2 else None
    store = StateStore(
        MODELS[name], path, version=version, migrations=migrations, schema_ref=schema_ref
    )
    store.save(GOOD[name])
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["schema_version"] == version
    assert ("$schema" in doc) == (schema_ref is not None)
    errors = [e.message for e in validator(store, draft).iter_errors(doc)]
    assert errors == []


@pytest.mark.parametrize("draft", ["2020-12", "07"])
@pytest.mark.parametrize(("name", "bad"), BAD, ids=[json.dumps(b)[:40] for _, b in BAD])
def test_documents_the_model_rejects_fail_the_schema(
    tmp_path: Path, name: str, bad: dict[str, Any], draft: str
) -> None:
    path = tmp_path / "state.json"
    store = StateStore(MODELS[name], path)
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(StateValidationError):
        store.load()
    assert not validator(store, draft).is_valid(bad)


@pytest.mark.parametrize("draft", ["2020-12", "07"])
def test_wrong_version_key_fails_the_schema(tmp_path: Path, draft: str) -> None:
    store = StateStore(Empty, tmp_path / "e.json", version=2, migrations={1: lambda d: d})
    check = validator(store, draft)
    assert check.is_valid({"schema_version": 2})
    assert not check.is_valid({"schema_version": 1})
    assert not check.is_valid({})  # a file without the key is version 1
    assert not check.is_valid({"schema_version": 2, "$schema": 5})


_addresses = st.builds(Address, street=st.text(max_size=5), number=st.integers(1, 2**40))
_people = st.builds(
    Person,
    name=st.text(max_size=8),
    age=st.integers(0, 200),
    home=_addresses,
    work=st.none() | _addresses,
    point=st.tuples(st.integers(), st.text(max_size=3)),
    history=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3).map(tuple),
    pet=st.builds(Cat, lives=st.integers()) | st.builds(Dog, good=st.booleans()),
    tags=st.frozensets(st.text(max_size=3), max_size=3),
    scores=st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    nickName=st.text(max_size=5),
)


@settings(max_examples=40, deadline=None)
@given(person=_people)
def test_any_saved_person_validates(
    tmp_path_factory: pytest.TempPathFactory, person: Person
) -> None:
    path = tmp_path_factory.mktemp("p") / "state.json"
    store = StateStore(Person, path, version=2, migrations={1: lambda d: d}, durable=False)
    store.save(person)
    doc = json.loads(path.read_text(encoding="utf-8"))
    for draft in VALIDATORS:
        assert validator(store, draft).is_valid(doc)


# ---------------------------------------------------------- "$schema" in documents


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    theme: str = "light"
    size: int = 12


def test_editor_document_with_schema_key_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    # As an editor leaves it: its own "$schema", no version key, different layout.
    path.write_text('{"$schema": "./settings.schema.json", "theme": "dark"}', encoding="utf-8")
    store = StateStore(Settings, path)
    assert store.load() == Settings(theme="dark")
    store.update(lambda s: s.model_copy(update={"size": 14}))
    assert strip_stamp(path.read_bytes()).decode() == (
        '{\n  "$schema": "./settings.schema.json",\n  "schema_version": 1,\n'
        '  "theme": "dark",\n  "size": 14\n}\n'
    )
    assert store.load() == Settings(theme="dark", size=14)
    doc = json.loads(path.read_text(encoding="utf-8"))
    for draft in VALIDATORS:
        assert validator(store, draft).is_valid(doc)


def test_schema_ref_writes_the_schema_key(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    store = StateStore(Settings, path, schema_ref="https://example.org/settings.v1.schema.json")
    store.save(Settings())
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert list(doc)[:3] == ["$schema", "$commit", "schema_version"]
    assert doc["$schema"] == store.json_schema()["$id"]
    assert store.load() == Settings()
    for draft in VALIDATORS:
        assert validator(store, draft).is_valid(doc)


# ------------------------------------------------------ statestore's own records


def owner_schema() -> dict[str, Any]:
    return internal_schemas()["lock-owner.v1.schema.json"]


def test_lock_owner_records_validate() -> None:
    check = Draft202012Validator(owner_schema())
    Draft202012Validator.check_schema(owner_schema())
    record = json.loads(new_owner(30.0).to_json())
    assert check.is_valid(record)
    # Optional identity fields may be null (no /proc), and unknown keys are allowed.
    assert check.is_valid({**record, "boot_id": None, "start_time": None, "pid_ns": None, "x": 1})


@pytest.mark.parametrize(
    "change",
    [
        {"token": ""},
        {"pid": 0},
        {"pid": "12"},
        {"format": "other"},
        {"format_version": 2},
        {"expires_at": "soon"},
        {"token": None},
    ],
    ids=lambda c: next(iter(c)) + "=" + json.dumps(next(iter(c.values()))),
)
def test_lock_owner_records_the_reader_rejects_fail_the_schema(change: dict[str, Any]) -> None:
    record = {**json.loads(new_owner(30.0).to_json()), **change}
    with pytest.raises(ValueError):
        LockOwner.from_json(json.dumps(record).encode())
    assert not Draft202012Validator(owner_schema()).is_valid(record)


@pytest.mark.parametrize("field", ["token", "pid", "host", "acquired_at", "expires_at", "lease"])
def test_lock_owner_required_fields(field: str) -> None:
    record = json.loads(new_owner(30.0).to_json())
    del record[field]
    with pytest.raises(ValueError):
        LockOwner.from_json(json.dumps(record).encode())
    assert not Draft202012Validator(owner_schema()).is_valid(record)


def test_schemas_folder_is_up_to_date() -> None:
    """The drift check: regenerate the schemas of statestore's own records and compare."""
    expected = {name: dump_schema(schema) for name, schema in internal_schemas().items()}
    stale = [
        name
        for name, text in expected.items()
        if not (SCHEMAS / name).is_file() or (SCHEMAS / name).read_text(encoding="utf-8") != text
    ]
    assert not stale, (
        f"schemas/ is out of date for {', '.join(stale)}. Regenerate it from the repository "
        f"root with:  {REGENERATE}  and commit the result. If that format was already "
        "released, bump its format version first (a published schema never changes)."
    )
