"""The main job: load queries, start the policy service, self-generate, self-judge, self-review, build the SFT
data, train ST-S on Ray Train and serve it hot; let ST-S sample on held-apart queries, judge and pair its
samples, train ST-D with DPO and serve it hot; measure how often `<safe>` fires for base, ST-S and ST-D.

Each stage writes under a key derived from its inputs and config; a re-run skips finished stages and resumes a
stage that was killed halfway.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from safetrigger.config import RunConfig

from .stage_store import StageStore, stage_key


def set_threads(n: int) -> None:
    # 2 cores: every extra OpenMP/BLAS thread in the driver competes with the engine and slows both.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, namespace=cfg.ray.namespace)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard, dashboard_port=cfg.ray.dashboard_port,
                 dashboard_host="127.0.0.1", namespace=cfg.ray.namespace,
                 log_to_driver=os.environ.get("SAFE_TRIGGER_RAY_LOGS", "0") == "1")


def _write_queries(out: Path, queries) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / "queries.parquet"
    tmp = out / ".queries.parquet.tmp"
    pq.write_table(pa.Table.from_pylist([asdict(q) for q in queries]), tmp)
    os.replace(tmp, path)
    return path


def precision_report(cfg: RunConfig) -> dict[str, Any]:
    """The CPU this run computes on and the precision each engine gets from it (printed and kept in the summary:
    a number measured here means little without them)."""
    from safetrigger.hardware import choose_dtype, this_cpu, training_precision

    cpu = this_cpu()
    return {"cpu": {"model": cpu.model, "logical_cpus": cpu.logical_cpus, "simd": cpu.simd(), "native_bf16": cpu.native_bf16},
            "serving": choose_dtype(cfg.model.dtype, cfg.serving.accelerator, cpu).to_dict(),
            "sft": training_precision(cfg.sft.precision, cfg.sft.use_gpu, cpu).to_dict(),
            "dpo": training_precision(cfg.dpo.precision, cfg.dpo.use_gpu, cpu).to_dict()}


def emit_precision(report: dict[str, Any], emit) -> None:
    c = report["cpu"]
    emit(f"[cpu] {c['model']}: {c['logical_cpus']} logical CPUs, {' '.join(c['simd']) or 'no AVX'}, "
         f"{'native' if c['native_bf16'] else 'no native'} bf16 -> serving {report['serving']['dtype']} "
         f"({report['serving']['reason']}), SFT {report['sft']['dtype']}, DPO {report['dpo']['dtype']}")
    for what in ("serving", "sft", "dpo"):
        if report[what]["warning"]:
            emit(f"[cpu] WARNING ({what}): {report[what]['warning']}")


def with_adapter_root(cfg: RunConfig) -> RunConfig:
    """The replicas need to know the adapter registry before they start; default: under the run's output."""
    if cfg.serving.adapter_root:
        return cfg
    root = str(Path(cfg.output_dir).resolve() / "adapters")
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"adapter_root": root})})


def _train_and_publish(name: str, train: Callable[[], dict[str, Any]], adapter_dir: Path, cfg: RunConfig,
                       timings: dict[str, float], emit) -> dict[str, Any]:
    """Train unless this adapter exists already; then make it the current `name` in the registry, so the running
    replicas serve it hot. Re-published when the registry holds another version (e.g. a later run's)."""
    from services import adapters

    meta = adapter_dir.parent / f"{adapter_dir.name}.json"
    if meta.is_file():
        emit(f"[{name}] finished earlier: {adapter_dir}")
        result = json.loads(meta.read_text())
    else:
        init_ray(cfg)
        t = time.monotonic()
        result = train()
        timings[f"{name}_train_s"] = time.monotonic() - t
        m = result["metrics"]
        emit(f"[{name}] loss {m.get('train_loss', m.get('loss'))}, {m.get('train_tokens_per_second', 0):.0f} tokens/s, "
             f"{timings[f'{name}_train_s']:.0f}s")
    result["version"] = adapters.ensure_published(cfg.serving.adapter_root, name, adapter_dir)
    meta.write_text(json.dumps(result, indent=2, default=str))
    emit(f"[{name}] serving {name} v{result['version']}")
    return result


