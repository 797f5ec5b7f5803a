"""No two finetune modules import each other, directly or round a longer loop, at module level or inside a function.

A cycle held apart by an import inside a function still runs, only later: it breaks when someone moves that import
to the top, and it hides which module depends on which. The graph is read from the source (ast), so the test needs
none of the heavy libraries and sees function-level imports that an import-time check would miss.

Edges: `import finetune.a.b` and `from finetune.a import b` (b a module) point at finetune.a.b; `from finetune.a
import name` (a name, not a module) points at finetune.a; relative imports are resolved. Imports under `if
TYPE_CHECKING:` are left out: they never run, they only name types for annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import finetune

ROOT = Path(finetune.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: anywhere in the file, except the bodies of `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _known(name: str) -> str | None:
    """The finetune module `name` is, or is inside (an attribute of a module); None outside finetune."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {t for alias in node.names if (t := _known(alias.name))}
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if not base.startswith("finetune"):
        return set()
    found = set()
    for alias in node.names:
        target = _known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _known(base)
        if target:
            found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    """module -> the finetune modules it imports (never itself)."""
    edges: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges[module] = {t for node in _imports(tree) for t in _targets(module, node)} - {module}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_graph_sees_what_this_file_imports():
    edges = graph()
    assert "finetune.infer.load" in edges["finetune.infer.backends"]  # module level
    assert "finetune.infer.backends" in edges["finetune.infer.chat"]  # inside a function
    assert "finetune.web.app" in edges["finetune.cli"]  # `from finetune.web import app`: a module
    assert "finetune.errors" in edges["finetune.rundir"]  # `from finetune.errors import UserError`: a name
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_two_finetune_modules_import_each_other():
    found = cycles(graph())
    assert not found, "import cycles (each a group of modules that reach each other): " + \
        "; ".join(" <-> ".join(c) for c in found)
