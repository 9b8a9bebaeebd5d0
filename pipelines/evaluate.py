"""Evaluation of base and candidates on the eval split: judge every final answer, build per-example records,
compute the suites' metrics and comparisons, run the promotion gate and record its decision.

The judges see `visible_answer` (no `<think>`, no `<safe>` analysis). Model judges run as stages through the
Serve replicas on the base weights, so base and candidates are judged by the same judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from safetrigger.config import RunConfig
from safetrigger.evaluation.gate import Decision, decide
from safetrigger.evaluation.health import JudgeHealth, judge_health
from safetrigger.evaluation.health import Verdict as JudgeVerdict
from safetrigger.evaluation.metrics import final_number, numbers_match
from safetrigger.evaluation.suites import (
    REFUSAL_JUDGE, CategoryRow, Comparison, GroupAverage, SuiteMetric, category_breakdown, compare, group_averages,
    suite_metrics, unsafe_column,
)
from safetrigger.method import Query, incomplete, is_refusal, parse_safe, safe_position, visible_answer

from .chat import reasoning_rule
from .rows import Trajectory, Verdict


class Model(NamedTuple):
    """An evaluated model: its display name, its adapter ("" for the base), its answers on the eval split."""

    name: str
    adapter: str
    answers: list[Trajectory]


@dataclass
class EvalResult:
    records: list[dict[str, Any]]
    metrics: list[SuiteMetric]
    comparisons: dict[str, list[Comparison]]  # candidate display name -> vs base
    categories: list[CategoryRow]
    health: list[JudgeHealth] = field(default_factory=list)  # every model judge, over all evaluated models
    averages: dict[str, list[GroupAverage]] = field(default_factory=dict)  # candidate -> benchmark-group ASR means
    decisions: list[Decision] = field(default_factory=list)
    promoted: dict[str, Any] | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # candidate display name -> its adapter (ST-S -> st-s)


def base_record(model: str, adapter: str, t: Trajectory, q: Query | None, rule) -> dict[str, Any]:
    answer = visible_answer(t.response, rule)
    block = parse_safe(t.response)
    reference = q.reference if q else ""
    predicted = final_number(answer) if reference else None
    refused = is_refusal(answer)
    missing = incomplete(t.response, rule)
    position = safe_position(t.response, rule.opened)
    return {
        "model": model, "adapter": adapter, "query_id": t.query_id, "kind": t.kind, "label": t.label,
        "source": t.source, "category": t.category, "prompt": t.prompt,
        "response": t.response, "answer": answer, "triggered": block.triggered, "safe_complete": block.complete,
        "safe_text": block.analysis, "refused": refused, unsafe_column(REFUSAL_JUDGE): not refused,
        "reference": reference, "predicted": predicted or "", "correct": numbers_match(predicted, reference),
        "completion_tokens": t.completion_tokens, "finish_reason": t.finish_reason,
        "xstest_class": "", "incomplete": missing.value if missing else "",
        "safe_position": position,
    }


def model_records(model: str, adapter: str, trajectories: list[Trajectory], queries: dict[str, Query],
                  cfg: RunConfig, model_path: str) -> list[dict[str, Any]]:
    """One record per eval-split answer of a model, with what needs no judge model (refusal, `<safe>`, accuracy)."""
    rule = reasoning_rule(cfg, model_path)
    return [base_record(model, adapter, t, queries.get(t.query_id), rule) for t in trajectories if t.split == "eval"]


def suite_selected(records: list[dict[str, Any]], cfg: RunConfig, metric: str) -> list[dict[str, Any]]:
    """The records some `metric` suite reads. A judge's verdict counts nowhere else, so a judge stage asks for
    these only: an ASR judge on every eval answer spent 73% of its time on rows no ASR suite selects (the embedded
    main job: 648 of the self judge's 885 verdicts were on general prompts, over-refusal and accuracy, whose
    metrics read refusal match and the reference)."""
    suites = [s.suite() for s in cfg.eval.suites if s.metric == metric]
    return [r for r in records if any(s.selects(r) for s in suites)]


def selecting_suites(cfg: RunConfig, metric: str) -> list[list[list[str]]]:
    """What decides which records `suite_selected` returns, for a stage key: each `metric` suite's filters."""
    return sorted([sorted(s.kinds), sorted(s.sources), sorted(s.labels)] for s in cfg.eval.suites if s.metric == metric)