def run(cfg: RunConfig, emit=print, endpoint=None) -> dict[str, Any]:
    """Run the pipeline; with `endpoint` (a running policy service) it is used as is and left running."""
    from ray import serve

    from services.policy import attach_policy, start_policy
    from safetrigger.model_cache import resolve_model

    from .awareness import awareness_table, format_table
    from .datasets import load_all
    from .generate import run_generate
    from .judge import run_judge
    from .review import run_review
    from .sft_data import build_sft_examples, write_jsonl
    from .answer_judge import run_answer_judge
    from .dpo_data import build_dpo_pairs, format_pair_table
    from .sample import run_sample
    from .train.dpo import train_dpo
    from .train.sft import train_sft
    from .trigger import format_trigger_table, trigger_rows

    t0 = time.monotonic()
    cfg = with_adapter_root(cfg)
    set_threads(cfg.torch_threads)
    precision = precision_report(cfg)
    emit_precision(precision, emit)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    queries = load_all(cfg.data)
    _write_queries(out, queries)
    counts: dict[str, int] = {}
    for q in queries:
        counts[f"{q.kind}/{q.split}"] = counts.get(f"{q.kind}/{q.split}", 0) + 1
    emit(f"[data] {len(queries)} queries: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))

    model_path = resolve_model(cfg.model.source)
    ids_key = stage_key(sorted((q.id, q.split) for q in queries))
    # the dtype the engine really runs in: `auto` answers differently on an AMX and an AVX2 machine
    served_model = {**cfg.model.model_dump(), "dtype": precision["serving"]["dtype"]}
    gen_key = stage_key("generate", served_model, cfg.generation.model_dump(exclude={"batch_size", "concurrency", "chunk_rows", "slow_tokens_per_s"}), ids_key)
    judge_key = stage_key("judge", gen_key, cfg.judge.model_dump())
    review_key = stage_key("review", gen_key, cfg.review.model_dump(), cfg.judge.max_reasoning_tokens)
    sft_key = stage_key("sft", review_key, cfg.sft_data.model_dump(), cfg.sft.model_dump())
    eval_s_key = stage_key("eval-st-s", sft_key, gen_key)
    d = cfg.dpo
    sample_key = stage_key("dpo-sample", sft_key, ids_key, d.num_samples, d.temperature, d.top_p, d.max_tokens, d.seed)
    dpo_judge_key = stage_key("dpo-judge", sample_key, d.judge.model_dump())
    pairs_key = stage_key("dpo-pairs", dpo_judge_key, d.w_a, d.w_b, d.w_c, d.delta, d.max_length)
    dpo_key = stage_key("dpo", pairs_key, d.model_dump(exclude={"judge", "enabled"}))
    eval_d_key = stage_key("eval-st-d", dpo_key, gen_key)

    timings: dict[str, float] = {}
    throughput: list[dict[str, Any]] = []
    owned = endpoint is None and not cfg.serving.attach

    def policy():
        nonlocal endpoint
        if endpoint is None and cfg.serving.attach:
            init_ray(cfg)
            endpoint = attach_policy(cfg, model_path)
            emit(f"[serve] attached to the running policy app {endpoint.app_name!r} at {endpoint.base_url}")
        if endpoint is None:
            init_ray(cfg)
            t = time.monotonic()
            emit(f"[serve] starting policy {cfg.model.source} ({cfg.serving.num_replicas} replica(s), {cfg.serving.accelerator})")
            endpoint = start_policy(cfg, model_path)
            timings["serve_start_s"] = time.monotonic() - t
            emit(f"[serve] ready in {timings['serve_start_s']:.0f}s at {endpoint.base_url}")
        return endpoint

    def stage(name: str, key: str, work: Callable[[StageStore], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        store = StageStore(out / f"{name}-{key}")
        if store.done:
            emit(f"[{name}] finished earlier: {store.root}")
            rows = store.read()
        else:
            t = time.monotonic()
            rows = work(store)
            timings[f"{name}_s"] = time.monotonic() - t
            tokens = sum(r.get("completion_tokens", 0) for r in rows)
            store.finish(stage=name, key=key, completion_tokens=tokens, elapsed_s=timings[f"{name}_s"])
            emit(f"[{name}] {len(rows)} rows, {tokens} new tokens in {timings[f'{name}_s']:.0f}s")
        meta = json.loads((store.root / "_DONE.json").read_text())
        if meta.get("elapsed_s"):  # also for stages finished by an earlier invocation
            throughput.append({"stage": name, "rows": meta["rows"], "seconds": meta["elapsed_s"],
                               "completion_tokens": meta.get("completion_tokens", 0)})
        return rows

    trajectories = stage("generate", gen_key, lambda st: run_generate(queries, policy(), cfg, st))
    judgements = stage("judge", judge_key, lambda st: run_judge(trajectories, policy(), cfg, st))
    reviews = stage("review", review_key, lambda st: run_review(trajectories, policy(), cfg, st))

    examples, sft_stats = build_sft_examples(trajectories, reviews, cfg, model_path)
    sft_path = out / f"sft-data-{stage_key(review_key, cfg.sft_data.model_dump())}.jsonl"
    write_jsonl(sft_path, examples)
    emit(f"[sft-data] {len(examples)} examples -> {sft_path}; kept {sft_stats['kept']}, dropped {sft_stats['dropped']}")

    eval_queries = [q for q in queries if q.split == "eval"]
    sft_dir, dpo_dir = out / f"sft-adapter-{sft_key}", out / f"dpo-adapter-{dpo_key}"
    sft_result: dict[str, Any] = {}
    dpo_result: dict[str, Any] = {}
    pair_stats: dict[str, Any] = {}
    st_s: list[dict[str, Any]] = []
    st_d: list[dict[str, Any]] = []
    if cfg.sft.enabled:
        emit(f"[st-s] SFT on {len(examples)} examples, {cfg.sft.num_workers} Ray Train worker(s)")
        sft_result = _train_and_publish("st-s", lambda: train_sft(sft_path, model_path, sft_dir, cfg, name=f"sft-{sft_key}", emit=emit),
                                        sft_dir, cfg, timings, emit)
        st_s = stage("eval-st-s", eval_s_key, lambda st: run_generate(eval_queries, policy(), cfg, st, adapter="st-s"))
    pool = [q for q in queries if q.split == "dpo"]
    if cfg.dpo.enabled and not pool:
        emit(f"[dpo] no queries of kinds {cfg.data.dpo_kinds} in the dpo split: ST-D not trained")
    if cfg.dpo.enabled and pool:
        samples = stage("dpo-sample", sample_key, lambda st: run_sample(pool, policy(), cfg, st, adapter="st-s"))
        verdicts = stage("dpo-judge", dpo_judge_key, lambda st: run_answer_judge(samples, policy(), cfg, st))
        pairs, pair_stats = build_dpo_pairs(samples, verdicts, cfg, model_path)
        dpo_path = out / f"dpo-pairs-{pairs_key}.jsonl"
        write_jsonl(dpo_path, pairs)
        emit(f"[dpo-pairs] {len(pairs)} pairs -> {dpo_path}\n\n{format_pair_table(pair_stats)}\n")
        if pairs:
            emit(f"[st-d] DPO on {len(pairs)} pairs, {cfg.dpo.num_workers} Ray Train worker(s)")
            dpo_result = _train_and_publish(
                "st-d", lambda: train_dpo(dpo_path, model_path, sft_dir, dpo_dir, cfg, name=f"dpo-{dpo_key}", emit=emit),
                dpo_dir, cfg, timings, emit)
            st_d = stage("eval-st-d", eval_d_key, lambda st: run_generate(eval_queries, policy(), cfg, st, adapter="st-d"))
        else:
            emit("[st-d] no pair passed delta and max_length: ST-D not trained")

    table = awareness_table(judgements)
    text = format_table(table, f"{cfg.model.source} (all splits)")
    triggers = trigger_rows("base", [t for t in trajectories if t["split"] == "eval"])
    triggers += trigger_rows("ST-S", st_s) + trigger_rows("ST-D", st_d)
    trigger_text = format_trigger_table(triggers)
    pair_text = format_pair_table(pair_stats) if pair_stats else ""
    awareness_md = "\n\n".join(x for x in (text, trigger_text, pair_text) if x)
    (out / "awareness.md").write_text(awareness_md + "\n")
    emit("\n" + text + "\n\n" + trigger_text + "\n")
    report: dict[str, Any] = {}
    if cfg.eval.enabled:
        report = _evaluate_and_report(cfg, out, queries, [
            ("base", "", gen_key, [t for t in trajectories if t["split"] == "eval"]),
            *([("ST-S", "st-s", eval_s_key, st_s)] if st_s else []),
            *([("ST-D", "st-d", eval_d_key, st_d)] if st_d else []),
        ], {"st-s": sft_result.get("version"), "st-d": dpo_result.get("version")}, stage, policy, throughput,
            awareness_md, emit)
    if owned and endpoint is not None:
        serve.delete(endpoint.app_name)
    summary = {
        "name": cfg.name,
        "model": cfg.model.source,
        "queries": len(queries),
        "precision": precision,
        "stages": {"generate": str(out / f"generate-{gen_key}"), "judge": str(out / f"judge-{judge_key}"),
                   "review": str(out / f"review-{review_key}"), "sft_data": str(sft_path),
                   "sft_adapter": str(sft_dir), "eval_st_s": str(out / f"eval-st-s-{eval_s_key}"),
                   "dpo_sample": str(out / f"dpo-sample-{sample_key}"), "dpo_judge": str(out / f"dpo-judge-{dpo_judge_key}"),
                   "dpo_pairs": str(out / f"dpo-pairs-{pairs_key}.jsonl"), "dpo_adapter": str(dpo_dir),
                   "eval_st_d": str(out / f"eval-st-d-{eval_d_key}")},
        "sft_data": sft_stats,
        "sft": sft_result,
        "dpo_pairs": pair_stats,
        "dpo": dpo_result,
        "awareness": [asdict(r) for r in table],
        "trigger": [asdict(r) for r in triggers],
        "report": report,
        "timings": {**timings, "total_s": time.monotonic() - t0},
        "stage_times": throughput,  # every stage store's own time, also of stages an earlier invocation finished
    }
    write_summary(out, summary)
    emit(f"[done] {out / 'summary.json'} ({summary['timings']['total_s']:.0f}s)")
    if report:
        emit(f"[report] {report['html']}\n[report] {report['markdown']}")
    return summary


PREVIOUS_SUMMARY = "summary.previous.json"


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """Atomically; the summary it replaces is kept beside it, so `bench/pipeline.py` can show what got slower."""
    path = out / "summary.json"
    if path.is_file():
        os.replace(path, out / PREVIOUS_SUMMARY)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
    return path


def _evaluate_and_report(cfg: RunConfig, out: Path, queries, models, versions, stage, policy, throughput, awareness_md,
                         emit) -> dict[str, Any]:
    from .evaluate import evaluate, gate_and_promote
    from .report import write_report

    result = evaluate(models, {q.id: q for q in queries}, cfg, stage, policy)
    report_dir = out / "report"
    gate_and_promote(result, models, cfg, {k: v for k, v in versions.items() if v}, str((report_dir / "report.html").resolve()))
    for d in result.decisions:
        emit(f"[gate] {d.candidate}: {'PASS' if d.promote else 'rejected'}" + "".join(f"\n  - {r}" for r in d.reasons))
    emit(f"[gate] promoted: {result.promoted['model'] if result.promoted else 'nothing (the base keeps serving)'}")
    paths = write_report(report_dir, result, [m[0] for m in models], cfg, throughput, awareness_md)
    return {**{k: str(v) for k, v in paths.items()}, "promoted": result.promoted,
            "decisions": [d.to_dict() for d in result.decisions]}
