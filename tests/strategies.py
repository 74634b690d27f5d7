"""Hypothesis strategies for JSON documents and migration chains.

``json_values()`` / ``json_documents()`` draw data that survives a JSON round
trip unchanged (no NaN or infinity, no lone surrogates) and never uses the keys
the store writes itself. ``migration_chains()`` draws a :class:`Chain` of
steps that rename, set, drop and append keys; ``Chain.apply`` is the
reference result: the step functions applied in order. ``field_kinds()`` and
``models()`` draw pydantic models made with ``create_model`` from a catalogue
of field types (:class:`FieldKind`), each with values of its own type, values
pydantic coerces to it, and values it refuses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, create_model

from statestore._document import RESERVED

__all__ = [
    "RESERVED_KEYS",
    "STEP_KEYS",
    "Chain",
    "FieldKind",
    "Step",
    "Sub",
    "field_kinds",
    "json_documents",
    "json_keys",
    "json_scalars",
    "json_values",
    "migration_chains",
    "models",
    "step_documents",
]

#: Top-level keys the store writes itself; documents never carry them (the
#: library's own list, so a key added there is left out here too).
RESERVED_KEYS: tuple[str, ...] = tuple(RESERVED)
#: The few keys migration steps work on, so that steps touch each other's keys.
STEP_KEYS = ("a", "b", "c", "d", "e")

_TEXT = st.characters(codec="utf-8")  # no lone surrogates: they are not UTF-8


def json_scalars() -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(_TEXT, max_size=20)
    )


def json_keys() -> st.SearchStrategy[str]:
    return st.text(_TEXT, max_size=12).filter(lambda k: k not in RESERVED_KEYS)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    return st.recursive(
        json_scalars(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys(), inner, max_size=4),
        max_leaves=max_leaves,
    )


def json_documents(max_size: int = 6) -> st.SearchStrategy[dict[str, Any]]:
    """A top-level JSON object, as stored in a state file (without the store's keys)."""
    return st.dictionaries(json_keys(), json_values(), max_size=max_size)


def step_documents() -> st.SearchStrategy[dict[str, Any]]:
    """A document over :data:`STEP_KEYS`, the keys migration steps work on."""
    return st.dictionaries(st.sampled_from(STEP_KEYS), json_values(max_leaves=4), max_size=5)


@dataclass(frozen=True)
class Step:
    """One migration step, as data: ``kind`` on ``key`` (``arg``: new key or value)."""

    kind: str  # "rename" | "set" | "drop" | "append"
    key: str
    arg: Any
    in_place: bool  # change the given dict and return it, or return a new one

    def __call__(self, doc: dict[str, Any]) -> dict[str, Any]:
        out = doc if self.in_place else dict(doc)
        if self.kind == "rename":
            if self.key in out:
                out[self.arg] = out.pop(self.key)
        elif self.kind == "set":
            out[self.key] = copy.deepcopy(self.arg)
        elif self.kind == "drop":
            out.pop(self.key, None)
        elif self.kind == "append":
            old = out.get(self.key)
            out[self.key] = (
                [*old, copy.deepcopy(self.arg)]
                if isinstance(old, list)
                else [copy.deepcopy(self.arg)]
            )
        else:  # pragma: no cover - the strategy draws only the kinds above
            raise AssertionError(self.kind)
        return out


@dataclass(frozen=True)
class Chain:
    """Steps for versions ``start``, ``start + 1``, ...; the store's version is ``version``."""

    start: int
    steps: tuple[Step, ...]

    @property
    def version(self) -> int:
        return self.start + len(self.steps)

    def migrations(self) -> dict[int, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {self.start + i: step for i, step in enumerate(self.steps)}

    def apply(self, doc: dict[str, Any], from_version: int) -> dict[str, Any]:
        """The reference: the steps from ``from_version`` on, applied in order to a copy."""
        out = copy.deepcopy(doc)
        for step in self.steps[from_version - self.start :]:
            out = step(out)
        return out


def _steps() -> st.SearchStrategy[Step]:
    keys = st.sampled_from(STEP_KEYS)
    return st.one_of(
        st.builds(Step, st.just("rename"), keys, keys, st.booleans()),
        st.builds(Step, st.just("set"), keys, json_values(max_leaves=3), st.booleans()),
        st.builds(Step, st.just("drop"), keys, st.none(), st.booleans()),
        st.builds(Step, st.just("append"), keys, json_scalars(), st.booleans()),
    )


def migration_chains(min_steps: int = 1, max_steps: int = 6) -> st.SearchStrategy[Chain]:
    """A gap-free chain starting at version 1 to 3, with ``min_steps`` to ``max_steps`` steps."""
    return st.builds(
        Chain,
        st.integers(1, 3),
        st.lists(_steps(), min_size=min_steps, max_size=max_steps).map(tuple),
    )


# ------------------------------------------------------------ generated models


class Sub(BaseModel):
    """The nested model of the catalogue."""

    a: int = 0
    b: str = ""


@dataclass(frozen=True)
class FieldKind:
    """A field type, its default, and what may be assigned to it.

    ``valid``: values of the field's own type. ``coercible``: values of another
    type that pydantic's lax mode turns into a valid one (``"3"`` for an ``int``).
    ``invalid``: values the field refuses. Python-mode and JSON-mode validation
    agree on all of them, so ``Model.model_validate`` is the reference.
    """

    name: str
    annotation: Any
    default: Any
    valid: st.SearchStrategy[Any]
    coercible: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any]


_SMALL = st.integers(-(2**40), 2**40)
_FLOATS = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)
_WORDS = st.text(_TEXT, max_size=8)
_NOT_NUMBERS = st.sampled_from(["", "x", "3x", "one", "[]"])


