"""Stores and models for the command line tests, named as ``cli_fixtures:<attribute>``.

Paths are placeholders: the tests pass ``--path`` (a store's path is fixed when
this module is imported, once per test session).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from statestore import StateStore


class Settings(BaseModel):
    """Version 2 of the settings: "colour" became "color"."""

    model_config = ConfigDict(extra="forbid")
    name: str
    color: str = "red"
    size: int = Field(default=1, ge=1)
    tags: list[str] = []


def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    doc["color"] = doc.pop("colour", "red")
    return doc


settings = StateStore(Settings, "placeholder/settings.json", version=2, migrations={1: _v1_to_v2})
settings_v1 = StateStore(Settings, "placeholder/settings.json")


class Counter(BaseModel):
    count: int = 0


counter = StateStore(Counter, "placeholder/counter.json", default=Counter)
not_a_store = 42


class Exploding(BaseModel):
    """A model whose validator fails with an error pydantic does not wrap."""

    value: int = 0

    @field_validator("value")
    @classmethod
    def _explode(cls, v: int) -> int:
        raise RuntimeError("validator exploded")


exploding = StateStore(Exploding, "placeholder/exploding.json")
