"""The main job: load queries, start the policy service, self-generate, self-judge, summarise.

Each stage writes under a key derived from its inputs and config; a re-run skips finished stages and resumes a
stage that was killed halfway.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, namespace=cfg.ray.namespace,
                 log_to_driver=os.environ.get("SAFE_TRIGGER_RAY_LOGS", "0") == "1")


def _write_queries(out: Path, queries) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / "queries.parquet"
    tmp = out / ".queries.parquet.tmp"
    pq.write_table(pa.Table.from_pylist([asdict(q) for q in queries]), tmp)
    os.replace(tmp, path)
    return path


def run(cfg: RunConfig, emit=print, endpoint=None) -> dict[str, Any]:
    """Run the pipeline; with `endpoint` (a running policy service) it is used as is and left running."""
    from ray import serve

    from services.policy import start_policy
    from safetrigger.model_cache import resolve_model

    from .awareness import awareness_table, format_table
    from .datasets import load_all
    from .generate import run_generate
    from .judge import run_judge
    from .review import run_review
    from .sft_data import build_sft_examples, write_jsonl

    t0 = time.monotonic()
    set_threads(cfg.torch_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    queries = load_all(cfg.data)
    _write_queries(out, queries)
    counts: dict[str, int] = {}
    for q in queries:
        counts[f"{q.kind}/{q.split}"] = counts.get(f"{q.kind}/{q.split}", 0) + 1
    emit(f"[data] {len(queries)} queries: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))

    model_path = resolve_model(cfg.model.source)
    ids_key = stage_key(sorted(q.id for q in queries))
    gen_key = stage_key("generate", cfg.model.model_dump(), cfg.generation.model_dump(exclude={"batch_size", "concurrency", "chunk_rows"}), ids_key)
    judge_key = stage_key("judge", gen_key, cfg.judge.model_dump())
    review_key = stage_key("review", gen_key, cfg.review.model_dump(), cfg.judge.max_reasoning_tokens)
    gen_store = StageStore(out / f"generate-{gen_key}")
    judge_store = StageStore(out / f"judge-{judge_key}")
    review_store = StageStore(out / f"review-{review_key}")

    timings: dict[str, float] = {}
    owned = endpoint is None
    if owned and not (gen_store.done and judge_store.done and review_store.done):
        init_ray(cfg)
        t = time.monotonic()
        emit(f"[serve] starting policy {cfg.model.source} ({cfg.serving.num_replicas} replica(s), {cfg.serving.accelerator})")
        endpoint = start_policy(cfg, model_path)
        timings["serve_start_s"] = time.monotonic() - t
        emit(f"[serve] ready in {timings['serve_start_s']:.0f}s at {endpoint.base_url}")

    def stage(name: str, store: StageStore, key: str, work) -> list[dict[str, Any]]:
        if store.done:
            emit(f"[{name}] finished earlier: {store.root}")
            return store.read()
        t = time.monotonic()
        rows = work()
        timings[f"{name}_s"] = time.monotonic() - t
        tokens = sum(r.get("completion_tokens", 0) for r in rows)
        store.finish(stage=name, key=key, completion_tokens=tokens)
        emit(f"[{name}] {len(rows)} rows, {tokens} new tokens in {timings[f'{name}_s']:.0f}s")
        return rows

    trajectories = stage("generate", gen_store, gen_key, lambda: run_generate(queries, endpoint, cfg, gen_store))
    judgements = stage("judge", judge_store, judge_key, lambda: run_judge(trajectories, endpoint, cfg, judge_store))
    reviews = stage("review", review_store, review_key, lambda: run_review(trajectories, endpoint, cfg, review_store))

    if owned and endpoint is not None:
        serve.delete(endpoint.app_name)

    examples, sft_stats = build_sft_examples(trajectories, reviews, cfg, model_path)
    sft_path = out / f"sft-{stage_key('sft', review_key, cfg.sft_data.model_dump())}.jsonl"
    write_jsonl(sft_path, examples)
    emit(f"[sft-data] {len(examples)} examples -> {sft_path}; kept {sft_stats['kept']}, dropped {sft_stats['dropped']}")

    table = awareness_table(judgements)
    text = format_table(table, f"{cfg.model.source} (all splits)")
    (out / "awareness.md").write_text(text + "\n")
    emit("\n" + text + "\n")
    summary = {
        "name": cfg.name,
        "model": cfg.model.source,
        "queries": len(queries),
        "stages": {"generate": str(gen_store.root), "judge": str(judge_store.root), "review": str(review_store.root),
                   "sft_data": str(sft_path)},
        "sft_data": sft_stats,
        "awareness": [asdict(r) for r in table],
        "timings": {**timings, "total_s": time.monotonic() - t0},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    emit(f"[done] {out / 'summary.json'} ({summary['timings']['total_s']:.0f}s)")
    return summary
