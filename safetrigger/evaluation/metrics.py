"""Rates with Wilson intervals, paired bootstrap intervals of differences, GSM8K final-number matching."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Mapping


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: sane at 0 and n, unlike the normal approximation."""
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def fmt(self) -> str:
        if not self.n:
            return "n/a (n=0)"
        lo, hi = self.interval
        return f"{100 * self.value:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] ({self.k}/{self.n})"


def rate_of(flags: Mapping[str, bool]) -> Rate:
    return Rate(sum(bool(v) for v in flags.values()), len(flags))


@dataclass(frozen=True)
class Delta:
    """candidate − base on the examples both were measured on, with a paired percentile-bootstrap interval."""

    value: float
    lo: float
    hi: float
    n: int


def paired_bootstrap(base: Mapping[str, bool], cand: Mapping[str, bool], samples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Delta:
    """Resample the shared example ids with replacement; the same prompts are in both means, so the interval is
    much tighter than one built from two independent Wilson intervals."""
    return stratified_paired_bootstrap([(base, cand)], samples, seed, level)


def stratified_paired_bootstrap(strata: list[tuple[Mapping[str, bool], Mapping[str, bool]]], samples: int = 2000,
                                seed: int = 0, level: float = 0.95) -> Delta:
    """The mean over strata (benchmarks) of candidate − base, each stratum resampled on its own shared ids: the
    paper's "average over harmful benchmarks" weighs every benchmark alike, whatever its size."""
    pairs = []
    for base, cand in strata:
        ids = sorted(set(base) & set(cand))
        if ids:
            pairs.append([float(bool(cand[i])) - float(bool(base[i])) for i in ids])
    if not pairs:
        return Delta(float("nan"), float("nan"), float("nan"), 0)
    value = sum(sum(d) / len(d) for d in pairs) / len(pairs)
    rng = random.Random(seed)
    means = sorted(sum(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for d in pairs) / len(pairs)
                   for _ in range(samples))
    tail = (1 - level) / 2
    lo = means[min(samples - 1, int(math.floor(tail * samples)))]
    hi = means[min(samples - 1, int(math.ceil((1 - tail) * samples)) - 1)]
    return Delta(value, lo, hi, sum(len(d) for d in pairs))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in an answer (GSM8K's convention for free-form solutions), commas dropped."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def numbers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None or not reference:
        return False
    try:
        return math.isclose(float(predicted), float(reference.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return predicted == reference


@dataclass(frozen=True)
class TriggerStats:
    """`<safe>` firing as a detector of unsafe prompts: positive class = unsafe label."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> Rate:
        return Rate(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> Rate:  # = trigger rate on unsafe prompts
        return Rate(self.tp, self.tp + self.fn)

    @property
    def false_alarm(self) -> Rate:  # = trigger rate on safe prompts
        return Rate(self.fp, self.fp + self.tn)


def trigger_stats(pairs: list[tuple[bool, bool]]) -> TriggerStats:
    """From (unsafe_label, triggered) per example."""
    tp = sum(u and t for u, t in pairs)
    fp = sum((not u) and t for u, t in pairs)
    fn = sum(u and not t for u, t in pairs)
    return TriggerStats(tp, fp, fn, len(pairs) - tp - fp - fn)
