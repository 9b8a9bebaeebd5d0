"""The main job: load queries, then run the declared stages (`pipelines/stages.py`) — self-generate, self-judge,
self-review, SFT data, ST-S, DPO sampling/judging/pairs, ST-D, evaluation judges — then the tables, the
evaluation report and the promotion gate, and the summary; all of it tracked in MLflow (`pipelines/tracking.py`).

Each stage writes under a key derived from its inputs and config; a re-run skips finished stages and resumes a
stage that was killed halfway (`pipelines/graph.py`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetrigger.artifacts import PREVIOUS_SUMMARY, PROGRESS, REPORT_DIR, REPORT_HTML, SUMMARY
from safetrigger.config import RunConfig

from .graph import Job, Skip, compute_keys, run_stages, stage_paths, upstream_of
from .runtime import (emit_precision, init_ray, precision_report, set_threads, with_adapter_root,
                      with_serving_dtype)
from .progress_log import recording, say, teed
from .rows import Trajectory
from .stage_store import stage_key
from .stages import QUERIES, adapter_stages, evaluated, main_graph, round_adapter, round_suffix
from .tracking import Tracker, model_card


def _write_queries(out: Path, queries) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / "queries.parquet"
    tmp = out / ".queries.parquet.tmp"
    pq.write_table(pa.Table.from_pylist([asdict(q) for q in queries]), tmp)
    os.replace(tmp, path)
    return path


class LazyPolicy:
    """The policy endpoint, deployed (or attached to) on first use: a run whose stages all finished earlier starts
    nothing. With a given endpoint it is used as is and left running."""

    def __init__(self, cfg: RunConfig, model_path: str, endpoint, emit, timings: dict[str, float]) -> None:
        self.cfg, self.model_path, self.endpoint, self.emit, self.timings = cfg, model_path, endpoint, emit, timings
        self.owned = endpoint is None and not cfg.serving.attach
        self.guards: list = []  # the guard apps this run deployed (RunConfig.guards)

    def __call__(self):
        from services.policy import attach_policy, start_policy

        if self.endpoint is not None:
            return self.endpoint
        init_ray(self.cfg)
        if self.cfg.serving.attach:
            self.endpoint = attach_policy(self.cfg, self.model_path)
            self.emit(f"[serve] attached to the running policy app {self.endpoint.app_name!r}")
            return self.endpoint
        t = time.monotonic()
        self.emit(f"[serve] starting policy {self.cfg.model.source} ({self.cfg.serving.num_replicas} replica(s), "
                  f"{self.cfg.serving.accelerator}, {self.cfg.model.dtype})")
        self.endpoint = start_policy(self.cfg, self.model_path)
        self.timings["serve_start_s"] = time.monotonic() - t
        self.emit(f"[serve] ready in {self.timings['serve_start_s']:.0f}s" +
                  (f" at {self.endpoint.base_url}" if self.endpoint.base_url else " (by handle; no HTTP route)"))
        if self.cfg.guards:
            from services.policy import start_guards

            t = time.monotonic()
            self.guards = start_guards(self.cfg)
            self.timings["guards_start_s"] = time.monotonic() - t
            self.emit(f"[serve] guard app(s) {[g.app_name for g in self.guards]} ready in "
                      f"{self.timings['guards_start_s']:.0f}s")
        return self.endpoint

    def stop_if_owned(self) -> None:
        if self.owned and self.endpoint is not None:
            from ray import serve

            for app in [self.endpoint.app_name, *(g.app_name for g in self.guards)]:
                serve.delete(app)


def load_queries(cfg: RunConfig, out: Path, emit) -> tuple[list, Any]:
    """The run's queries and the audit of its leakage rules."""
    from .datasets import load_all_audited

    queries, audit = load_all_audited(cfg.data)
    _write_queries(out, queries)
    counts = _split_counts(queries)
    emit(f"[data] {len(queries)} queries: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    emit(f"[data] {audit.line()}")
    return queries, audit


def queries_key(queries) -> str:
    return stage_key(sorted((q.id, q.split) for q in queries))


def run(cfg: RunConfig, emit=say, endpoint=None, until: str | None = None) -> dict[str, Any]:
    """Run the pipeline; with `endpoint` (a running policy service) it is used as is and left running. Progress
    lines go to `emit` and, as JSON lines, to `<output_dir>/progress.jsonl`. `until`: only that stage and the
    stages it reads (no tables or report unless their stages ran)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with recording(out / PROGRESS):
        return _run(cfg, out, teed(emit), endpoint, until)


def _run(cfg: RunConfig, out: Path, emit, endpoint, until: str | None = None) -> dict[str, Any]:
    from safetrigger.model_cache import resolve_model

    t0 = time.monotonic()
    cfg = with_adapter_root(cfg)
    set_threads(cfg.torch_threads)
    precision = precision_report(cfg)
    emit_precision(precision, emit)
    cfg = with_serving_dtype(cfg, precision["serving"]["dtype"])
    stages = main_graph(cfg) if until is None else upstream_of(main_graph(cfg), until)  # a bad name fails first
    queries, audit = load_queries(cfg, out, emit)
    model_path = resolve_model(cfg.model.source)
    timings: dict[str, float] = {}
    policy = LazyPolicy(cfg, model_path, endpoint, emit, timings)
    tracker = Tracker(cfg, out, emit)
    tracker.params(_split_counts(queries))
    job = Job(cfg, out, queries, model_path, policy, emit, timings, tracker=tracker)
    keys = compute_keys(stages, cfg, {QUERIES: queries_key(queries)})
    try:
        results = run_stages(stages, job, keys, {QUERIES: queries})
    except BaseException:
        tracker.finish(ok=False)
        raise

    whole = until is None
    tables = _tables(job, results, f"Data: {audit.line()}.") if "judge" in results else _NO_TABLES
    report = _evaluate_and_report(job, results, tables["markdown"], precision) if cfg.eval.enabled and whole else {}
    policy.stop_if_owned()
    summary = {
        "name": cfg.name,
        "model": cfg.model.source,
        "queries": len(queries),
        "splits": asdict(audit),
        "precision": precision,
        "stages": stage_paths(stages, out, keys),
        "sft_data": _value(results, "sft-data", "stats"),
        "sft": _value(results, "sft-adapter"),
        "dpo_pairs": _value(results, "dpo-pairs", "stats"),
        "dpo": _value(results, "dpo-adapter"),
        # every DPO round (dpo.rounds), round 1 included: its pairs and their mix, and the adapter it trained
        "dpo_rounds": [{"round": r, "pairs": _value(results, f"dpo-pairs{round_suffix(r)}", "stats"),
                        "adapter": _value(results, f"dpo-adapter{round_suffix(r)}")}
                       for r in range(1, cfg.dpo.rounds + 1)],
        "awareness": tables["awareness"],
        "trigger": tables["trigger"],
        "report": report,
        "timings": {**timings, "total_s": time.monotonic() - t0},
        "stage_times": job.stage_times,  # every stage store's own time, also of stages an earlier invocation finished
    }
    _track_evaluation(tracker, cfg, out, keys, summary, report)
    summary["timings"]["tracking_s"] = tracker.seconds  # every MLflow call so far (issue 19: < 3% of the run)
    write_summary(out, summary)
    _track_files(tracker, out)
    total = summary["timings"]["total_s"]
    emit(f"[done] {out / SUMMARY} ({total:.0f}s)")
    if cfg.tracking.enabled:
        emit(f"[tracking] {tracker.seconds:.1f}s of the run's {total:.0f}s in MLflow calls ({100 * tracker.seconds / total:.1f}%)")
    if report:
        emit(f"[report] {report['html']}\n[report] {report['markdown']}")
    return summary


_NO_TABLES = {"awareness": [], "trigger": [], "markdown": ""}


def _split_counts(queries) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in queries:
        counts[f"{q.kind}/{q.split}"] = counts.get(f"{q.kind}/{q.split}", 0) + 1
    return counts


def _track_evaluation(tracker: Tracker, cfg: RunConfig, out: Path, keys: dict[str, str], summary: dict[str, Any],
                      report: dict[str, Any]) -> None:
    """The evaluation and a model card per trained adapter (beside it and on its registered version)."""
    cards: dict[str, str] = {}
    if report:
        data = json.loads(Path(report["metrics"]).read_text())
        decisions = {d["candidate"]: d for d in report.get("decisions", [])}
        trained = {"st-s": summary["sft"], **{round_adapter(x["round"]): x["adapter"] for x in summary["dpo_rounds"]}}
        for adapter, stage in adapter_stages(cfg):
            if trained.get(adapter):
                cards[adapter] = model_card(adapter, cfg, keys[stage], data, summary, decisions.get(adapter))
                (out / f"{stage}-{keys[stage]}.card.md").write_text(cards[adapter])
        tracker.evaluation(Path(report["metrics"]), Path(report["html"]).parent, report.get("decisions", []),
                           report.get("promoted"), cards)


def _track_files(tracker: Tracker, out: Path) -> None:
    """The run's summary and tables as artifacts; then the tracking run ends."""
    for name in (SUMMARY, "awareness.md"):
        if (out / name).is_file():
            tracker.artifact(out / name)
    tracker.finish(ok=True)


def _value(results: dict[str, Any], stage: str, field: str | None = None) -> dict[str, Any]:
    r = results.get(stage)
    if r is None or isinstance(r, Skip):
        return {}
    return r[field] if field else r


def _answers(results: dict[str, Any], stage: str) -> list[Trajectory]:
    r = results.get(stage)
    return [] if r is None or isinstance(r, Skip) else [t for t in r if t.split == "eval"]


def _tables(job: Job, results: dict[str, Any], data_line: str = "") -> dict[str, Any]:
    """Awareness (the policy judging its own reasoning), `<safe>` trigger rates per model, DPO pair statistics."""
    from .awareness import awareness_table, format_table
    from .dpo_data import format_pair_table
    from .sft_data import format_opener_line, format_selection_table
    from .trigger import format_trigger_table, trigger_rows

    table = awareness_table(results["judge"])
    text = format_table(table, f"{job.cfg.model.source} (all splits)")
    triggers = [row for name, _, stage in evaluated(job.cfg) for row in trigger_rows(name, _answers(results, stage))]
    trigger_text = format_trigger_table(triggers)
    rounds = job.cfg.dpo.rounds
    pair_text = "\n\n".join(
        (f"DPO round {r}:\n\n" if rounds > 1 else "") + format_pair_table(stats)
        for r in range(1, rounds + 1) if (stats := _value(results, f"dpo-pairs{round_suffix(r)}", "stats")))
    sft_stats = _value(results, "sft-data", "stats")
    selection_text = format_selection_table(sft_stats)
    opener_text = format_opener_line(sft_stats or {}, job.cfg.review.answer_opener, job.cfg.review.verdict_word)
    markdown = "\n\n".join(x for x in (data_line, text, trigger_text, opener_text, selection_text, pair_text) if x)
    (job.out / "awareness.md").write_text(markdown + "\n")
    job.emit("\n" + text + "\n\n" + trigger_text + "\n")
    return {"awareness": [asdict(r) for r in table], "trigger": [asdict(r) for r in triggers], "markdown": markdown}


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """Atomically; the summary it replaces is kept beside it, so `bench/pipeline.py` can show what got slower."""
    path = out / SUMMARY
    if path.is_file():
        os.replace(path, out / PREVIOUS_SUMMARY)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
    return path


def _evaluate_and_report(job: Job, results: dict[str, Any], awareness_md: str,
                         precision: dict[str, Any] | None = None) -> dict[str, Any]:
    from .evaluate import Model, evaluate, gate_and_promote
    from .report import write_report
    from .rounds import training_of

    cfg = job.cfg
    models = [Model(name, adapter, _answers(results, stage)) for name, adapter, stage in evaluated(cfg)
              if name == "base" or _answers(results, stage)]
    verdicts = {name: rows for name, rows in results.items() if name.startswith("eval-judge-") and isinstance(rows, list)}
    result = evaluate(models, verdicts, {q.id: q for q in job.queries}, cfg, job.model_path)
    report_dir = job.out / REPORT_DIR
    versions = {adapter: _value(results, stage).get("version") for adapter, stage in adapter_stages(cfg)}
    gate_and_promote(result, models, cfg, {k: v for k, v in versions.items() if v}, str((report_dir / REPORT_HTML).resolve()))
    for d in result.decisions:
        job.emit(f"[gate] {d.candidate}: {'PASS' if d.promote else 'rejected'}" + "".join(f"\n  - {r}" for r in d.reasons))
    if cfg.serving.adapter_scope:
        job.emit(f"[gate] decided in this job's own registry: an operator promotes a passing adapter into the served "
                 f"one (safe-trigger promote {cfg.serving.adapter_scope} <adapter>)")
    else:
        job.emit(f"[gate] promoted: {result.promoted['model'] if result.promoted else 'nothing (the base keeps serving)'}")
    training = training_of(_value(results, "sft-data", "stats"),
                           {r: _value(results, f"dpo-pairs{round_suffix(r)}", "stats") for r in range(1, cfg.dpo.rounds + 1)})
    paths = write_report(report_dir, result, [m.name for m in models], cfg, job.stage_times, awareness_md, precision,
                         training)
    return {**{k: str(v) for k, v in paths.items()}, "promoted": result.promoted,
            "decisions": [d.to_dict() for d in result.decisions]}
