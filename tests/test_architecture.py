"""The import graph reads one way: gateway, WebSocket server and workers
depend on the shared core, never on each other; the core depends on none."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "app/core": ("app.gateway", "app.ws", "app.cli", "app.devserver", "app.client", "workers"),
    "app/gateway": ("app.ws", "workers"),
    "app/ws": ("app.gateway", "workers"),
    "workers": ("app.gateway", "app.ws", "app.cli", "app.client"),
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_its_peers(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imports_of(path))
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package])
    ]
    assert not offenders, "\n".join(offenders)
