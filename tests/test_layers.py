"""The import layers: safetrigger (method, evaluation, config) <- services <- pipelines <- clients (the HTTP
client) <- apps (the CLI). No module imports a package above its own, lazily inside a function included (as the
pure core's test does for Ray)."""

import ast
from pathlib import Path

import pytest

from .conftest import REPO

LAYERS = ["safetrigger", "services", "pipelines", "clients", "apps"]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_runs_up_the_layers(package):
    rank = LAYERS.index(package)
    upward = {str(p.relative_to(REPO)): sorted(pk for pk in imported_packages(p) if LAYERS.index(pk) > rank)
              for p in sorted((REPO / package).rglob("*.py"))}
    assert {p: up for p, up in upward.items() if up} == {}


def test_the_layer_check_sees_lazy_imports(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from pipelines.run import run\n    import apps.cli\n")
    assert imported_packages(tmp_path / "m.py") == {"pipelines", "apps"}


def longest_functions(package: str, limit: int) -> dict[str, int]:
    long = {}
    for p in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long[f"{p.relative_to(REPO)}:{node.lineno} {node.name}"] = n
    return long


def test_architecture_md_draws_the_declared_graph():
    import importlib.util

    spec = importlib.util.spec_from_file_location("architecture", REPO / "scripts" / "architecture.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    text = (REPO / "ARCHITECTURE.md").read_text()
    assert arch.rewrite(text) == text, "ARCHITECTURE.md is stale: run scripts/architecture.py"


@pytest.mark.parametrize("package", ["pipelines", "services"])
def test_no_function_longer_than_60_lines(package):
    assert longest_functions(package, 60) == {}
