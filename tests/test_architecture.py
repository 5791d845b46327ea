"""The house rules that no single test of behaviour sees: import contracts, no import cycles, small files.

The import rules of docs/design.md are import-linter contracts (pyproject.toml
``[tool.importlinter]``); import-linter has no cycle contract, so cycles are found here on
grimp's graph (imports inside functions count: grimp reads every import statement).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "specforge_lightning"
MAX_LINES = 400

grimp = pytest.importorskip("grimp")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(PACKAGE, include_external_packages=False)


def strongly_connected(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node (or with a self edge), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(sorted(component))
    return found


def one_cycle(edges: Mapping[str, Iterable[str]], component: list[str]) -> list[str]:
    """A concrete cycle through the component's first node, e.g. ``[a, b, a]``, for the failure message."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(edges.get(node, ())):
            if child == start:
                return [*paths[node], start]
            if child in members and child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return component


def report(edges: Mapping[str, Iterable[str]], components: list[list[str]]) -> str:
    return "\n".join(" -> ".join(one_cycle(edges, c)) for c in components)


def test_no_import_cycle_between_modules(graph):
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = strongly_connected(edges)
    if cycles:
        pytest.fail(f"{len(cycles)} module import cycle(s):\n{report(edges, cycles)}")


def test_no_import_cycle_between_subpackages(graph):
    """At every package level: its children (modules and subpackages, collapsed) form no cycle."""
    packages = sorted({m.rsplit(".", 1)[0] for m in graph.modules if "." in m})
    found = []
    for package in packages:
        prefix = package + "."

        def child(module: str) -> str | None:
            return prefix + module[len(prefix):].split(".", 1)[0] if module.startswith(prefix) else None

        edges: dict[str, set[str]] = {}
        for module in graph.modules:
            source = child(module)
            if source is None:
                continue
            for imported in graph.find_modules_directly_imported_by(module):
                target = child(imported)
                if target is not None and target != source:
                    edges.setdefault(source, set()).add(target)
        # Only groups that are subpackages (a module imports within its own package freely via its children).
        cycles = [c for c in strongly_connected(edges) if any(graph.find_children(m) for m in c)]
        found += [(edges, c) for c in cycles]
    if found:
        pytest.fail("subpackage import cycle(s):\n" + "\n".join(report(e, [c]) for e, c in found))


def test_no_package_file_is_over_400_lines():
    long = {
        str(path.relative_to(REPO)): n
        for path in sorted((REPO / PACKAGE).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_import_contracts_hold():
    binary = Path(sys.executable).with_name("lint-imports")
    command = str(binary) if binary.exists() else shutil.which("lint-imports")
    if command is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("lint-imports is not installed (pip install -e '.[dev]'); CI must check the import contracts")
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    done = subprocess.run([command, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
