"""Names of what a run leaves on disk that other components read (the gateway's jobs API, the CLI, benches): one
place, so a writer and its readers cannot disagree."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPORT_DIR = "report"
REPORT_HTML = "report.html"
REPORT_MARKDOWN = "report.md"
REPORT_METRICS = "metrics.json"
REPORT_RECORDS = "records.parquet"
REPORT_RECORDS_JSONL = "records.jsonl"
SUMMARY = "summary.json"
PREVIOUS_SUMMARY = "summary.previous.json"
# One JSON object per progress line of a run: {"time": unix seconds, "stage": "generate", "message": "..."}.
PROGRESS = "progress.jsonl"
# What a progress line looks like on stdout: "[stage] message"
STAGE_LINE = re.compile(r"^\[([a-z0-9][a-z0-9/_-]*)\] (.+)$")


def progress_events(path: Path, after: int = 0, limit: int = 200) -> tuple[list[dict], int]:
    """Whole progress lines after the first `after`, at most `limit`, and the offset to ask from next. A line cut
    by a kill is passed over but counted, so offsets stay put; a last line still being written is left for later."""
    events, seen = [], 0
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n") or len(events) >= limit:
                    break
                seen += 1
                if seen > after and (event := _event(line)) is not None:
                    events.append(event)
    return events, max(seen, after)


def _event(line: str) -> dict | None:
    """One progress line as its event, or None for a line cut by a kill mid-write."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "stage" in event else None


def last_progress(path: Path) -> dict | None:
    """The newest whole line of a progress file, or None (a line cut by a kill mid-write is passed over)."""
    if not path.is_file():
        return None
    last = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            last = _event(line) or last
    return last
