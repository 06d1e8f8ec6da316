"""A method plugin's listing facts read from its source, without importing it (so without torch).

``kdcli methods list`` answers from this in well under a second.  Only a class
that subclasses ``Method`` (directly, or through base classes read the same way,
as the RepDistiller family's shared base) and sets its facts as literals is read
this way; anything else (a computed summary, a base from elsewhere, a module that
is not plain source) returns None and the caller imports the plugin instead.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path

from kdcli.defaults import API_VERSION

# The defaults of ``kdcli.method.Method`` that a plugin class may leave out (tests/test_plugins.py checks they agree).
METHOD_DEFAULTS: dict[str, object] = {"api_version": API_VERSION, "roles": frozenset({"distill"}), "teacher_use": "required", "summary": ""}


@dataclass(frozen=True)
class MethodFacts:
    """What the listing shows of a method: the jobs it serves, its use of a teacher, one line about it."""

    api_version: str
    roles: frozenset[str]
    teacher_use: str
    summary: str


def read_method_facts(target: str) -> MethodFacts | None:
    """The facts of the class an entry point names (``module:Class``), or None when the source does not tell."""
    module, _, name = target.partition(":")
    values = _class_facts(module, name, depth=MAX_BASES)
    return None if values is None else MethodFacts(**values)  # type: ignore[arg-type]


MAX_REEXPORTS = 3  # a package's ``__init__`` re-exporting its method class, as kdcli-dkd's does
MAX_BASES = 3  # base classes between a plugin class and ``Method``


def _class_facts(module: str, name: str, *, depth: int) -> dict[str, object] | None:
    """``Method``'s defaults, overlaid by each base's literal facts, then by the class's own."""
    found = _class_definition(module, name, hops=MAX_REEXPORTS)
    if found is None or depth < 0:
        return None
    origin, node = found
    base = _single_base(node)
    if base is None:
        return None
    values = dict(METHOD_DEFAULTS) if base == "Method" else _class_facts(origin, base, depth=depth - 1)
    if values is None:
        return None
    for target_name, value in _class_assignments(node):
        if target_name in values:
            literal = _literal(value)
            if literal is None or type(literal) is not type(METHOD_DEFAULTS[target_name]):
                return None
            values[target_name] = literal
    return values


def _class_definition(module: str, name: str, *, hops: int) -> tuple[str, ast.ClassDef] | None:
    """``class name`` at the top of ``module`` and the module it is in, following ``from M import name``
    re-exports up to ``hops`` times."""
    path = module_file(module)
    if path is None or not name.isidentifier():
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        if isinstance(node, ast.ImportFrom) and hops > 0 and any(alias.name == name and alias.asname is None for alias in node.names):
            origin = _absolute_module(module, node, is_package=path.name == "__init__.py")
            return None if origin is None else _class_definition(origin, name, hops=hops - 1)
    return None


def _absolute_module(module: str, node: ast.ImportFrom, *, is_package: bool) -> str | None:
    """The module a ``from ... import`` in ``module`` names (relative imports resolved as Python does)."""
    if node.level == 0:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(package):
        return None
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def module_file(module: str) -> Path | None:
    """The ``.py`` file of ``module``, found without importing it or its parent packages (whose
    ``__init__`` may import torch)."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name is found, not imported
    except (ImportError, ValueError):
        return None
    for depth in range(len(rest)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = PathFinder.find_spec(".".join([top, *rest[: depth + 1]]), list(spec.submodule_search_locations))
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _single_base(node: ast.ClassDef) -> str | None:
    """The name of the class's one base ("Method" for ``Method`` or ``x.Method``); None for anything else."""
    if len(node.bases) != 1 or node.keywords:
        return None
    base = node.bases[0]
    if isinstance(base, ast.Attribute) and base.attr == "Method":
        return "Method"
    return base.id if isinstance(base, ast.Name) else None


def _class_assignments(node: ast.ClassDef) -> list[tuple[str, ast.expr]]:
    pairs = []
    for statement in node.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
            pairs.append((statement.targets[0].id, statement.value))
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value is not None:
            pairs.append((statement.target.id, statement.value))
    return pairs


def _literal(value: ast.expr) -> object:
    """A string, or ``frozenset({...})`` of strings (how roles are written); None for anything else."""
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
    is_frozenset = isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "frozenset"
    if is_frozenset and len(value.args) == 1 and not value.keywords and isinstance(value.args[0], (ast.Set, ast.List, ast.Tuple)):
        items = value.args[0].elts
        if all(isinstance(item, ast.Constant) and isinstance(item.value, str) for item in items):
            return frozenset(item.value for item in items)  # type: ignore[union-attr]
    return None
