"""The public names: ``statestore.__all__`` is exactly the package's public names.

Checked for consistency, not against a fixed list, so that adding a public name
means adding it to ``__all__`` (and nothing else): every name listed exists and
is public, no public name is missing, and every error class shows (and pickles)
as ``statestore.<Name>``, the name it is imported by.
"""

from __future__ import annotations

import importlib
import pickle
import types
from collections.abc import Iterator

import pytest

import statestore
from statestore import StateStoreError


def _public(module: types.ModuleType) -> set[str]:
    """Names a user sees on the module: not private, not a subpackage or submodule."""
    return {
        name
        for name in dir(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    }


def test_all_is_sorted_and_has_no_duplicates() -> None:
    assert statestore.__all__ == sorted(set(statestore.__all__))


def test_every_listed_name_exists_and_is_public() -> None:
    for name in statestore.__all__:
        assert not name.startswith("_"), name
        assert hasattr(statestore, name), f"statestore.__all__ lists {name}, which is missing"
        assert not isinstance(getattr(statestore, name), types.ModuleType), name


def test_no_public_name_is_missing_from_all() -> None:
    assert set(statestore.__all__) == _public(statestore)


def _error_classes(root: type[StateStoreError] = StateStoreError) -> Iterator[type]:
    yield root
    for sub in root.__subclasses__():
        yield from _error_classes(sub)


def _library_errors() -> set[type]:
    # Subclasses made by the library itself, not by tests or users.
    return {
        cls
        for cls in _error_classes()
        if cls.__module__ == "statestore" or cls.__module__.startswith("statestore.")
    }


def test_every_public_error_is_exported_under_its_public_name() -> None:
    public = {cls for cls in _library_errors() if not cls.__name__.startswith("_")}
    assert public, "no error classes found"
    for cls in public:
        assert cls.__module__ == "statestore", f"{cls.__qualname__} shows as {cls.__module__}"
        assert cls.__name__ in statestore.__all__, f"{cls.__name__} is not exported"
        assert getattr(statestore, cls.__name__) is cls


@pytest.mark.parametrize(
    "name",
    [n for n in statestore.__all__ if isinstance(getattr(statestore, n), type)],
)
def test_public_classes_pickle_by_the_name_they_show(name: str) -> None:
    cls = getattr(statestore, name)
    # The module a class names must give the class back: pickling (and the
    # traceback's "module.Name") depends on it.
    assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls
    if issubclass(cls, BaseException):
        assert cls.__module__ == "statestore"
        assert f"<class 'statestore.{name}'>" == repr(cls)


@pytest.mark.parametrize(
    "module", ["statestore.backends", "statestore.testing", "statestore.backends.file"]
)
def test_submodules_list_only_names_they_have(module: str) -> None:
    mod = importlib.import_module(module)
    listed = getattr(mod, "__all__", None)
    assert listed is not None, f"{module} has no __all__"
    assert sorted(set(listed)) == sorted(listed)
    for name in listed:
        assert not name.startswith("_") and hasattr(mod, name), (module, name)