def _catalogue() -> list[FieldKind]:
    numeric_text = _SMALL.map(str)
    return [
        FieldKind(
            "int",
            int,
            0,
            _SMALL,
            numeric_text | _SMALL.map(float) | st.booleans(),
            _NOT_NUMBERS | st.just(1.5) | st.none() | st.just([1]),
        ),
        FieldKind(
            "int>=0",
            Annotated[int, Field(ge=0)],
            0,
            st.integers(0, 2**40),
            st.integers(0, 2**40).map(str),
            st.integers(-(2**40), -1) | st.integers(-(2**40), -1).map(str),
        ),
        FieldKind(
            "float",
            float,
            0.0,
            _FLOATS,
            _SMALL | numeric_text | _FLOATS.map(repr),
            _NOT_NUMBERS | st.none() | st.just({}),
        ),
        FieldKind(
            "str",
            str,
            "",
            _WORDS,
            st.nothing(),
            _SMALL | st.none() | st.just(["x"]) | st.booleans(),
        ),
        FieldKind(
            "str<=5",
            Annotated[str, Field(max_length=5)],
            "",
            st.text(_TEXT, max_size=5),
            st.nothing(),
            st.text(_TEXT, min_size=6, max_size=12),
        ),
        FieldKind(
            "bool",
            bool,
            False,
            st.booleans(),
            st.sampled_from([0, 1, "true", "false", "yes", "no", "on", "off", "1", "0"]),
            st.sampled_from(["maybe", 2, -1, 0.5, None, "2"]),
        ),
        FieldKind(
            "list[int]",
            list[int],
            [],
            st.lists(_SMALL, max_size=4),
            st.lists(_SMALL, max_size=4).map(tuple)
            | st.lists(numeric_text, min_size=1, max_size=4),
            st.just("not a list") | st.lists(_NOT_NUMBERS, min_size=1, max_size=3),
        ),
        FieldKind(
            "dict[str,int]",
            dict[str, int],
            {},
            st.dictionaries(_WORDS, _SMALL, max_size=3),
            st.dictionaries(_WORDS, numeric_text, min_size=1, max_size=3),
            st.dictionaries(_WORDS, _NOT_NUMBERS, min_size=1, max_size=3) | st.just([1]),
        ),
        FieldKind(
            "Optional[int]",
            int | None,
            None,
            st.none() | _SMALL,
            numeric_text,
            _NOT_NUMBERS | st.just([]),
        ),
        FieldKind(
            "Literal",
            Literal["a", "b"],
            "a",
            st.sampled_from(["a", "b"]),
            st.nothing(),
            st.sampled_from(["c", "", "A"]) | _SMALL,
        ),
        FieldKind(
            "Sub",
            Sub,
            Sub(),
            st.builds(Sub, a=_SMALL, b=_WORDS),
            st.fixed_dictionaries({"a": numeric_text}, optional={"b": _WORDS}),
            st.just(3) | st.fixed_dictionaries({"a": _NOT_NUMBERS}),
        ),
        FieldKind(
            "list[Sub]",
            list[Sub],
            [],
            st.lists(st.builds(Sub, a=_SMALL), max_size=3),
            st.lists(st.fixed_dictionaries({"a": _SMALL}), min_size=1, max_size=3),
            st.just([{"a": "x"}]) | st.just({"a": 1}),
        ),
    ]


def field_kinds() -> st.SearchStrategy[FieldKind]:
    """One field type of the catalogue."""
    return st.sampled_from(_catalogue())


def models(max_fields: int = 5) -> st.SearchStrategy[tuple[type[BaseModel], list[FieldKind]]]:
    """A model made with ``create_model`` (fields ``f0``, ``f1``, ...; every field has
    a default, some an alias ``F0``, ...; ``extra`` ignore or forbid), and the kind of
    each of its fields."""

    def build(
        kinds: list[FieldKind], aliased: list[bool], extra: str
    ) -> tuple[type[BaseModel], list[FieldKind]]:
        fields: dict[str, Any] = {
            f"f{i}": (k.annotation, Field(k.default, alias=f"F{i}" if a else None))
            for i, (k, a) in enumerate(zip(kinds, aliased, strict=False))
        }
        model = create_model(  # type: ignore[call-overload]
            "Generated", __config__=ConfigDict(extra=extra), **fields
        )
        return model, kinds

    return st.builds(
        build,
        st.lists(field_kinds(), min_size=1, max_size=max_fields),
        st.lists(st.booleans(), min_size=max_fields, max_size=max_fields),
        st.sampled_from(["ignore", "forbid"]),
    )
