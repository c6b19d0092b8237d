"""The layout docs/architecture.md describes, checked on the source: layers import only
downwards, no loose modules at the top of fedaiot/, and only the launcher starts processes."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import fedaiot

ROOT = Path(fedaiot.__file__).parent
# Lowest first: a package may import only from packages before it (and itself).
LAYERS = [
    "errors",
    "tasks",
    "config",
    "studies",
    "wire",
    "privacy",
    "secagg",
    "node",
    "secure_rounds",
    "registry",
    "edge",
    "rounds",
    "launch",
    "simulation",
    "deploy",
    "monitoring",
    "serving",
    "campaigns",
    "experiments",
    "cli",
]
ENTRY_POINTS = {"__init__.py", "__main__.py", "errors.py"}


def _imports(path: Path) -> Iterator[str]:
    """Every fedaiot module ``path`` imports, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fedaiot":
                yield from (f"fedaiot.{alias.name}" for alias in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def _package(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def test_fedaiot_holds_packages_and_its_entry_points_only() -> None:
    loose = {p.name for p in ROOT.glob("*.py")} - ENTRY_POINTS
    assert not loose, f"modules outside a package: {sorted(loose)}"
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS) - {"errors"}


def test_every_package_says_what_it_owns() -> None:
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init} needs a docstring: what it owns, what it imports"


def test_layers_import_only_downwards() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for path in ROOT.rglob("*.py"):
        if path.name == "__main__.py" and path.parent == ROOT:
            continue
        own = _package(path)
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] != "fedaiot" or len(parts) < 2 or parts[1] == own:
                continue
            if rank[parts[1]] > rank[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_configuration_and_the_coordinator_stay_off_the_nodes_stack() -> None:
    config = {m for p in (ROOT / "config").rglob("*.py") for m in _imports(p)}
    assert {m for m in config if m.startswith("fedaiot.tasks")} <= {"fedaiot.tasks.names"}
    coordinator = {m for p in (ROOT / "rounds").rglob("*.py") for m in _imports(p)}
    assert not {m for m in coordinator if m.startswith("fedaiot.node")}


def test_only_the_launcher_starts_processes() -> None:
    starts = re.compile(r"subprocess\.(Popen|run|call|check_call|check_output)\(|\bspawn\(")
    outside = [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if _package(path) != "launch" and starts.search(path.read_text())
    ]
    assert not outside, f"processes started outside fedaiot/launch: {outside}"
