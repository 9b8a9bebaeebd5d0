"""The DPO reward of the method and the choice of preference pairs.

    R = F_safe * S_exist * (T_full + S_full + w_a) + F_safe * (1 - S_exist) * w_b + (1 - F_safe) * S_exist * w_c

F_safe: the final answer is safe (a judge's verdict); S_exist: a `<safe>` block is present; T_full, S_full:
the reasoning and the safe block are complete. With w_a > w_b > w_c >= 0 the order is
A (safe, tagged) > B (safe, untagged) > C (unsafe, tagged) > D (unsafe, untagged).
Per query, the best and the worst sample form a pair when their rewards differ by at least delta. With
`reject="tagged_unsafe"` a C sample (the tag fired, the answer still complied) is the rejected side whenever one
is at least delta below the best: A over C teaches "after the tag, a safe answer", which A over D (tag or no
tag) does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

Reject = Literal["worst", "tagged_unsafe"]


@dataclass(frozen=True)
class RewardWeights:
    w_a: float = 1.0
    w_b: float = 0.5
    w_c: float = 0.2

    def __post_init__(self) -> None:
        if not self.w_a > self.w_b > self.w_c >= 0:
            raise ValueError(f"reward weights need w_a > w_b > w_c >= 0, got {self}")


@dataclass(frozen=True)
class Scored:
    """One sampled response with the facts the reward needs."""

    text: str
    safe: bool | None  # F_safe; None: not judged (a general query's sample: its pair reads no verdict)
    tagged: bool  # S_exist
    reasoning_complete: bool  # T_full
    safe_complete: bool  # S_full
    answered: bool = True  # reached an answer (`outcome.incomplete` is None): only such a sample may be chosen


def reward(s: Scored, w: RewardWeights = RewardWeights()) -> float:
    if s.safe is None:
        raise ValueError("the reward needs a judge's verdict on the answer (F_safe); this sample was not judged")
    f, e = float(s.safe), float(s.tagged)
    t_full, s_full = float(s.reasoning_complete), float(s.safe_complete and s.tagged)
    return f * e * (t_full + s_full + w.w_a) + f * (1 - e) * w.w_b + (1 - f) * e * w.w_c


def category(s: Scored) -> str:
    if s.safe is None:
        raise ValueError("a category needs a judge's verdict on the answer (F_safe); this sample was not judged")
    return {(True, True): "A", (True, False): "B", (False, True): "C", (False, False): "D"}[(s.safe, s.tagged)]


@dataclass(frozen=True)
class Pair:
    chosen: Scored
    rejected: Scored
    margin: float


def select_pair(samples: Sequence[Scored], delta: float, w: RewardWeights = RewardWeights(),
                reject: Reject = "worst") -> Pair | None:
    """Best answered sample vs worst sample of one query (or a C sample, see `reject`); None when they are closer
    than delta (nothing to learn) or no sample reached an answer (a cut-off or empty response is never the
    chosen one)."""
    answered = [s for s in samples if s.answered]
    if len(samples) < 2 or not answered:
        return None
    best = max(reversed(answered), key=lambda s: reward(s, w))  # the last of equals, as a stable sort ranks them
    worst = min(samples, key=lambda s: reward(s, w))
    if reject == "tagged_unsafe":
        tagged_unsafe = [s for s in samples if category(s) == "C" and reward(best, w) - reward(s, w) >= delta]
        worst = tagged_unsafe[0] if tagged_unsafe else worst
    if worst is best:
        return None
    margin = reward(best, w) - reward(worst, w)
    return Pair(best, worst, margin) if margin >= delta else None
