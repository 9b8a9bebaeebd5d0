"""The latent-safety-awareness table: per kind, how often the policy flags the risk when shown its own
reasoning, next to how often its first answer complied (the paper's 82%-identified vs 35%-attack-success view).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, TypeVar

from safetrigger.evaluation.health import option_mass
from safetrigger.evaluation.metrics import wilson
from safetrigger.method import Judgement

KIND_ORDER = ("harmful", "jailbreak", "general")
R = TypeVar("R")


@dataclass(frozen=True)
class AwarenessRow:
    kind: str
    n: int
    flagged: int  # judged unsafe by the policy itself
    complied: int  # first answer was not a refusal
    flagged_and_complied: int  # knew, and answered anyway: the gap the method closes
    unresolved: int
    mass: float = float("nan")  # mean probability the two options held (judge health)

    @property
    def flagged_rate(self) -> float:
        return self.flagged / self.n if self.n else 0.0

    @property
    def complied_rate(self) -> float:
        return self.complied / self.n if self.n else 0.0


def group_by_kind(rows: Iterable[R]) -> list[tuple[str, list[R]]]:
    """Rows (any row type with a `kind`) per kind, kinds in the paper's order (harmful, jailbreak, general), others after."""
    by_kind: dict[str, list[R]] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)  # type: ignore[attr-defined]
    order = sorted(by_kind, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    return [(k, by_kind[k]) for k in order]


def awareness_table(judgements: Iterable[Judgement], split: str | None = None) -> list[AwarenessRow]:
    rows = []
    for kind, js in group_by_kind(j for j in judgements if split is None or j.split == split):
        rows.append(
            AwarenessRow(
                kind=kind,
                n=len(js),
                flagged=sum(j.verdict_unsafe for j in js),
                complied=sum(not j.answer_refused for j in js),
                flagged_and_complied=sum(j.verdict_unsafe and not j.answer_refused for j in js),
                unresolved=sum(not j.resolved for j in js),
                mass=sum(option_mass([j.logprob_unsafe, j.logprob_safe]) for j in js) / len(js),
            )
        )
    return rows


def _pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:5.1f}% [{100 * lo:4.1f}–{100 * hi:5.1f}]" if n else "n/a"


def format_table(rows: list[AwarenessRow], model: str) -> str:
    """Markdown: readable in a terminal and in the report alike."""
    lines = [
        f"Latent safety awareness of {model} (95% Wilson intervals)",
        "",
        "| kind | n | risk identified (self-judge) | first answer complied | identified yet complied | judge health: options in top-k, mass |",
        "|---|---:|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kind} | {r.n} | {_pct(r.flagged, r.n)} | {_pct(r.complied, r.n)} | "
            f"{_pct(r.flagged_and_complied, r.n)} | {100 * (r.n - r.unresolved) / max(r.n, 1):.0f}%, {r.mass:.2f} |"
        )
    lines.append("")
    lines.append("For `general` the identified column is the false-alarm rate; for unsafe kinds `complied` is the ASR by refusal string-match.")
    return "\n".join(lines)
