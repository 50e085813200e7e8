"""The package's shape: imports flow one way (no cycle, imports inside functions included), the
training loop sits at the top, and no module grows into a catch-all."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, List, Set

import pytest

from helpers import REPO_ROOT

ROOT = REPO_ROOT
PACKAGES = ("phased_dmd_mega", "kernels")
MAX_MODULE_LINES = 600


def module_files() -> Dict[str, Path]:
    """{dotted module name: file} of every module of the package and the kernels."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _absolute(module: str, level: int, current: str, is_package: bool) -> str:
    if not level:
        return module
    base = current.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def _known_prefix(name: str, modules: Dict[str, Path]) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package modules ``name`` imports anywhere in its code (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known_prefix(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, name, path.name == "__init__.py")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else _known_prefix(base, modules))
    found.discard("")
    found.discard(name)
    return found


@functools.lru_cache(maxsize=None)
def import_graph() -> Dict[str, Set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def later():\n    from pkg.a import thing\n")
    (package / "c.py").write_text("import pkg.a\n")
    modules = {"pkg": package / "__init__.py", **{f"pkg.{m}": package / f"{m}.py" for m in "abc"}}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["pkg.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_among_the_package_modules():
    assert cycles(import_graph()) == []


def test_only_the_command_line_imports_the_training_loop():
    importers = {name for name, deps in import_graph().items() if "phased_dmd_mega.distill.trainer" in deps}
    assert importers <= {"phased_dmd_mega.cli"}


@pytest.mark.parametrize(
    "module, below",
    [
        ("phased_dmd_mega.data", "phased_dmd_mega.distill"),
        ("phased_dmd_mega.parallel", "phased_dmd_mega.models"),
        ("phased_dmd_mega.models", "phased_dmd_mega.distill"),
        ("phased_dmd_mega.config", "phased_dmd_mega.models"),
        ("phased_dmd_mega.prompt_cache", "phased_dmd_mega.distill"),
    ],
)
def test_lower_layers_do_not_import_higher_ones(module, below):
    graph = import_graph()
    offenders = {
        (name, dep)
        for name, deps in graph.items()
        if name == module or name.startswith(module + ".")
        for dep in deps
        if dep == below or dep.startswith(below + ".")
    }
    assert offenders == set()


def test_no_module_is_over_600_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
