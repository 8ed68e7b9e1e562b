"""The layout is the architecture: each layer imports only the layers below it, and no module or function outgrows
what a reader takes in at once. Static checks over the source (ast), so they cost nothing to run."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "cds_service"

# Which packages of cds_service a layer may not import (directly or through a submodule). The engine is the ground
# floor: pure, reused by the CLI and the tests; the store keeps records and must not know who serves them or how
# callers authenticate; the FHIR adapter reads data and must not know about HTTP responses; auth checks tokens only.
FORBIDDEN: dict[str, frozenset[str]] = {
    "engine": frozenset(
        {"web", "fhir", "ops", "store", "auth", "runtime", "cli", "calls", "config", "audit", "errors"}
    ),
    "store": frozenset({"web", "auth", "fhir", "runtime", "cli", "calls"}),
    "fhir": frozenset({"web", "store", "auth", "runtime", "cli"}),
    "auth": frozenset({"web", "store", "fhir", "ops", "runtime", "cli", "calls"}),
    "ops": frozenset({"web", "cli"}),
}
# ops/operate.py wires the operations into the Flask app and reload.py rebuilds the runtime: they sit at the seam.
SEAM = {"cds_service.ops.operate": {"runtime"}, "cds_service.ops.reload": {"runtime"}}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Named exceptions, each with its reason; the test fails when one is no longer needed, so the list only shrinks.
LONG_FUNCTIONS = {
    # One declaration per metric the service exports, in the order of docs/operators.md's table: a list, not logic.
    ("cds_service/ops/metrics.py", "__init__"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def internal_imports() -> dict[str, frozenset[str]]:
    """Each module of cds_service -> the cds_service modules it imports (relative imports resolved)."""
    found: dict[str, frozenset[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("cds_service"):
                    targets.add(target)
                    targets.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("cds_service"))
        found[name] = frozenset(targets)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_import_graph_was_read() -> None:
    graph = internal_imports()
    assert "cds_service.web.views" in graph and "cds_service.engine.judge" not in graph
    assert "cds_service.engine" in graph["cds_service.calls"]


@pytest.mark.parametrize("lower", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_is_below_it(lower: str) -> None:
    wrong = []
    for module, targets in sorted(internal_imports().items()):
        if layer(module) != lower:
            continue
        allowed_here = SEAM.get(module, set())
        for target in sorted(targets):
            if layer(target) in FORBIDDEN[lower] and layer(target) not in allowed_here:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_or_function_is_too_long_to_read_at_once() -> None:
    too_long: list[str] = []
    excused_and_needed: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    if (rel, node.name) in LONG_FUNCTIONS:
                        excused_and_needed.add((rel, node.name))
                    else:
                        too_long.append(f"{rel}: {node.name}() is {length} lines")
    assert not too_long, "\n".join(too_long)
    assert excused_and_needed == LONG_FUNCTIONS, f"no longer needed: {LONG_FUNCTIONS - excused_and_needed}"


def test_the_app_holds_its_parts_under_one_typed_accessor() -> None:
    """`app.extensions` is touched only by runtime.services_of/attach: every other module reads typed Services."""
    users = [
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*.py")
        if ".extensions[" in path.read_text(encoding="utf-8") or ".extensions.get(" in path.read_text(encoding="utf-8")
    ]
    assert users == ["cds_service/runtime.py"]


def test_every_setting_is_documented_for_operators() -> None:
    from dataclasses import fields

    from cds_service.config import DEFAULTS, Settings

    names = {f.name.upper() for f in fields(Settings)}
    assert names == set(DEFAULTS)
    documented = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    assert not [n for n in sorted(names) if f"`CDS_{n}`" not in documented]
