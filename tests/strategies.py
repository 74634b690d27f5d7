"""Hypothesis strategies for JSON documents and migration chains.

``json_values()`` / ``json_documents()`` draw data that survives a JSON round
trip unchanged (no NaN or infinity, no lone surrogates) and never uses the keys
the store writes itself. ``migration_chains()`` draws a :class:`Chain` of
steps that rename, set, drop and append keys; ``Chain.apply`` is the
reference result: the step functions applied in order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "RESERVED_KEYS",
    "STEP_KEYS",
    "Chain",
    "Step",
    "json_documents",
    "json_keys",
    "json_scalars",
    "json_values",
    "migration_chains",
    "step_documents",
]

#: Top-level keys the store writes itself; documents never carry them.
RESERVED_KEYS = ("schema_version", "$schema")
#: The few keys migration steps work on, so that steps touch each other's keys.
STEP_KEYS = ("a", "b", "c", "d", "e")

_TEXT = st.characters(codec="utf-8")  # no lone surrogates: they are not UTF-8


def json_scalars() -> st.SearchStrategy[Any]:
    return st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(
        allow_nan=False, allow_infinity=False
    ) | st.text(_TEXT, max_size=20)


def json_keys() -> st.SearchStrategy[str]:
    return st.text(_TEXT, max_size=12).filter(lambda k: k not in RESERVED_KEYS)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    return st.recursive(
        json_scalars(),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(json_keys(), inner, max_size=4),
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
            out[self.key] = [*old, copy.deepcopy(self.arg)] if isinstance(old, list) else [
                copy.deepcopy(self.arg)
            ]
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