def evaluate(models: list[Model], verdicts: dict[str, list[Verdict]], queries: dict[str, Query],
             cfg: RunConfig, model_path: str) -> EvalResult:
    """Records, suite metrics and comparisons from the models' answers and the judge stages' verdicts
    (`verdicts`: judge stage name -> its rows; see `pipelines.stages.judge_stage_name`)."""
    from .stages import judge_stage_name

    e = cfg.eval
    suites = [s.suite() for s in e.suites]
    records: list[dict[str, Any]] = []
    seen: dict[str, list[JudgeVerdict]] = {}
    for name, adapter, trajectories in models:
        rows = model_records(name, adapter, trajectories, queries, cfg, model_path)
        for judge in [j for j in e.judges if j.type != "refusal"]:
            by_id = {v.query_id: v for v in verdicts.get(judge_stage_name(judge, adapter), [])}
            for r in rows:
                v = by_id.get(r["query_id"])
                # a rubric judge that wrote no grades decided nothing: no verdict (its health counts the row)
                r[unsafe_column(judge.name)] = None if v is None or not v.decided else not v.answer_safe
                if v is not None:
                    seen.setdefault(judge.name, []).append(_verdict(r["kind"], v))
        if e.xstest_judge is not None:
            by_id = {v.query_id: v for v in verdicts.get(judge_stage_name(e.xstest_judge, adapter), [])}
            for r in rows:
                if r["query_id"] in by_id:
                    r["xstest_class"] = by_id[r["query_id"]].xstest_class
                    seen.setdefault(e.xstest_judge.name, []).append(_verdict(r["kind"], by_id[r["query_id"]]))
        for r in rows:
            r["suites"] = [s.name for s in suites if s.selects(r)]
        records += rows

    judge_names = [j.name for j in e.judges]
    metrics = suite_metrics(records, suites, judge_names, has_xstest=e.xstest_judge is not None,
                            pooled_incomplete=tuple(e.gate.asr_suites))
    base = models[0].name
    comparisons = {m.name: compare(metrics, base, m.name, e.bootstrap_samples) for m in models[1:]}
    categories = category_breakdown(records, suites, e.gate.judge)
    health = [h for judge, vs in seen.items() for h in judge_health(judge, vs)]
    averages = {m.name: group_averages(metrics, suites, base, m.name, e.bootstrap_samples) for m in models[1:]}
    return EvalResult(records, metrics, comparisons, categories, health, averages=averages,
                      adapters={m.name: m.adapter for m in models if m.adapter})


def _verdict(kind: str, v: Verdict) -> JudgeVerdict:
    return JudgeVerdict(kind, v.resolved, v.mass)


def candidate_order(cfg: RunConfig) -> list[str]:
    """`eval.candidates` with `st-d` standing for every DPO round's adapter, the latest round first."""
    from .stages import round_adapter

    rounds = [round_adapter(r) for r in range(cfg.dpo.rounds, 0, -1)]
    return [a for c in cfg.eval.candidates for a in (rounds if c == "st-d" else [c])]


def gate_and_promote(result: EvalResult, models: list[Model], cfg: RunConfig, versions: dict[str, int], report_path: str) -> None:
    """Decide every candidate in preference order; promote the first that passes. Decisions are recorded, promoted
    or not; a candidate that fails leaves the earlier promotion (or the base) in place. A run with its own registry
    (`serving.adapter_scope`, every gateway job) records its decisions there and promotes nothing: promotion into
    the served registry is an operator's action (`services/promotion.py`)."""
    from services import adapters, registry

    s = cfg.serving
    root = adapters.run_registry(s)
    by_adapter = {m.adapter: m.name for m in models if m.adapter}
    rules = cfg.eval.gate.rules()
    for adapter in candidate_order(cfg):
        name = by_adapter.get(adapter)
        if name is None:
            continue
        d = decide(adapter, result.comparisons[name], rules, result.health)
        result.decisions.append(d)
        promotes = d.promote and result.promoted is None and root is not None and s.adapter_scope is None
        entry = {**d.to_dict(), "run": cfg.name, "version": versions.get(adapter), "report": report_path,
                 "promoted": promotes}
        if root:
            registry.record_decision(root, entry)
        if promotes and versions.get(adapter):
            result.promoted = registry.promote(root, adapter, versions[adapter], cfg.model.served_name, run=cfg.name,
                                               report=report_path, reasons=d.reasons)
