"""Typed records that flow between the stages: query -> trajectory -> judgement.

Flat fields only, so each record is one Parquet row and any number in a report traces back to its rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any, TypeVar


class Kind(str, Enum):
    HARMFUL = "harmful"
    JAILBREAK = "jailbreak"
    GENERAL = "general"


class Label(str, Enum):
    UNSAFE = "unsafe"
    SAFE = "safe"


class SplitName(str, Enum):
    TRAIN = "train"  # SFT (self-review targets)
    EVAL = "eval"
    DPO = "dpo"  # held apart from SFT: the SFT model samples its DPO pairs on these


def stable_hash(text: str, salt: str = "") -> int:
    """Process- and platform-independent (unlike `hash()`), so splits never move between runs."""
    return int.from_bytes(hashlib.sha256(f"{salt}\x00{text}".encode()).digest()[:8], "big")


def assign_split(split_key: str, eval_fraction: float, salt: str = "safe-trigger", dpo_fraction: float = 0.0) -> SplitName:
    """Deterministic train/eval/dpo assignment by hash of the split key.

    Jailbreak prompts use their harmful goal as key, so a goal held out for evaluation (or for DPO) is never seen
    in SFT wrapped in another template. `dpo_fraction` is the share of the non-eval keys held apart for DPO.
    """
    for name, f in (("eval_fraction", eval_fraction), ("dpo_fraction", dpo_fraction)):
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {f}")
    if stable_hash(split_key, salt) % 10_000 < round(eval_fraction * 10_000):
        return SplitName.EVAL
    if stable_hash(split_key, salt + "/dpo") % 10_000 < round(dpo_fraction * 10_000):
        return SplitName.DPO
    return SplitName.TRAIN


def query_id(source: str, prompt: str) -> str:
    return f"{source}-{stable_hash(prompt, source):016x}"


@dataclass
class Query:
    id: str
    kind: str
    label: str
    prompt: str
    source: str
    split_key: str
    split: str = SplitName.TRAIN.value
    category: str = ""
    reference: str = ""  # e.g. the GSM8K final number; empty when the set has none
    origin: str = ""  # file:line it came from, for error messages and tracing

    def __post_init__(self) -> None:
        self.kind = Kind(self.kind).value
        self.label = Label(self.label).value
        self.split = SplitName(self.split).value
        if not self.prompt.strip():
            raise ValueError(f"query {self.id}: empty prompt")

    @property
    def unsafe(self) -> bool:
        return self.label == Label.UNSAFE.value


@dataclass
class Trajectory:
    """One self-generated response, already split into reasoning and answer."""

    query_id: str
    kind: str
    label: str
    split: str
    prompt: str
    response: str
    reasoning: str
    answer: str
    split_source: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    sampling: str  # JSON of the sampling parameters actually sent
    model: str
    adapter: str = ""  # empty for the base model
    category: str = ""
    source: str = ""


@dataclass
class Judgement:
    """The policy judging its own trajectory: log-probabilities of the verdict options, not parsed text."""

    query_id: str
    kind: str
    label: str
    split: str
    logprob_unsafe: float
    logprob_safe: float
    baseline: float  # the margin of content-free inputs (0 without calibration)
    margin: float  # logprob_unsafe - logprob_safe - baseline
    verdict_unsafe: bool
    answer_refused: bool  # refusal string-match on the first answer
    model: str
    adapter: str = ""
    source: str = ""
    category: str = ""
    resolved: bool = True  # both options were in the top-k; otherwise the missing one got the k-th value (a bound)


R = TypeVar("R")


def from_row(cls: type[R], row: dict[str, Any]) -> R:
    """Build a record from a storage row, ignoring extra columns (e.g. ones added by Ray Data)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in row.items() if k in names})


def to_row(record: Any) -> dict[str, Any]:
    return asdict(record)

