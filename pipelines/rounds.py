"""The per-round table: one row per trained model (ST-S, each DPO round) beside the base, with what it was trained
on, how much of the self-generated material was accepted, and the numbers the gate decides on. One glance says
which round helped and at what cost; the detailed tables stay in their own sections."""

from __future__ import annotations

from typing import Any

from safetrigger.evaluation.suites import trigger_by_model

from .stages import round_model


def training_of(sft: dict[str, Any], pairs: dict[int, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per evaluated model's display name: `trained on` and `acceptance` cells from the SFT data statistics (`sft`)
    and each DPO round's pair statistics (`pairs`, by round). ST-S: tagged targets kept of the unsafe training
    queries reviewed; ST-D: queries that gave a pair."""
    out = {"base": {"trained on": "–", "acceptance": "–"}}
    if sft:
        kept, dropped = sft.get("kept", {}), sft.get("dropped", {})
        unsafe = [k for k in kept if k != "general"] + [k.split("/")[0] for k in dropped if not k.startswith("general/")]
        cells = []
        for kind in dict.fromkeys(unsafe):
            lost = sum(n for k, n in dropped.items() if k.split("/")[0] == kind)
            cells.append(_share(kind, kept.get(kind, 0), kept.get(kind, 0) + lost))
        out["ST-S"] = {"trained on": f"{sum(kept.values())} SFT examples ({sum(v for k, v in kept.items() if k != 'general')} tagged)",
                       "acceptance": "; ".join(cells) or "–"}
    for r, stats in pairs.items():
        if not stats:
            continue
        per_kind = stats.get("per_kind", {})
        total = sum(c.get("pairs", 0) for c in per_kind.values())
        mix = "; ".join(f"{kind}: " + ", ".join(f"{m} {n}" for m, n in sorted(c["mix"].items()))
                        for kind, c in per_kind.items() if c.get("mix"))
        out[round_model(r)] = {"trained on": f"{total} DPO pairs" + (f" ({mix})" if mix else ""),
                               "acceptance": "; ".join(_share(k, c.get("pairs", 0), c.get("queries", 0))
                                                       for k, c in per_kind.items()) or "–"}
    return out


def round_table(result, models: list[str], cfg, training: dict[str, dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: trained on, acceptance, trigger on unsafe / safe prompts, the gate judge's ASR per gated
    suite, held-out ASR per held-out suite, over-refusal and accuracy per gated suite, and the gate's verdict."""
    gate = cfg.eval.gate
    by = {(m.model, m.suite, m.judge): m.rate for m in result.metrics}
    held_out = [s.name for s in cfg.eval.suites if s.held_out and s.metric == "asr"]
    columns = ([(f"ASR {s}", s, gate.judge) for s in gate.asr_suites]
               + [(f"ASR {s} (held-out)", s, gate.judge) for s in held_out]
               + [("over-refusal" if s == "over_refusal" else f"over-refusal {s}", s, gate.over_refusal_judge)
                  for s in gate.over_refusal_suites]
               + [(f"accuracy {s}", s, "exact_match") for s in gate.accuracy_suites])
    triggers = trigger_by_model(result.records)
    decisions = {d.candidate: d for d in result.decisions}  # by adapter name
    promoted = (result.promoted or {}).get("name")
    header = ["model", "trained on", "acceptance", "trigger unsafe / safe", *(c[0] for c in columns), "gate"]
    rows = []
    for m in models:
        t = triggers.get(m)
        trig = f"{100 * t.recall.value:.1f}% / {100 * t.false_alarm.value:.1f}%" if t else "–"
        cells = [f"{100 * by[(m, s, j)].value:.1f}%" if (m, s, j) in by and by[(m, s, j)].n else "–" for _, s, j in columns]
        d = decisions.get(result.adapters.get(m, ""))
        verdict = "–" if d is None else "promoted" if d.candidate == promoted else "passes" if d.promote else "rejected"
        info = training.get(m, {})
        rows.append([m, info.get("trained on", "–"), info.get("acceptance", "–"), trig, *cells, verdict])
    return header, rows


def _share(kind: str, k: int, n: int) -> str:
    return f"{kind} {k}/{n}" + (f" ({100 * k / n:.0f}%)" if n else "")
