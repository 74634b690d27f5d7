"""The bytes a store publishes are those of the model that passed validation.

Rule (``statestore._store``): before the rename, the exact bytes about to be
published are read back through the path ``load()`` takes, and they are the
dump of a validated model, for every model shape the store accepts; shapes that
could never round-trip are refused when the store is built. A default is
validated like any other state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    RootModel,
    SecretBytes,
    SecretStr,
    ValidationError,
    computed_field,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from strategies import FieldKind, models

from statestore import AsyncStateStore, StateStore, StateValidationError
from statestore._document import strip_stamp


class Settings(BaseModel):
    max_recent: int = 5
    ratio: float = 0.5
    label: str = ""
    enabled: bool = False
    tags: list[int] = []
    limit: int | None = None


class Part(BaseModel):
    a: int = 0
    b: str = ""


class Holder(BaseModel):
    part: Part = Part()
    parts: list[Part] = []
    counts: dict[str, int] = {}


class Positive(BaseModel):
    n: Annotated[int, Field(ge=0)] = 0


@contextmanager
def no_warnings() -> Iterator[None]:
    """Whatever the test run's filters: any warning raised inside fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [str(w.message) for w in caught] == []


def body_of(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    doc.pop("schema_version")
    doc.pop("$schema", None)
    doc.pop("$commit", None)
    return doc


def fits_schema(store: StateStore[Any]) -> None:
    doc = json.loads(store.path.read_bytes())
    jsonschema.Draft202012Validator(store.json_schema()).validate(doc)
    jsonschema.Draft7Validator(store.json_schema("07")).validate(doc)


def expected_bytes(model: BaseModel) -> bytes:
    """The file the store writes for ``model`` (version 1, no schema_ref)."""
    body = model.model_dump_json(indent=2, by_alias=True).encode()
    if body == b"{}":
        return b'{\n  "schema_version": 1\n}\n'
    return b'{\n  "schema_version": 1,\n' + body[2:] + b"\n"


# ------------------------------------------------------ coerced values are saved coerced


def test_a_coerced_assignment_is_saved_as_the_validated_value(state_path: Path) -> None:
    store = StateStore(Settings, state_path, default=Settings)
    with no_warnings(), store.transaction() as s:
        s.max_recent = "3"  # type: ignore[assignment]
    assert body_of(state_path)["max_recent"] == 3
    assert strip_stamp(state_path.read_bytes()) == expected_bytes(Settings(max_recent=3))
    fits_schema(store)
    assert store.load() == Settings(max_recent=3)
    # The CLI agrees, and so does the schema: no other reader sees "3".
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "statestore",
            "validate",
            "test_validated_bytes:Settings",
            "--path",
            str(state_path),
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(__file__),
        env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)},
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("field", "value", "saved"),
    [
        ("max_recent", 7.0, 7),
        ("max_recent", True, 1),
        ("ratio", "1.25", 1.25),
        ("ratio", 2, 2.0),
        ("label", b"bytes", "bytes"),
        ("enabled", "yes", True),
        ("enabled", 0, False),
        ("tags", (1, 2), [1, 2]),
        ("tags", ["4", 5], [4, 5]),
        ("limit", "9", 9),
    ],
)
def test_every_coercion_is_saved_as_the_model_holds_it(
    state_path: Path, field: str, value: Any, saved: Any
) -> None:
    store = StateStore(Settings, state_path, default=Settings)

    def change(s: Settings) -> None:
        setattr(s, field, value)

    with no_warnings():
        returned = store.update(change)
    assert getattr(returned, field) == saved
    assert body_of(state_path)[field] == saved
    assert type(body_of(state_path)[field]) is type(saved) or isinstance(saved, list)
    assert store.load() == returned
    fits_schema(store)


def test_nested_values_are_saved_validated(state_path: Path) -> None:
    store = StateStore(Holder, state_path, default=Holder)
    with no_warnings(), store.transaction() as s:
        s.part = {"a": "4"}  # type: ignore[assignment]
        s.parts = [{"a": 1, "b": "x"}, Part(a=2)]  # type: ignore[list-item]
        s.counts = {"k": "8"}  # type: ignore[dict-item]
    want = Holder(part=Part(a=4), parts=[Part(a=1, b="x"), Part(a=2)], counts={"k": 8})
    assert strip_stamp(state_path.read_bytes()) == expected_bytes(want)
    assert store.load() == want
    fits_schema(store)


