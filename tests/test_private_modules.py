"""Private modules meet through their ``__all__``: each lists what the others take from it.

A name another module of the package (or a test, a benchmark, a tool) imports
from a private module is in that module's ``__all__``; a name in ``__all__``
that nobody imports is not; and no module of the package takes an
underscore name from another (that would be a missing public seam).

A private subpackage (``statestore._lock``) is one module to the rest of the
package: its files import each other, and every other module of statestore
takes what it needs from the package itself, never from one of its files
(tests may, for internal names).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "statestore"
ELSEWHERE = [ROOT / "tests", ROOT / "bench", ROOT / "tools"]


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(("statestore", *parts))
    return name.removesuffix(".__init__")


def _private(module: str) -> bool:
    return any(p.startswith("_") and p != "__init__" for p in module.split(".")[1:])


def _taken() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> names others take from it, underscore names taken inside the package)."""
    taken: dict[str, set[str]] = defaultdict(set)
    crossings: list[str] = []
    files = [(p, True) for p in PACKAGE.rglob("*.py")]
    files += [(p, False) for d in ELSEWHERE for p in d.rglob("*.py")]
    for path, inside in files:
        here = _module_of(path) if inside else ""
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: dict[str, str] = {}  # a module bound to a name: `from . import _lease`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("statestore") or source == here:
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if importlib.util.find_spec(full) if _is_module(full) else False:
                        aliases[alias.asname or alias.name] = full
                        continue
                    taken[source].add(alias.name)
                    if inside and alias.name.startswith("_"):
                        crossings.append(f"{here} takes {alias.name} from {source}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("statestore.") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                source = aliases[node.value.id]
                taken[source].add(node.attr)
                if inside and node.attr.startswith("_"):
                    crossings.append(f"{here} takes {node.attr} from {source}")
    return taken, crossings


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_no_module_of_the_package_takes_another_ones_underscore_names() -> None:
    assert _taken()[1] == []


def test_each_private_module_lists_what_the_others_take() -> None:
    taken = _taken()[0]
    wrong = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_of(path)
        if not _private(module):
            continue
        listed = set(getattr(importlib.import_module(module), "__all__", ()))
        wanted = {n for n in taken.get(module, set()) if not n.startswith("_")}
        if listed != wanted:
            wrong[module] = {"unused": sorted(listed - wanted), "missing": sorted(wanted - listed)}
    assert wrong == {}


SUBPACKAGES = ["statestore._lock"]


def _imports_of(path: Path) -> list[str]:
    """The statestore modules ``path`` (a file of the package) imports from."""
    here = _module_of(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append(source)
            found += [f"{source}.{a.name}" for a in node.names if _is_module(f"{source}.{a.name}")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.startswith("statestore")]


def test_no_module_outside_a_subpackage_imports_its_files() -> None:
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_of(path)
        for sub in SUBPACKAGES:
            if here == sub or here.startswith(sub + "."):
                continue
            crossings += [
                f"{here} imports {m}" for m in _imports_of(path) if m.startswith(sub + ".")
            ]
    assert crossings == []


def test_the_subpackage_rule_sees_a_file_import() -> None:
    """Positive control: an import of one of the lock's files is seen as one."""
    assert "statestore._lock.claim" in _imports_of(PACKAGE / "_lock" / "__init__.py")
