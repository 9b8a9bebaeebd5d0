"""What every one of our vLLM general plugins (`services/vllm_cpu_*.py`, entry points in pyproject.toml) does
before it installs: check that vLLM runs on CPU in this process and that the plugin's switch-off variable is not
set, then import the vLLM modules it patches."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def modules_to_patch(disable_env: str, *names: str) -> list[ModuleType] | None:
    """The named vLLM modules on a CPU vLLM, None where the plugin must not install: `disable_env` is "1" (kept
    for side-by-side benches against vLLM's own code), no CPU platform, or a module is gone (vLLM calls every
    plugin unguarded, so a moved name must not stop the engine)."""
    if os.environ.get(disable_env) == "1":
        return None
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
        return [importlib.import_module(n) for n in names]
    except ImportError:
        return None
