"""The package's layout: no import cycle, and no part module imports the orchestration.

Every import statement counts, those under ``TYPE_CHECKING`` and inside functions included: an ast walk,
not the imports Python happens to run.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lightning_sa_unlearn"
NAME = "lightning_sa_unlearn"
PARTS = ("curvature", "selection", "updates", "evaluations", "adapters", "objective")
ORCHESTRATION = ("pipeline", "context", "callback", "cli", "trials")
# standalone.py is left out on purpose: Evaluation.__call__, a shorthand kept for users, imports it on use


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``; ``from a import b`` names ``a.b`` when that is a module."""
    found = modules()

    def owner(name: str) -> str | None:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in found.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[module] = {owner(t) for t in targets if t.startswith(NAME) and owner(t) not in (None, module)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_imports_under_type_checking_and_in_functions(tmp_path):
    graph = import_graph()
    assert f"{NAME}.context" in graph[f"{NAME}.standalone"]  # a module-level import
    assert f"{NAME}.standalone" in graph[f"{NAME}.evaluations.base"]  # inside a method
    assert f"{NAME}.run_context" in graph[f"{NAME}.updates.base"]  # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("part", PARTS)
def test_no_part_imports_the_orchestration(part):
    forbidden = {f"{NAME}.{name}" for name in ORCHESTRATION}
    found = {
        module: sorted(targets & forbidden)
        for module, targets in import_graph().items()
        if module.startswith(f"{NAME}.{part}") and targets & forbidden
    }
    assert found == {}


def test_no_module_is_longer_than_400_lines():
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}
