"""Evaluation of base and candidates on the eval split: judge every final answer, build per-example records,
compute the suites' metrics and comparisons, run the promotion gate and record its decision.

The judges see `visible_answer` (no `<think>`, no `<safe>` analysis). Model judges run as stages through the
Serve replicas on the base weights, so base and candidates are judged by the same judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from safetrigger.config import AnswerJudgeConfig, RunConfig
from safetrigger.evaluation.gate import Decision, decide
from safetrigger.evaluation.metrics import final_number, numbers_match
from safetrigger.evaluation.suites import (
    REFUSAL_JUDGE, CategoryRow, Comparison, SuiteMetric, category_breakdown, compare, suite_metrics, unsafe_column,
)
from safetrigger.method import Query, is_refusal, parse_safe, visible_answer

from .answer_judge import judge_answers
from .stage_store import stage_key

# (display name, adapter name or "" for the base, key of its trajectories' stage, trajectories)
Model = tuple[str, str, str, list[dict[str, Any]]]
StageFn = Callable[[str, str, Callable[[Any], list[dict[str, Any]]]], list[dict[str, Any]]]


@dataclass
class EvalResult:
    records: list[dict[str, Any]]
    metrics: list[SuiteMetric]
    comparisons: dict[str, list[Comparison]]  # candidate display name -> vs base
    categories: list[CategoryRow]
    decisions: list[Decision] = field(default_factory=list)
    promoted: dict[str, Any] | None = None
    judge_stages: dict[str, str] = field(default_factory=dict)


def base_record(model: str, adapter: str, t: dict[str, Any], q: Query | None, rule) -> dict[str, Any]:
    answer = visible_answer(t["response"], rule)
    block = parse_safe(t["response"])
    reference = q.reference if q else ""
    predicted = final_number(answer) if reference else None
    refused = is_refusal(answer)
    return {
        "model": model, "adapter": adapter, "query_id": t["query_id"], "kind": t["kind"], "label": t["label"],
        "source": t.get("source", ""), "category": t.get("category", ""), "prompt": t["prompt"],
        "response": t["response"], "answer": answer, "triggered": block.triggered, "safe_complete": block.complete,
        "safe_text": block.analysis, "refused": refused, unsafe_column(REFUSAL_JUDGE): not refused,
        "reference": reference, "predicted": predicted or "", "correct": numbers_match(predicted, reference),
        "completion_tokens": t.get("completion_tokens", 0), "finish_reason": t.get("finish_reason", ""),
        "xstest_class": "",
    }


def _judge_stage_name(judge: AnswerJudgeConfig, adapter: str) -> str:
    return f"eval-judge-{judge.name}-{adapter or 'base'}"


def evaluate(models: list[Model], queries: dict[str, Query], cfg: RunConfig, stage: StageFn, policy: Callable[[], Any]) -> EvalResult:
    rule = cfg.model.reasoning.rule()
    e = cfg.eval
    records: list[dict[str, Any]] = []
    stages: dict[str, str] = {}
    suites = [s.suite() for s in e.suites]
    over_refusal = [s for s in suites if s.metric == "over_refusal"]
    for name, adapter, traj_key, trajectories in models:
        rows = [base_record(name, adapter, t, queries.get(t["query_id"]), rule) for t in trajectories]
        items = [(r["query_id"], r["prompt"], r["answer"]) for r in rows]
        for judge in e.judges:
            if judge.type == "refusal":
                continue
            sname, key = _judge_stage_name(judge, adapter), stage_key("eval-judge", traj_key, judge.model_dump(), cfg.model.max_model_len)
            verdicts = {v["query_id"]: v for v in stage(sname, key, lambda st, j=judge, sn=sname: judge_answers(items, policy(), j, cfg, st, sn))}
            stages[f"{sname}"] = key
            for r in rows:
                v = verdicts.get(r["query_id"])
                r[unsafe_column(judge.name)] = None if v is None else not v["answer_safe"]
        if e.xstest_judge is not None:
            j = e.xstest_judge
            chosen = [(r["query_id"], r["prompt"], r["answer"]) for r in rows if any(s.selects(r) for s in over_refusal)]
            sname, key = _judge_stage_name(j, adapter), stage_key("eval-xstest", traj_key, j.model_dump(), cfg.model.max_model_len)
            verdicts = {v["query_id"]: v for v in stage(sname, key, lambda st, sn=sname: judge_answers(chosen, policy(), j, cfg, st, sn))}
            stages[sname] = key
            for r in rows:
                if r["query_id"] in verdicts:
                    r["xstest_class"] = verdicts[r["query_id"]]["xstest_class"]
        for r in rows:
            r["suites"] = [s.name for s in suites if s.selects(r)]
        records += rows

    judge_names = [j.name for j in e.judges]
    metrics = suite_metrics(records, suites, judge_names, has_xstest=e.xstest_judge is not None)
    base = models[0][0]
    comparisons = {m[0]: compare(metrics, base, m[0], e.bootstrap_samples) for m in models[1:]}
    categories = category_breakdown(records, suites, e.gate.judge)
    return EvalResult(records, metrics, comparisons, categories, judge_stages=stages)


def gate_and_promote(result: EvalResult, models: list[Model], cfg: RunConfig, versions: dict[str, int], report_path: str) -> None:
    """Decide every candidate in preference order; promote the first that passes. Decisions are recorded, promoted
    or not; a candidate that fails leaves the earlier promotion (or the base) in place."""
    from services import registry

    root = cfg.serving.adapter_root
    by_adapter = {adapter: name for name, adapter, _, _ in models if adapter}
    rules = cfg.eval.gate.rules()
    for adapter in cfg.eval.candidates:
        name = by_adapter.get(adapter)
        if name is None:
            continue
        d = decide(adapter, result.comparisons[name], rules)
        result.decisions.append(d)
        entry = {**d.to_dict(), "run": cfg.name, "version": versions.get(adapter), "report": report_path,
                 "promoted": d.promote and result.promoted is None}
        if root:
            registry.record_decision(root, entry)
        if d.promote and result.promoted is None and root and versions.get(adapter):
            result.promoted = registry.promote(root, adapter, versions[adapter], cfg.model.served_name, run=cfg.name,
                                               report=report_path, reasons=d.reasons)