def test_every_way_in_saves_the_validated_model(tmp_path: Path) -> None:
    """save(), update() returning a copy, a frozen model, the asyncio store."""
    import asyncio

    store = StateStore(Settings, tmp_path / "a.json", default=Settings)
    with no_warnings():
        store.save(Settings.model_construct(max_recent="11"))  # type: ignore[arg-type]
    assert store.load().max_recent == 11 and body_of(store.path)["max_recent"] == 11

    with no_warnings():
        store.update(lambda s: s.model_copy(update={"ratio": "0.75"}))
    assert body_of(store.path)["ratio"] == 0.75

    class Frozen(BaseModel):
        model_config = ConfigDict(frozen=True)
        n: int = 0

    frozen = StateStore(Frozen, tmp_path / "f.json", default=Frozen)
    with no_warnings():
        out = frozen.update(lambda s: s.model_copy(update={"n": "5"}))
    assert out == Frozen(n=5) and body_of(frozen.path) == {"n": 5}

    async def run() -> Settings:
        astore = AsyncStateStore(Settings, tmp_path / "async.json", default=Settings)
        async with astore.transaction() as s:
            s.tags = ("7",)  # type: ignore[assignment]
        return await astore.load()

    with no_warnings():
        assert asyncio.run(run()).tags == [7]
    assert body_of(tmp_path / "async.json")["tags"] == [7]


def test_a_subclass_instance_is_saved_as_the_models_document(tmp_path: Path) -> None:
    class More(Settings):
        extra: int = 5

    class Closed(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = 0

    class ClosedMore(Closed):
        extra: int = 5

    for model, state, want in (
        (Settings, More(max_recent="4"), Settings(max_recent=4)),  # type: ignore[arg-type]
        (Closed, ClosedMore(n=2), Closed(n=2)),
    ):
        store = StateStore(model, tmp_path / f"{model.__name__}.json", default=model)
        with no_warnings():
            store.save(state)
        assert strip_stamp(store.path.read_bytes()) == expected_bytes(want)
        assert store.load() == want


def test_other_storages_get_the_validated_bytes_too() -> None:
    psycopg = pytest.importorskip("psycopg")
    from statestore.backends.postgres import PostgresStorage

    dsn = os.environ.get(
        "STATESTORE_PG_DSN", "postgresql://statestore:statestore@127.0.0.1:5432/statestore_test"
    )
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL not reachable through STATESTORE_PG_DSN: {e}")
    table = f"test_{uuid.uuid4().hex[:12]}"
    try:
        with PostgresStorage(dsn, key="settings", table=table, durable=False) as storage:
            store = StateStore(Settings, storage, default=Settings)
            with no_warnings(), store.transaction() as s:
                s.max_recent = "3"  # type: ignore[assignment]
            assert strip_stamp(storage.read() or b"") == expected_bytes(Settings(max_recent=3))
            before = storage.read()
            with (
                no_warnings(),
                pytest.raises(StateValidationError) as caught,
                store.transaction() as s,
            ):
                s.max_recent = "three"  # type: ignore[assignment]
            assert caught.value.errors[0]["loc"] == ["max_recent"]
            assert storage.read() == before
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name in (table, f"{table}_backups"):
                conn.execute(f'DROP TABLE IF EXISTS "{name}"')


def test_validate_assignment_models_coerce_at_assignment(state_path: Path) -> None:
    class Checked(BaseModel):
        model_config = ConfigDict(validate_assignment=True)
        n: int = 0

    store = StateStore(Checked, state_path, default=Checked)
    with store.transaction() as s:
        s.n = "2"  # type: ignore[assignment]
    assert body_of(state_path) == {"n": 2}
    before = state_path.read_bytes()
    with pytest.raises(ValidationError), store.transaction() as s:
        s.n = "x"  # type: ignore[assignment]  # pydantic refuses it in the block
    assert state_path.read_bytes() == before


# ------------------------------------------------- a change that does not validate


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_recent", "abc"),
        ("max_recent", 1.5),
        ("enabled", "maybe"),
        ("tags", ["x"]),
        ("label", 3),
        ("limit", "none"),
        ("ratio", None),
    ],
)
def test_a_value_that_does_not_validate_names_the_field_and_writes_nothing(
    state_path: Path, field: str, value: Any
) -> None:
    store = StateStore(Settings, state_path, default=Settings)
    store.save(Settings(max_recent=1))
    before = state_path.read_bytes()
    with no_warnings(), pytest.raises(StateValidationError) as caught, store.transaction() as s:
        setattr(s, field, value)
    assert caught.value.errors and {e["loc"][0] for e in caught.value.errors} == {field}
    assert field in str(caught.value) and "nothing was written" in str(caught.value)
    assert state_path.read_bytes() == before


