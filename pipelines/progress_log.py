"""Progress lines go to stdout for people and, while a run records, to `progress.jsonl` for programs (the jobs
API reads a job's stage from it, not from log text)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from safetrigger.artifacts import STAGE_LINE

_sink: Path | None = None
_lock = threading.Lock()


def say(text: str) -> None:
    """Print a progress line (or several) and record each `[stage] message` line of it."""
    print(text, flush=True)
    record(text)


def record(text: str) -> None:
    if _sink is None:
        return
    events = [{"time": time.time(), "stage": m.group(1), "message": m.group(2)}
              for m in (STAGE_LINE.match(line.strip()) for line in text.splitlines()) if m]
    if events:
        with _lock, _sink.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in events)


def teed(emit):
    """`emit` that also records: for a run given its own emit (tests, the CLI)."""
    if emit is say:
        return say

    def both(text: str) -> None:
        emit(text)
        record(text)

    return both


@contextmanager
def recording(path: Path):
    global _sink
    previous, _sink = _sink, Path(path)
    try:
        yield
    finally:
        _sink = previous
