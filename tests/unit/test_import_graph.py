"""The package layering of docs/architecture.md, checked on the source.

Every ``import`` in kvmesh (function-level ones too: a lazy import is still an edge) is
read with ``ast``. The test fails on an import cycle between modules or between
packages, and on an edge the layering forbids: the shared core imports no service, no
service imports another, and nothing below the launcher imports it or the benchmarks.
A second test imports the pure cores in a fresh interpreter and checks grpc stays out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kvmesh"

#: What each top-level part of kvmesh may import (besides itself and third parties).
ALLOWED: dict[str, set[str]] = {
    "v1": set(),
    "core": {"v1"},
    "models": {"core"},
    "router": {"core", "v1"},
    "gateway": {"core", "v1"},
    "worker": {"core", "v1", "models"},
    "edge": {"core", "v1"},
    "launch": {"core", "v1", "models", "worker", "edge"},
    "bench": {"core", "v1", "models", "router", "launch", "worker", "edge"},
    "cli": {"core", "v1", "models", "launch", "bench"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def kvmesh_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")
            if "v1" not in p.relative_to(PACKAGE).parts[:1]}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The kvmesh modules ``name`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for target in targets:
            # the longest known module the import names (``from a import b`` may be
            # a module b or a name in a)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("kvmesh.") and target != name:
                out.add(target)
    return out


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def graph() -> dict[str, set[str]]:
    modules = kvmesh_modules()
    known = set(modules) | {m for m in modules if m.startswith("kvmesh.v1")}
    known |= {module_name(p) for p in (PACKAGE / "v1").glob("*.py")}
    return {name: imported(path, name, known) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_function_level_imports() -> None:
    edges = graph()
    # kvmesh.cli imports the benchmarks inside its command functions only
    assert any(target.startswith("kvmesh.bench.") for target in edges["kvmesh.cli"])
    # and the cycle finder finds a three-module loop, not the module hanging off it
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules() -> None:
    assert cycles(graph()) == []


def package_of(module: str) -> str:
    """A package is its own package; a plain module belongs to the one holding it."""
    is_package = (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").exists()
    return module if is_package else module.rpartition(".")[0]


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = defaultdict(set)
    parts: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph().items():
        for target in targets:
            src, dst = package_of(source), package_of(target)
            if src != dst and not src.startswith(dst + "."):  # a child may use its parent
                packages[src].add(dst)
            if part(source) != part(target):
                parts[part(source)].add(part(target))
    assert cycles(packages) == []
    assert cycles(parts) == []


def test_layering() -> None:
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if part(target) != part(source) and part(target) not in ALLOWED[part(source)]
    )
    assert wrong == []
    assert set(ALLOWED) >= {part(m) for m in kvmesh_modules() if m != "kvmesh"}


PURE_CORES = [
    "kvmesh.core.errors",
    "kvmesh.core.config",
    "kvmesh.router.prefix_index",
    "kvmesh.router.cost_model",
    "kvmesh.router.registry",
    "kvmesh.router.kv_sequence",
    "kvmesh.gateway.translate",
    "kvmesh.gateway.tools",
    "kvmesh.gateway.structured",
    "kvmesh.gateway.detokenize",
]


@pytest.mark.parametrize("module", PURE_CORES)
def test_pure_cores_import_no_grpc(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('grpc', 'ray', 'vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"{module} pulls in {out.stdout.strip()}"
