"""The package's imports point one way: each module imports only from its own layer or below,
and no chain of imports comes back to where it started. docs/architecture.md explains the layers.

Imports are read from the source (ast), at any depth: an import inside a function counts like
one at the top, so a late import cannot hide a circle. ``from package import name`` counts as
importing ``package.name`` where that is a module, else ``package`` itself. Third-party imports
are ignored.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each package's sources live (pyproject.toml's package-dir).
PACKAGE_DIRS = {"mame_deploy": "mame_deploy", "mame_deploy.models": "models", "mame_deploy.cli": "cli",
                "mame_deploy.plugins": "plugins"}

# Bottom to top. A module belongs to the first layer with a matching pattern.
LAYERS = [
    ("artifacts", ["mame_deploy.errors", "mame_deploy.artifacts", "mame_deploy.manifest"]),
    ("ops", ["mame_deploy.ops", "mame_deploy.ops.*", "mame_deploy.plugins", "mame_deploy.plugins.*"]),
    ("models", ["mame_deploy.models", "mame_deploy.models.*", "mame_deploy.data", "mame_deploy.flops"]),
    ("merging", ["mame_deploy.merge", "mame_deploy.schedule", "mame_deploy.patch", "mame_deploy.finetuned",
                 "mame_deploy.source"]),
    ("export", ["mame_deploy.onnx_export", "mame_deploy.decisions", "mame_deploy.engine", "mame_deploy.runners",
                "mame_deploy.trt_runner", "mame_deploy.triton_repo", "mame_deploy.memory"]),
    ("checks", ["mame_deploy.validate", "mame_deploy.bench", "mame_deploy.evaluate", "mame_deploy.train",
                "mame_deploy.tune", "mame_deploy.serve", "mame_deploy.loadtest"]),
    # The package's own __init__: the public API (create_model, patch), above what it re-exports.
    ("api", ["mame_deploy"]),
    ("cli", ["mame_deploy.cli", "mame_deploy.cli.*"]),
]


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if package == "mame_deploy" and parts[0] in {d for d in PACKAGE_DIRS.values() if d != "mame_deploy"}:
                continue
            name = ".".join((package,) + parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = node.module if not node.level else ".".join(p for p in (base, node.module) if p)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(name: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return index
    raise LookupError(name)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    unplaced = []
    for name in graph:
        try:
            layer_of(name)
        except LookupError:
            unplaced.append(name)
    assert not unplaced, f"add these modules to a layer in LAYERS (and docs/architecture.md): {unplaced}"


def test_imports_point_down_the_layers(graph):
    assert upward_imports(graph) == []


def test_no_import_circles(graph):
    assert circles(graph) == []


def test_the_check_finds_a_circle_and_an_upward_import(tmp_path):
    """The rules above can fail: a planted circle and upward import in a copy are reported."""
    for folder in PACKAGE_DIRS.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "mame_deploy" / "errors.py").write_text("from mame_deploy import merge\n")
    (tmp_path / "mame_deploy" / "merge.py").write_text("def f():\n    from mame_deploy.errors import UserError\n")
    planted = import_graph(tmp_path)
    assert circles(planted) == [["mame_deploy.errors", "mame_deploy.merge"]]
    assert upward_imports(planted) == ["mame_deploy.errors (artifacts) imports mame_deploy.merge (merging)"]
