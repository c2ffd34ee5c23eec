"""The package's layers: every import, those inside functions included, points down the data flow, and
no module imports itself back through others. Imports under `if TYPE_CHECKING:` never run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import lensunlearn

PACKAGE = Path(lensunlearn.__file__).parent
# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = ("core", "data", "modeling", "train", "report", "lens", "eval", "unlearning", "attack",
          "search", "demo", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _from_target(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module a `from ... import` in module `name` reads, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every lensunlearn module `tree` imports, at any depth but under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom):
            target = _from_target(node, name, is_package)
            if target.startswith("lensunlearn"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)  # `from .x import module`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lensunlearn"))
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_is_in_a_layer():
    outside = sorted(m for m in import_graph() if m not in ("lensunlearn", "lensunlearn.__main__")
                     and layer(m) not in LAYERS)
    assert outside == []


def test_no_import_points_up_the_layers():
    upward = []
    for module, targets in import_graph().items():
        if layer(module) not in LAYERS:
            continue  # the package's lazy re-exports and `python -m lensunlearn`
        for target in targets:
            if layer(target) in LAYERS and LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == []


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_graph_sees_imports_inside_functions():
    """The checks above are only as good as the graph: a function-level import must be in it."""
    graph = import_graph()
    assert "lensunlearn.eval.evaluate" in graph["lensunlearn.unlearning.run"]  # imported inside `unlearn`


def test_every_import_names_a_module_that_exists():
    """The graph keeps only the imports it can resolve, so a mistyped module (relative or absolute, at any depth)
    would vanish from the checks above without a word; this names each one."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    missing = []
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lensunlearn")):
                target = _from_target(node, name, path.name == "__init__.py")
                if target not in paths:
                    missing.append(f"{name}: from {'.' * node.level}{node.module or ''} ({target})")
            elif isinstance(node, ast.Import):
                missing += [f"{name}: import {a.name}" for a in node.names
                            if a.name.startswith("lensunlearn") and a.name not in paths]
    assert missing == []