def test_an_invalid_change_to_a_missing_file_creates_nothing(state_path: Path) -> None:
    store = StateStore(Positive, state_path, default=Positive)
    with no_warnings(), pytest.raises(StateValidationError) as caught:
        store.update(lambda s: s.model_copy(update={"n": "-3"}))
    assert caught.value.errors[0]["loc"] == ["n"]
    assert os.listdir(state_path.parent) == []


def test_a_constraint_broken_by_a_value_of_the_right_type_is_refused(state_path: Path) -> None:
    store = StateStore(Positive, state_path, default=Positive)
    with no_warnings(), pytest.raises(StateValidationError) as caught, store.transaction() as s:
        s.n = -1
    assert caught.value.errors[0]["loc"] == ["n"]
    assert not state_path.exists()


# ------------------------------------------------------------------ defaults


def test_a_default_instance_that_breaks_the_model_is_a_validation_error(
    state_path: Path,
) -> None:
    store = StateStore(Positive, state_path, default=Positive.model_construct(n=-1))
    for attempt in (store.load, lambda: store.update(lambda s: None)):
        with no_warnings(), pytest.raises(StateValidationError) as caught:
            attempt()
        assert "default" in str(caught.value) and caught.value.errors[0]["loc"] == ["n"]
    assert not state_path.exists()


def test_a_default_factory_is_validated_each_time(state_path: Path) -> None:
    calls: list[int] = []

    def make() -> Positive:
        calls.append(1)
        return Positive.model_construct(n="4" if len(calls) == 1 else "x")  # type: ignore[arg-type]

    store = StateStore(Positive, state_path, default=make)
    with no_warnings():
        assert store.load() == Positive(n=4)  # coerced, as it would load once saved
    with no_warnings(), pytest.raises(StateValidationError) as caught:
        store.load()
    assert "make" in str(caught.value) and "default" in str(caught.value)


def test_a_default_is_handed_out_as_it_would_load_once_saved(state_path: Path) -> None:
    default = Settings.model_construct(max_recent="2", tags=("1",))  # type: ignore[arg-type]
    store = StateStore(Settings, state_path, default=default)
    with no_warnings():
        first = store.load()
        assert first == Settings(max_recent=2, tags=[1])
        first.tags.append(99)  # a fresh copy each time: the next load is unaffected
        assert store.load() == Settings(max_recent=2, tags=[1])
        saved = store.update(lambda s: None)
    assert saved == Settings(max_recent=2, tags=[1]) == store.load()
    assert strip_stamp(state_path.read_bytes()) == expected_bytes(saved)


def test_a_default_of_the_wrong_type_is_still_a_type_error(state_path: Path) -> None:
    store = StateStore(Positive, state_path, default=lambda: Settings())  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="default"):
        store.load()


# ---------------------------------------------------------------- model shapes


@pytest.mark.parametrize(
    "root", [RootModel[list[int]], RootModel[int], RootModel[dict[str, int]], RootModel[Part]]
)
def test_root_models_are_refused_when_the_store_is_built(tmp_path: Path, root: Any) -> None:
    for build in (StateStore, AsyncStateStore):
        with pytest.raises(TypeError, match=r"RootModel.*class State\(BaseModel\): value: "):
            build(root, tmp_path / "state.json")
    assert os.listdir(tmp_path) == []


def test_a_root_model_inside_a_model_round_trips(state_path: Path) -> None:
    class Ids(RootModel[list[int]]):
        pass

    class WithIds(BaseModel):
        ids: Ids = Ids([])

    store = StateStore(WithIds, state_path, default=WithIds)
    with no_warnings(), store.transaction() as s:
        s.ids = Ids(["1", 2])  # type: ignore[list-item]
    assert body_of(state_path) == {"ids": [1, 2]} and store.load() == WithIds(ids=Ids([1, 2]))


