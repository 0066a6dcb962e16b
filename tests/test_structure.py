"""The source tree shows the flow: sizes, layers and imports that no change may quietly undo.

    engine < config < intake < state < telemetry < publish < kafka < pipeline < service < cli

A package imports only from packages below it (top-level modules such as `errors` from anywhere),
and from another package only through its `__init__` (its stated API); no module is part of an
import circle; no module is over MAX_MODULE_LINES lines, and no function of the engine or the
pipeline over MAX_FUNCTION_LINES.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "streamer"
LAYERS = ("engine", "config", "intake", "state", "telemetry", "publish", "kafka", "pipeline", "service", "cli")
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60
SHORT_FUNCTIONS_IN = ("engine", "pipeline")


def _modules() -> dict[str, Path]:
    """Dotted module name (streamer.state.ledger; a package as streamer.state) -> its file."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, str]]:
    """(imported streamer module, line, the module the import statement names) for every import
    in the file, lazy ones included (`from ..kafka import records` imports the submodule records
    through the package streamer.kafka)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, a.name) for a in node.names if a.name.startswith("streamer")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("streamer"):
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import faults` imports the submodule itself
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno, target))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


class TestLayers:
    @pytest.mark.parametrize("name", [n for n in MODULES if _layer(n)])
    def test_imports_go_downward_and_through_each_package_api(self, name: str) -> None:
        """Each import names a package at or below this module's, and another package's `__init__` only."""
        own = _layer(name)
        for target, line, named in _imports(name, MODULES[name]):
            layer = _layer(target)
            if layer is None or layer == own:
                continue
            assert LAYERS.index(layer) < LAYERS.index(own), f"{name}:{line} imports {target}, a layer above {own}"
            assert named == f"streamer.{layer}", (
                f"{name}:{line} imports {named}: import through streamer.{layer}'s __init__ (its API)")

    def test_no_import_circle(self) -> None:
        """No module reaches itself through imports (Tarjan's strongly connected components)."""
        graph = {name: {t for t, _, _ in _imports(name, path) if t in MODULES} for name, path in MODULES.items()}
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        circles = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            for w in graph[v]:
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))

        for v in graph:
            if v not in index:
                visit(v)
        assert circles == []


class TestSizes:
    @pytest.mark.parametrize("name", list(MODULES))
    def test_modules_stay_small(self, name: str) -> None:
        lines = len(MODULES[name].read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines (split it by idea)"

    @pytest.mark.parametrize("name", [n for n in MODULES if _layer(n) in SHORT_FUNCTIONS_IN])
    def test_engine_and_pipeline_functions_stay_short(self, name: str) -> None:
        tree = ast.parse(MODULES[name].read_text())
        long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
        assert long == [], f"{name}: {long}"
