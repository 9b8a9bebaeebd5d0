"""Judge health: does a log-prob judge answer the question it is asked?

A verdict compares the log-probabilities of two option tokens in the top-k of one generated position. When
the model means to say something else there (start reasoning, repeat the request), the options are not in the
top-k (the verdict is then a bound, `resolved` false) or hold little probability mass together, and the
verdict is noise however it is thresholded. Reported per judge and per kind; the gate refuses to decide on a
judge below the floors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

ALL = "all"


@dataclass(frozen=True)
class Verdict:
    kind: str
    resolved: bool  # both options were in the returned top-k
    mass: float  # the probability the two options held together (a bound when unresolved)


@dataclass(frozen=True)
class JudgeHealth:
    judge: str
    kind: str  # a query kind, or "all"
    n: int
    resolved: float  # share of rows with both options in the top-k
    mass: float  # mean option mass

    def healthy(self, min_resolved: float, min_mass: float) -> bool:
        return self.n > 0 and self.resolved >= min_resolved and self.mass >= min_mass

    def fmt(self) -> str:
        return f"{100 * self.resolved:.0f}% resolved, mass {self.mass:.2f} (n={self.n})"


def option_mass(logprobs: Iterable[float]) -> float:
    return sum(math.exp(lp) for lp in logprobs)


def judge_health(judge: str, verdicts: list[Verdict]) -> list[JudgeHealth]:
    """One row for all verdicts, then one per kind."""
    groups: dict[str, list[Verdict]] = {ALL: list(verdicts)}
    for v in verdicts:
        groups.setdefault(v.kind, []).append(v)
    return [JudgeHealth(judge, kind, len(vs), sum(v.resolved for v in vs) / len(vs) if vs else 0.0,
                        sum(v.mass for v in vs) / len(vs) if vs else 0.0) for kind, vs in groups.items()]


def overall(health: list[JudgeHealth], judge: str) -> JudgeHealth | None:
    return next((h for h in health if h.judge == judge and h.kind == ALL), None)
