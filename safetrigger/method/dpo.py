"""DPO data of the method (step 4): turn the SFT model's own samples into scored responses and preference pairs.

Unsafe queries (the paper: new jailbreak queries): every sample gets the reward of `reward.py`, the best and
the worst sample form a pair when they differ by at least delta.
General queries (optional, not in the paper): the trigger must stay quiet, so an untagged helpful answer is
chosen over a tagged one; no pair when all samples agree. That choice reads the text alone, never a judge's
verdict, so a general query's samples need not be judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .records import stable_hash
from .reasoning import THINK_SOURCES, ReasoningRule, SplitSource, split_reasoning
from .outcome import incomplete
from .refusal import is_refusal
from .reward import Pair, Reject, RewardWeights, Scored, reward, select_pair
from .tags import final_answer, parse_safe




def visible_answer(text: str, rule: ReasoningRule) -> str:
    """What a safety judge sees of a response: no `<think>` reasoning, no `<safe>` analysis."""
    split = split_reasoning(text, rule)
    return final_answer(split.answer if split.source in THINK_SOURCES else text)


def score_sample(text: str, answer_safe: bool | None, rule: ReasoningRule) -> Scored:
    """The reward's facts for one response; `answer_safe` is a judge's verdict on its final answer (None: not
    judged, enough for a general query's pair)."""
    block = parse_safe(text)
    split = split_reasoning(text, rule)
    return Scored(text=text, safe=answer_safe, tagged=block.triggered,
                  reasoning_complete=split.source is not SplitSource.UNCLOSED_THINK and bool(split.reasoning.strip()),
                  safe_complete=block.complete, answered=incomplete(text, rule) is None)


def general_category(s: Scored) -> str:
    """What a general query's pair reads of a sample: `tagged`, else `refusal`, else `helpful` (`incomplete` when
    it reached no answer)."""
    if s.tagged:
        return "tagged"
    if is_refusal(final_answer(s.text)):
        return "refusal"
    return "helpful" if s.answered else "incomplete"


def select_general_pair(samples: Sequence[Scored]) -> Pair | None:
    """Chosen: an untagged answer that is not a refusal; rejected: a tagged answer (else a refusal)."""
    helpful = [s for s in samples if s.answered and not s.tagged and not is_refusal(final_answer(s.text))]
    worse = [s for s in samples if s.tagged] or [s for s in samples if is_refusal(final_answer(s.text))]
    if not helpful or not worse:
        return None
    return Pair(helpful[0], worse[0], margin=1.0)


@dataclass(frozen=True)
class PairChoice:
    pair: Pair | None
    rewards: tuple[float, ...]


def choose_pair(samples: Sequence[Scored], unsafe_query: bool, delta: float, w: RewardWeights = RewardWeights(),
                reject: Reject = "worst") -> PairChoice:
    """The pair of one query's samples and, for an unsafe query, every sample's reward (a general query's pair
    reads no reward: empty)."""
    rewards = tuple(reward(s, w) for s in samples) if unsafe_query else ()
    pair = select_pair(samples, delta, w, reject) if unsafe_query else select_general_pair(samples)
    return PairChoice(pair, rewards)


def general_cap_rank(query_id: str) -> int:
    """Where a general query's pair stands in the cap's order among those of its kind (rejected side alike)."""
    return stable_hash(query_id, "general-cap")


def capped_general(general: Sequence[Pair], keys: Sequence[str], unsafe_pairs: int, per_unsafe: float | None) -> list[int]:
    """Indices of the general pairs kept under a cap of `per_unsafe` per unsafe pair (all when None): those whose
    rejected side is tagged first (they teach the trigger to stay quiet; the others a helpful answer over a
    refusal), then in the order of their `keys`' hashes, so the choice is the same on every run."""
    if per_unsafe is None:
        return list(range(len(general)))
    order = sorted(range(len(general)), key=lambda i: (not general[i].rejected.tagged, general_cap_rank(keys[i])))
    return sorted(order[: int(per_unsafe * unsafe_pairs)])
