"""The model registry the serving side reads: which adapter is promoted, and every gate decision with its
reasons and metrics. Files beside the adapter registry (`services.adapters`), so one PVC or directory holds both:

    <root>/PROMOTED.json     {"name": "st-d", "version": 3, "model": "policy:st-d@v3", ...}; absent: the base
    <root>/decisions.jsonl   one line per gate decision, promoted or not

PROMOTED.json is replaced atomically; a reader sees the old or the new promotion, never half of one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import adapters

PROMOTED = "PROMOTED.json"
DECISIONS = "decisions.jsonl"


def record_decision(root: str | os.PathLike[str], decision: dict[str, Any]) -> None:
    path = Path(root) / DECISIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"decided_at": time.time(), **decision}, default=str)
    with path.open("a", encoding="utf-8") as f:  # one write per line: concurrent appenders never interleave mid-line
        f.write(line + "\n")


def decisions(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(root) / DECISIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def promote(root: str | os.PathLike[str], name: str, version: int, served_model: str, **info: Any) -> dict[str, Any]:
    """Make adapter `name` version `version` the promoted model; it must exist in the adapter registry."""
    path = Path(root) / name / f"v{version:04d}"
    if not all((path / f).is_file() for f in adapters.ADAPTER_FILES):
        raise adapters.AdapterError(f"cannot promote {name} v{version}: {path} is not a published adapter")
    entry = {"name": name, "version": version, "model": f"{served_model}:{name}@v{version}", "promoted_at": time.time(), **info}
    tmp = Path(root) / f".{PROMOTED}.{os.getpid()}"
    tmp.write_text(json.dumps(entry, indent=2, default=str))
    os.replace(tmp, Path(root) / PROMOTED)
    return entry


def promoted(root: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    if not root:
        return None
    try:
        return json.loads((Path(root) / PROMOTED).read_text())
    except FileNotFoundError:
        return None
