"""Private Ray/vLLM names are touched in one module only, and each one it lists still exists here."""

import ast
import importlib

import pytest

from services.private_apis import CHECKED_AGAINST, TOUCH_POINTS

from .conftest import REPO


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("path, attribute, user, why", TOUCH_POINTS, ids=[f"{p}.{a}" for p, a, _, _ in TOUCH_POINTS])
def test_each_touch_point_exists_on_the_installed_versions(path, attribute, user, why):
    owner = _resolve(path)
    if "(instance attribute)" in user:  # set in __init__: look for the assignment in the class's source
        import inspect

        assert f"self.{attribute}" in inspect.getsource(owner), f"{path}.{attribute} ({why})"
    else:
        assert hasattr(owner, attribute), f"{path}.{attribute} is gone ({why}); checked against {CHECKED_AGAINST}"


def test_the_versions_they_were_checked_against_are_the_installed_ones():
    import ray
    import vllm

    assert {"ray": ray.__version__, "vllm": vllm.__version__} == CHECKED_AGAINST, \
        "re-check services/private_apis.py against the new versions, then update CHECKED_AGAINST"


def test_no_other_module_imports_ray_internals():
    offenders = []
    for p in sorted(REPO.glob("*/**/*.py")):
        if p.parts[len(REPO.parts)] in (".venv", "tests") or p.name == "private_apis.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{p.relative_to(REPO)}: {n}" for n in names if n.startswith("ray.llm._internal")]
    assert offenders == []
