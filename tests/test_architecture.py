"""The import graph reads one way, and has no cycles.

``app.core`` depends on nothing of Sluice's; ``app.jobs`` only on the core;
``app.uploads`` on the core and jobs; the gateway, the WebSocket server and the
workers on those, never on each other; the upload client speaks HTTP and
shares only wire types; ``devstack`` and ``app.cli`` sit on top.  Lazy imports
inside functions count too: hiding an edge in a function does not remove it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers", "devstack")
TOP = ("app.cli", "devstack")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "app/core": ("app.jobs", "app.uploads", "app.gateway", "app.ws", "app.client", "workers", *TOP),
    "app/jobs": ("app.uploads", "app.gateway", "app.ws", "app.client", "workers", *TOP),
    "app/uploads": ("app.gateway", "app.ws", "app.client", "workers", *TOP),
    "app/gateway": ("app.ws", "app.client", "app.embedder", "workers", *TOP),
    "app/ws": ("app.gateway", "app.uploads", "app.client", "app.embedder", "workers", *TOP),
    "app/embedder": (
        "app.jobs",
        "app.uploads",
        "app.gateway",
        "app.ws",
        "app.client",
        "workers",
        *TOP,
    ),
    "app/client": ("app.gateway", "app.ws", "app.jobs", "workers", *TOP),
    "workers": ("app.gateway", "app.ws", "app.client", "app.embedder", *TOP),
    "devstack": ("app.cli",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute module names ``path`` imports, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_what_sits_above_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imports_of(path)
        for bad in FORBIDDEN[package]
        if within(name, bad)
    }
    assert not offenders, "\n".join(sorted(offenders))


def test_every_package_is_placed() -> None:
    """A new top-level package of app/ must be given its place in the graph."""
    placed = {key.split("/")[-1] for key in FORBIDDEN if key.startswith("app/")}
    actual = {p.name for p in (ROOT / "app").iterdir() if (p / "__init__.py").exists()}
    assert actual <= placed, f"not placed in FORBIDDEN: {sorted(actual - placed)}"


def test_no_import_cycles() -> None:
    modules = {module_name(path): path for path in sources()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in imports_of(path):
            # ``from pkg import mod`` names a module; ``from mod import func`` its module.
            target = imported if imported in modules else imported.rpartition(".")[0]
            if target in modules and target != name and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found