@pytest.mark.parametrize(
    "field",
    [
        Field(0, alias="schema_version"),
        Field(0, serialization_alias="$schema", validation_alias="$schema"),
        Field(0, validation_alias="schema_version"),
        Field(0, validation_alias=AliasChoices("n", "$schema")),
        Field(0, validation_alias=AliasPath("schema_version", 0)),
    ],
)
def test_a_field_on_a_store_key_is_refused(tmp_path: Path, field: Any) -> None:
    Model = type("Model", (BaseModel,), {"__annotations__": {"n": int}, "n": field})
    with pytest.raises(TypeError, match="written by the store itself"):
        StateStore(Model, tmp_path / "state.json")


def test_a_computed_field_on_a_store_key_is_refused(tmp_path: Path) -> None:
    class Computed(BaseModel):
        n: int = 0

        @computed_field(alias="schema_version")  # type: ignore[prop-decorator]
        @property
        def doubled(self) -> int:
            return 2 * self.n

    with pytest.raises(TypeError, match="schema_version"):
        StateStore(Computed, tmp_path / "state.json")


def test_a_field_written_under_a_key_it_is_not_read_from_is_refused(tmp_path: Path) -> None:
    class Lossy(BaseModel):
        n: int = Field(0, serialization_alias="N")

    class Inner(BaseModel):
        n: int = Field(0, serialization_alias="N")

    class Outer(BaseModel):
        inner: list[Inner] = []

    for model in (Lossy, Outer):
        with pytest.raises(TypeError, match="'N' but read from 'n'"):
            StateStore(model, tmp_path / "state.json")


@pytest.mark.parametrize(
    "config, field",
    [
        (ConfigDict(), Field(0, alias="N")),
        (ConfigDict(), Field(0, serialization_alias="N", validation_alias="N")),
        (ConfigDict(), Field(0, serialization_alias="N", validation_alias=AliasChoices("x", "N"))),
        (ConfigDict(populate_by_name=True), Field(0, validation_alias="other")),
        (ConfigDict(validate_by_name=True), Field(0, serialization_alias="n")),
        (ConfigDict(alias_generator=str.upper), Field(0)),
    ],
)
def test_aliased_fields_that_round_trip_are_accepted(
    state_path: Path, config: ConfigDict, field: Any
) -> None:
    Model = type(
        "Model", (BaseModel,), {"__annotations__": {"n": int}, "n": field, "model_config": config}
    )
    store = StateStore(Model, state_path, default=Model)
    with no_warnings():
        saved = store.update(lambda s: s.model_copy(update={"n": "6"}))
    assert saved.n == 6 and store.load() == saved
    assert strip_stamp(state_path.read_bytes()) == expected_bytes(saved)
    fits_schema(store)


def test_computed_fields_round_trip_only_where_they_are_ignored(tmp_path: Path) -> None:
    def make(extra: str) -> type[BaseModel]:
        class Computed(BaseModel):
            model_config = ConfigDict(extra=extra)  # type: ignore[typeddict-item]
            n: int = 0

            @computed_field  # type: ignore[prop-decorator]
            @property
            def doubled(self) -> int:
                return 2 * self.n

        return Computed

    ignoring = make("ignore")
    store = StateStore(ignoring, tmp_path / "ok.json", default=ignoring)
    with no_warnings():
        saved = store.update(lambda s: s.model_copy(update={"n": 3}))
    assert body_of(store.path) == {"n": 3, "doubled": 6} and store.load() == saved
    for extra in ("forbid", "allow"):
        with pytest.raises(TypeError, match=f"computed fields.*extra='{extra}'"):
            StateStore(make(extra), tmp_path / f"{extra}.json")

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")

        @computed_field  # type: ignore[prop-decorator]
        @property
        def one(self) -> int:
            return 1

    class Outer(BaseModel):
        inner: Inner | None = None

    with pytest.raises(TypeError, match="Inner has computed fields"):
        StateStore(Outer, tmp_path / "nested.json")


def test_excluded_fields(tmp_path: Path) -> None:
    class Cached(BaseModel):
        n: int = 0
        cache: dict[str, int] = Field(default_factory=dict, exclude=True)

    store = StateStore(Cached, tmp_path / "ok.json", default=Cached)
    with no_warnings():
        saved = store.update(lambda s: s.model_copy(update={"n": 1, "cache": {"a": 1}}))
    # Not in the file, so it loads (and is returned) as its default.
    assert body_of(store.path) == {"n": 1} and saved == Cached(n=1) == store.load()

    class Required(BaseModel):
        n: int = Field(exclude=True)

    with pytest.raises(TypeError, match=r"exclude=True.*no default"):
        StateStore(Required, tmp_path / "bad.json")


