"""The gate decided again from a finished run's `metrics.json`, under rules the run did not choose.

An operator promotes a job's adapter under the server's gate policy, not the job's own config (a tenant wrote that
one): the comparisons, rates and judge health the report recorded are read back and `gate.decide` runs on them,
with a floor on how many examples every gated suite must hold, so a tiny suite cannot carry a promotion.
"""

from __future__ import annotations

import math
from typing import Any

from .gate import Check, Decision, GateRules, decide
from .health import JudgeHealth
from .metrics import Delta, Rate
from .suites import Comparison


class MetricsError(ValueError):
    """The metrics do not hold what a decision needs (another format, a model that was not evaluated)."""


def candidate_model(metrics: dict[str, Any], adapter: str) -> str:
    """The display name the report gave `adapter` (e.g. st-d -> ST-D)."""
    names = [name for name, a in (metrics.get("adapters") or {}).items() if a == adapter]
    if not names:
        raise MetricsError(f"the report evaluated no adapter {adapter!r} (it has {sorted((metrics.get('adapters') or {}).values())})")
    return names[0]


def comparisons(metrics: dict[str, Any], model: str) -> list[Comparison]:
    """`model` against the base, as the report compared them, with the counts of every rate."""
    base = (metrics.get("models") or ["base"])[0]
    counts = {(m["model"], m["suite"], m["metric"], m["judge"]): Rate(int(m["k"]), int(m["n"]))
              for m in metrics.get("suites", [])}
    out = []
    try:
        for c in metrics.get("comparisons", {}).get(model, []):
            key = (c["suite"], c["metric"], c["judge"])
            d = c["delta"]
            out.append(Comparison(c["suite"], c["metric"], c["judge"], counts.get((base, *key), Rate(0, 0)),
                                  counts.get((model, *key), Rate(0, 0)),
                                  Delta(_num(d["value"]), _num(d["lo"]), _num(d["hi"]), int(d["n"]))))
    except (KeyError, TypeError, ValueError) as e:
        raise MetricsError(f"the report's comparisons are not in the expected form: {type(e).__name__} {e}") from None
    return out


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def health(metrics: dict[str, Any]) -> list[JudgeHealth]:
    fields = ("judge", "kind", "n", "resolved", "mass")
    return [JudgeHealth(**{f: h[f] for f in fields}) for h in metrics.get("judge_health", []) if all(f in h for f in fields)]


def decide_again(metrics: dict[str, Any], adapter: str, rules: GateRules, min_suite_examples: int) -> Decision:
    """`gate.decide` on the report's numbers, plus: every gated ASR and over-refusal suite measured on at least
    `min_suite_examples` paired examples."""
    model = candidate_model(metrics, adapter)
    compared = comparisons(metrics, model)
    d = decide(adapter, compared, rules, health(metrics))
    sizes = {(c.suite, c.metric, c.judge): c.delta.n for c in compared}
    gated = [(s, "asr", rules.judge) for s in rules.asr_suites]
    gated += [(s, "over_refusal", rules.over_refusal_judge) for s in rules.over_refusal_suites]
    floors = []
    for suite, metric, judge in gated:
        n = sizes.get((suite, metric, judge), 0)
        ok = n >= min_suite_examples
        floors.append(Check(suite, metric, "size", ok, f"{suite}: {metric} on {n} examples; the operator's gate needs "
                            f"at least {min_suite_examples}: {'ok' if ok else 'FAILS'}", math.nan, math.nan, math.nan,
                            math.nan, math.nan, n))
    checks = d.checks + tuple(floors)
    return Decision(adapter, all(c.passed for c in checks), checks)
