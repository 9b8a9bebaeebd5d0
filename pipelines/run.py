"""The main job: load queries, start the policy service, self-generate, self-judge, self-review, build the SFT
data, train ST-S on Ray Train, serve it hot and measure how often `<safe>` fires for base and ST-S.

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


def with_adapter_root(cfg: RunConfig) -> RunConfig:
    """The replicas need to know the adapter registry before they start; default: under the run's output."""
    if cfg.serving.adapter_root:
        return cfg
    root = str(Path(cfg.output_dir).resolve() / "adapters")
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"adapter_root": root})})


def _train_st_s(cfg, sft_path, n_examples, model_path, adapter_dir, sft_key, timings, emit) -> dict[str, Any]:
    """SFT on Ray Train, then publish the adapter as `st-s` so the running replicas serve it hot."""
    from services import adapters

    from .train.sft import train_sft

    sft_meta = adapter_dir.parent / f"{adapter_dir.name}.json"
    if sft_meta.is_file():
        emit(f"[sft] finished earlier: {adapter_dir}")
        return json.loads(sft_meta.read_text())
    init_ray(cfg)
    t = time.monotonic()
    emit(f"[sft] training ST-S on {n_examples} examples with {cfg.sft.num_workers} Ray Train worker(s)")
    result = train_sft(sft_path, model_path, adapter_dir, cfg, name=f"sft-{sft_key}")
    timings["sft_s"] = time.monotonic() - t
    result["version"] = adapters.publish(cfg.serving.adapter_root, "st-s", adapter_dir)
    sft_meta.write_text(json.dumps(result, indent=2, default=str))
    m = result["metrics"]
    emit(f"[sft] loss {m.get('train_loss', m.get('loss'))}, {m.get('train_tokens_per_second', 0):.0f} tokens/s, "
         f"{timings['sft_s']:.0f}s; published st-s v{result['version']}")
    return result


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
    from .trigger import format_trigger_table, trigger_rows

    t0 = time.monotonic()
    cfg = with_adapter_root(cfg)
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
    sft_key = stage_key("sft", review_key, cfg.sft_data.model_dump(), cfg.sft.model_dump())
    eval_key = stage_key("eval-st-s", sft_key, gen_key)

    timings: dict[str, float] = {}
    owned = endpoint is None

    def policy():
        nonlocal endpoint
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
            return store.read()
        t = time.monotonic()
        rows = work(store)
        timings[f"{name}_s"] = time.monotonic() - t
        tokens = sum(r.get("completion_tokens", 0) for r in rows)
        store.finish(stage=name, key=key, completion_tokens=tokens)
        emit(f"[{name}] {len(rows)} rows, {tokens} new tokens in {timings[f'{name}_s']:.0f}s")
        return rows

    trajectories = stage("generate", gen_key, lambda st: run_generate(queries, policy(), cfg, st))
    judgements = stage("judge", judge_key, lambda st: run_judge(trajectories, policy(), cfg, st))
    reviews = stage("review", review_key, lambda st: run_review(trajectories, policy(), cfg, st))

    examples, sft_stats = build_sft_examples(trajectories, reviews, cfg, model_path)
    sft_path = out / f"sft-data-{stage_key(review_key, cfg.sft_data.model_dump())}.jsonl"
    write_jsonl(sft_path, examples)
    emit(f"[sft-data] {len(examples)} examples -> {sft_path}; kept {sft_stats['kept']}, dropped {sft_stats['dropped']}")

    adapter_dir = out / f"sft-adapter-{sft_key}"
    sft_result: dict[str, Any] = {}
    st_s: list[dict[str, Any]] = []
    if cfg.sft.enabled:
        sft_result = _train_st_s(cfg, sft_path, len(examples), model_path, adapter_dir, sft_key, timings, emit)
        eval_queries = [q for q in queries if q.split == "eval"]
        st_s = stage("eval-st-s", eval_key, lambda st: run_generate(eval_queries, policy(), cfg, st, adapter="st-s"))

    if owned and endpoint is not None:
        serve.delete(endpoint.app_name)

    table = awareness_table(judgements)
    text = format_table(table, f"{cfg.model.source} (all splits)")
    triggers = trigger_rows("base", [t for t in trajectories if t["split"] == "eval"])
    triggers += trigger_rows("ST-S", st_s) if cfg.sft.enabled else []
    trigger_text = format_trigger_table(triggers)
    (out / "awareness.md").write_text(text + "\n\n" + trigger_text + "\n")
    emit("\n" + text + "\n\n" + trigger_text + "\n")
    summary = {
        "name": cfg.name,
        "model": cfg.model.source,
        "queries": len(queries),
        "stages": {"generate": str(out / f"generate-{gen_key}"), "judge": str(out / f"judge-{judge_key}"),
                   "review": str(out / f"review-{review_key}"), "sft_data": str(sft_path),
                   "sft_adapter": str(adapter_dir), "eval_st_s": str(out / f"eval-st-s-{eval_key}")},
        "sft_data": sft_stats,
        "sft": sft_result,
        "awareness": [asdict(r) for r in table],
        "trigger": [asdict(r) for r in triggers],
        "timings": {**timings, "total_s": time.monotonic() - t0},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    emit(f"[done] {out / 'summary.json'} ({summary['timings']['total_s']:.0f}s)")
    return summary
