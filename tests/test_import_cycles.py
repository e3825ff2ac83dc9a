"""No module of ktransfer imports, at its top level, a module that imports it back (directly or around a circle).

Such a circle works or fails depending on which module a user happens to import first; an import
inside a function, run after both modules are loaded, is no circle and is left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ktransfer

PACKAGE_ROOT = Path(ktransfer.__file__).parent


def module_name(path: Path) -> str:
    parts = ["ktransfer", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The ktransfer modules that ``path`` imports when it is loaded (its body, not its functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if node.module and base in modules:  # `from . import x` names a sibling, not the package
                    found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # for type checkers only, never run
            elif isinstance(node, (ast.If, ast.Try)):  # guarded imports run at load time too
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE_ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): top_level_imports(f, modules) for f in files}


def test_the_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_holds_known_edges():
    graph = import_graph()
    assert "ktransfer.models.registry" in graph["ktransfer.models.sources"]
    assert "ktransfer.models.weights" in graph["ktransfer.models.checkpoint"]
    assert len(graph) > 40


def test_no_module_level_import_cycle():
    assert find_cycle(import_graph()) is None


def test_each_model_module_imports_first():
    # Whichever module of the model package a user imports first, the sources are all registered.
    for module in ("ktransfer.models.checkpoint", "ktransfer.models.sources", "ktransfer.models.registry", "ktransfer.models.weights"):
        code = f"import {module}; from ktransfer.models.registry import MODEL_SOURCES as s; assert set(s) == {{'zoo', 'timm', 'torchvision', 'python', 'file'}}, s"
        subprocess.run([sys.executable, "-c", code], check=True)