def test_secrets_are_refused_unless_the_model_writes_them(tmp_path: Path) -> None:
    class Masked(BaseModel):
        token: SecretStr = SecretStr("")

    class Inner(BaseModel):
        keys: list[SecretBytes] = []

    class Nested(BaseModel):
        inner: Inner | None = None

    for model in (Masked, Nested):
        with pytest.raises(TypeError, match=r"secret.*'\*{10}'"):
            StateStore(model, tmp_path / "state.json")

    class Revealed(BaseModel):
        token: SecretStr = SecretStr("")

        @field_serializer("token", when_used="json")
        def _reveal(self, v: SecretStr) -> str:
            return v.get_secret_value()

    class Annotated_(BaseModel):
        token: Annotated[SecretStr, PlainSerializer(lambda v: v.get_secret_value())] = SecretStr("")

    for model in (Revealed, Annotated_):
        store = StateStore(model, tmp_path / f"{model.__name__}.json", default=model)
        with no_warnings():
            store.save(model(token=SecretStr("s3cret")))
        assert store.load().token.get_secret_value() == "s3cret"  # type: ignore[attr-defined]


def test_extra_keys_round_trip_but_not_under_the_store_keys(state_path: Path) -> None:
    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")
        n: int = 0

    store = StateStore(Open, state_path, default=Open)
    with no_warnings():
        saved = store.update(lambda s: Open(n=1, note="kept"))
    assert store.load() == saved and body_of(state_path) == {"n": 1, "note": "kept"}
    before = state_path.read_bytes()
    for key in ("schema_version", "$schema"):
        with no_warnings(), pytest.raises(StateValidationError, match=f"'\\{key}'|'{key}'"):
            store.save(Open(n=2, **{key: 5}))
        assert state_path.read_bytes() == before
    # A nested key of that name is only data.
    with no_warnings():
        store.save(Open(n=3, inner={"schema_version": 9}))
    assert store.load().inner == {"schema_version": 9}  # type: ignore[attr-defined]


def test_serialisers_that_change_the_shape(tmp_path: Path) -> None:
    class AsText(BaseModel):
        n: int = 0

        @field_serializer("n")
        def _text(self, n: int) -> str:
            return str(n)

    store = StateStore(AsText, tmp_path / "text.json", default=AsText)
    with no_warnings():
        saved = store.update(lambda s: s.model_copy(update={"n": 4}))
    assert body_of(store.path) == {"n": "4"} and store.load() == saved == AsText(n=4)

    class Unreadable(BaseModel):
        n: int = 0

        @field_serializer("n")
        def _hide(self, n: int) -> str:
            return "n/a"

    store2 = StateStore(Unreadable, tmp_path / "unreadable.json", default=Unreadable)
    with no_warnings(), pytest.raises(StateValidationError) as caught:
        store2.save(Unreadable(n=1))
    assert caught.value.errors[0]["loc"] == ["n"] and not store2.path.exists()

    class AsList(BaseModel):
        n: int = 0

        @model_serializer
        def _list(self) -> list[int]:
            return [self.n]

    class Claims(BaseModel):
        n: int = 0

        @model_serializer
        def _claim(self) -> dict[str, Any]:
            return {"n": self.n, "schema_version": 99}

    for model, match in ((AsList, "not a JSON object"), (Claims, "'schema_version'")):
        bad = StateStore(model, tmp_path / f"{model.__name__}.json", default=model)
        with no_warnings(), pytest.raises(StateValidationError, match=match):
            bad.save(model(n=1))
        assert not bad.path.exists()


@pytest.mark.parametrize("mode", ["before", "wrap"])
@pytest.mark.parametrize("schema_ref", [None, "state.schema.json"])
def test_the_store_keys_are_never_the_model_input(
    state_path: Path, mode: str, schema_ref: str | None
) -> None:
    """A model validator that sees the raw input gets the same document on every
    path (load, the check before a save, a default), without the store's keys."""
    seen: list[list[str]] = []

    class Watching(BaseModel):
        n: int = 0

        if mode == "before":

            @model_validator(mode="before")
            @classmethod
            def _watch(cls, data: Any) -> Any:
                if isinstance(data, dict):
                    seen.append(sorted(data))
                return data

        else:

            @model_validator(mode="wrap")
            @classmethod
            def _watch(cls, data: Any, handler: Any) -> Any:
                if isinstance(data, dict):
                    seen.append(sorted(data))
                return handler(data)

    store = StateStore(Watching, state_path, default=Watching, schema_ref=schema_ref)
    with no_warnings():
        store.load()
        store.update(lambda s: s.model_copy(update={"n": "2"}))
        assert store.load() == Watching(n=2)
    assert ["n"] in seen and all(set(keys) <= {"n"} for keys in seen), seen


