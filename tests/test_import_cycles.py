"""ktransfer's imports: no circle, and every import points down the layers of docs/architecture.md.

Imports inside functions count: they run later, but a circle through them is still two modules that
need each other, and an import from a lower layer up to a higher one is a dependency the wrong way
round. Imports under ``if TYPE_CHECKING:`` are for type checkers only and are left out.
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


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The ktransfer modules that ``path`` imports anywhere in it (its body and its functions).

    ``from . import name`` of a name that is no module (``__version__``) imports the package itself."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for_type_checkers = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in for_type_checkers:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base not in modules:
                continue
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            if node.module or len(submodules) < len(node.names):  # a name from the module itself
                found.add(base)
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
    return {module_name(f): module_imports(f, modules) for f in files}


def test_the_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_holds_known_edges():
    graph = import_graph()
    assert "ktransfer.models.registry" in graph["ktransfer.models.sources"]
    assert "ktransfer.models.weights" in graph["ktransfer.models.checkpoint"]
    assert len(graph) > 40


def test_the_graph_counts_imports_inside_functions_and_of_the_package_face():
    graph = import_graph()
    assert "ktransfer.models.loading" in graph["ktransfer.models.checkpoint"]  # inside load_checkpoint
    assert "ktransfer" in graph["ktransfer.cli.options"] or "ktransfer.settings" in graph["ktransfer.cli.options"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


# The layers of docs/architecture.md, lowest first: a module may import its own layer and the ones below.
LAYERS = {
    "foundation": ["errors", "_version", "paths", "extras", "settings", "output", "significance", "metrics", "rank_statistics"],
    "data, models, methods": ["data", "models", "augment", "methods"],
    "engine": ["predictions", "targets", "view_cache", "checkpoints", "distributed", "engine", "tracking"],
    "transfer": ["api", "transfer_checks", "weight_averaging", "controls", "multi", "adapt", "analysis", "results", "tables", "pretrain"],
    "tools": ["study", "scout", "report", "demo", "multi_demo"],
    "faces": ["cli", "__main__", ""],  # "": the package itself (ktransfer/__init__.py)
}


def layer_of(module: str) -> int:
    top = module.removeprefix("ktransfer").removeprefix(".").split(".")[0]
    for number, members in enumerate(LAYERS.values()):
        if top in members:
            return number
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"ktransfer.models.store": {"ktransfer.engine"}}) == ["ktransfer.models.store -> ktransfer.engine"]
    assert upward_imports({"ktransfer.engine": {"ktransfer.models.store"}}) == []


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_layers_here_are_the_ones_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    for members in LAYERS.values():
        for member in members:
            if member:
                assert f"`{member}`" in text, member


def test_each_model_module_imports_first():
    # Whichever module of the model package a user imports first, the sources are all registered.
    for module in ("ktransfer.models.checkpoint", "ktransfer.models.sources", "ktransfer.models.registry", "ktransfer.models.weights"):
        code = f"import {module}; from ktransfer.models.registry import MODEL_SOURCES as s; assert set(s) == {{'zoo', 'timm', 'torchvision', 'python', 'file', 'hf'}}, s"
        subprocess.run([sys.executable, "-c", code], check=True)
