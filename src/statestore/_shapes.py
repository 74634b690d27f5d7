"""The model shapes a store refuses when it is built: documents that could not load back.

A state file is the dump of a model framed with the store's own keys; some
model shapes make that dump read back as something else, or not at all,
whatever the values. :func:`check_model` refuses them with a ``TypeError``
that says what to use instead; what remains (validators that change values,
custom serialisers) is settled save by save, by the check of the exact bytes
in ``_document.py``.
"""

from __future__ import annotations

import datetime
from typing import Any, get_args, get_origin

from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    PlainSerializer,
    RootModel,
    Secret,
    SecretBytes,
    SecretStr,
    WrapSerializer,
)

from ._document import RESERVED

__all__ = ["check_model"]


def check_model(model: object) -> None:
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
    serialisers) is settled save by save: see ``Document.check`` in ``_document.py``.
    """
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"StateStore needs a pydantic BaseModel subclass, not {model!r}")
    if issubclass(model, RootModel):
        root = model.model_fields["root"].annotation
        shown = root.__name__ if isinstance(root, type) and not get_args(root) else repr(root)
        raise TypeError(
            f"{model.__name__} is a RootModel: a state file is a JSON object that also "
            f"holds the store's own keys ({', '.join(map(repr, RESERVED))}), so its root "
            "cannot be the document. Wrap the value in a BaseModel with one field, for "
            f"example class State(BaseModel): value: {shown.replace('typing.', '')}"
        )
    for name, info in model.model_fields.items():
        keys = {_written_key(name, info), *_read_keys(name, info, model, paths=True)}
        clash = sorted(keys.intersection(RESERVED))
        if clash:
            raise TypeError(
                f"{model.__name__}.{name}: the key {clash[0]!r} is written by the store "
                "itself; rename the field (or its alias)"
            )
    for name, computed in model.model_computed_fields.items():
        key = computed.alias or name
        if key in RESERVED:
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
