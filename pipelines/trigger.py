"""Trigger behaviour: how often `<safe>` fires on unsafe vs general prompts, per model (paper: ~90–99% vs <0.1%)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from safetrigger.method import Trajectory, parse_safe

from .awareness import group_by_kind, wilson


@dataclass(frozen=True)
class TriggerRow:
    model: str
    kind: str
    n: int
    fired: int
    complete: int

    @property
    def rate(self) -> float:
        return self.fired / self.n if self.n else 0.0


def trigger_rows(model: str, trajectories: Iterable[Trajectory]) -> list[TriggerRow]:
    rows = []
    for kind, ts in group_by_kind(trajectories):
        blocks = [parse_safe(t.response) for t in ts]
        rows.append(TriggerRow(model, kind, len(blocks), sum(b.triggered for b in blocks), sum(b.complete for b in blocks)))
    return rows


def format_trigger_table(rows: list[TriggerRow]) -> str:
    lines = ["`<safe>` trigger rate on the eval split (95% Wilson intervals)", "",
             "| model | kind | n | fired | complete block |", "|---|---|---:|---|---:|"]
    for r in rows:
        lo, hi = wilson(r.fired, r.n)
        lines.append(f"| {r.model} | {r.kind} | {r.n} | {100 * r.rate:5.1f}% [{100 * lo:4.1f}–{100 * hi:5.1f}] | {r.complete} |")
    return "\n".join(lines)