def test_what_a_save_returns_is_what_load_gives(state_path: Path) -> None:
    """Validators that change values: the returned model is the one the file loads as."""

    class Cleaned(BaseModel):
        model_config = ConfigDict(str_strip_whitespace=True)
        name: str = ""
        hits: int = 0

        @field_validator("hits")
        @classmethod
        def _double(cls, v: int) -> int:
            return v * 2  # not idempotent: each load doubles again

    store = StateStore(Cleaned, state_path, default=Cleaned)
    with no_warnings():
        saved = store.update(lambda s: s.model_copy(update={"name": "  x  ", "hits": 1}))
    assert saved == store.load()
    assert saved.name == "x"


def test_infinity_is_never_written_as_null_or_a_literal(tmp_path: Path) -> None:
    class Plain(BaseModel):
        x: float = 0.0

    class Constants(BaseModel):
        model_config = ConfigDict(ser_json_inf_nan="constants")
        x: float = 0.0

    for model in (Plain, Constants):
        store = StateStore(model, tmp_path / f"{model.__name__}.json", default=model)
        with no_warnings(), pytest.raises(StateValidationError), store.transaction() as s:
            s.x = float("inf")
        assert not store.path.exists()


# ------------------------------------------------------------------ the property


def _apply(
    store: StateStore[Any], via: str, model: type[BaseModel], changes: dict[str, Any]
) -> Any:
    if via == "transaction":
        with store.transaction() as s:
            for name, value in changes.items():
                setattr(s, name, value)
        return None
    if via == "update":

        def change(s: Any) -> None:
            for name, value in changes.items():
                setattr(s, name, value)

        return store.update(change)
    if via == "copy":
        return store.update(lambda s: s.model_copy(update=changes))
    current = store.load()
    merged = {**dict(current), **changes}
    # model_construct takes aliases where a field has one, as validation does.
    store.save(
        model.model_construct(**{model.model_fields[n].alias or n: v for n, v in merged.items()})
    )
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.data())
def test_every_published_file_loads_as_the_validated_model(
    generated: tuple[type[BaseModel], list[FieldKind]], data: st.DataObject
) -> None:
    model, kinds = generated
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.json"
        store = StateStore(model, path, default=model, durable=False)
        schema = jsonschema.Draft202012Validator(store.json_schema())
        current = model()
        for _ in range(data.draw(st.integers(1, 4), label="transactions")):
            chosen = data.draw(
                st.lists(st.integers(0, len(kinds) - 1), min_size=1, max_size=3, unique=True)
            )
            changes: dict[str, Any] = {}
            for i in chosen:
                how = data.draw(st.sampled_from(["valid", "coercible", "invalid"]))
                strategy: st.SearchStrategy[Any] = getattr(kinds[i], how)
                changes[f"f{i}"] = data.draw(strategy | kinds[i].valid, label=f"f{i} {how}")
            via = data.draw(st.sampled_from(["transaction", "update", "copy", "save"]))
            merged = {**dict(current), **changes}
            by_key = {model.model_fields[n].alias or n: v for n, v in merged.items()}
            try:
                expected: BaseModel | None = model.model_validate(by_key)
            except ValidationError:
                expected = None
            before = path.read_bytes() if path.exists() else None
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                if expected is None:
                    with pytest.raises(StateValidationError) as caught:
                        _apply(store, via, model, changes)
                    assert caught.value.errors
                    # Named by the key the file holds it under (the alias, if any).
                    named = {model.model_fields[n].alias or n for n in changes}
                    assert {e["loc"][0] for e in caught.value.errors} <= named
                    assert (path.read_bytes() if path.exists() else None) == before
                    continue
                returned = _apply(store, via, model, changes)
                loaded = store.load()
            assert loaded == expected
            if returned is not None:
                assert returned == expected
            raw = path.read_bytes()
            assert strip_stamp(raw) == expected_bytes(expected)
            schema.validate(json.loads(raw))
            current = expected
