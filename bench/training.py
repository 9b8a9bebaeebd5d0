"""Training throughput, side by side in one run: SFT and DPO through Ray Train versus plain TRL in one process.

Same data, same model, same trainer settings: Ray Train runs the very trainer builders the pipeline uses
(`build_sft_trainer`, `build_dpo_trainer`) inside `TorchTrainer` workers; the plain path calls them in this
process. Each path runs in its own subprocess, one after another, so none competes for the two cores.
Throughput is completion+prompt tokens (non-padding) per second of training (`train_runtime`); the wall time
including worker start-up and model loading is printed beside it. Target: Ray Train with one worker within 10%.

    .venv/bin/python bench/training.py [--run-dir runs/embedded] [--steps 8] [--workers 1 2] [--repeats 3]

With `--repeats N` the paths run N times in turn (plain, Ray x1, ..., plain, Ray x1, ...) and each ratio is the
median of the N side-by-side pairs: on these shared 2-core machines one pair of 8-step SFT runs gave Ray x1 / plain
0.87 and another 0.95 (AVX2 EPYC, same data, a day apart), so a single pair says little about a 10% target.

With `--beside-policy` each Ray Train path also runs beside the config's policy app, started as the main job
starts it and left idle (the main job trains beside its engine), and the ratio to the same path alone is printed.

Beside each run, `bench/cpu_share.py` samples every process's CPU time: the second table gives the cores the
trainer used while it computed and the cores all other processes took then, with the busiest of them (on 2 cores
the reason Ray Train x1 trails plain TRL, measured: see the README's stop 55).

Data: the newest SFT data and DPO pairs of a finished main run (`--run-dir`); the DPO policy starts from that
run's SFT adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cpu_share import CpuSampler, shares  # noqa: E402


def newest(run_dir: Path, pattern: str) -> Path:
    found = sorted(run_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {pattern} under {run_dir}: run the main job first (make run)")
    return found[-1]


def settings(cfg, kind: str, steps: int, workers: int, threads: int):
    s = getattr(cfg, kind)
    # each worker gets the cores it computes on: Ray then sets its OMP_NUM_THREADS to match
    return s.model_copy(update={"max_steps": steps, "num_workers": workers, "torch_threads": threads,
                                "cpus_per_worker": threads})


def loop_cfg(kind: str, cfg, s, run_dir: Path, model_path: str) -> dict:
    from pipelines.train.dpo import dpo_loop_config
    from pipelines.train.sft import sft_loop_config

    c = cfg.model_copy(update={kind: s})
    if kind == "sft":
        return sft_loop_config(newest(run_dir, "sft-data-*.jsonl"), model_path, c)
    adapter = next(p for p in sorted(run_dir.glob("sft-adapter-*")) if p.is_dir())
    return dpo_loop_config(newest(run_dir, "dpo-pairs-*.jsonl"), model_path, adapter, c)


def child(args) -> None:
    from safetrigger.config import parse_overrides
    from pipelines.runtime import set_threads
    from safetrigger.config import load_config
    from safetrigger.model_cache import resolve_model

    cfg = load_config(args.config, parse_overrides(args.set))
    model_path = resolve_model(cfg.model.source)
    workers = args.workers[0]
    threads = max(1, (os.cpu_count() or 2) // workers)
    set_threads(threads)
    s = settings(cfg, args.kind, args.steps, workers, threads)
    c = loop_cfg(args.kind, cfg, s, Path(args.run_dir), model_path)
    builder = "pipelines.train.sft:build_sft_trainer" if args.kind == "sft" else "pipelines.train.dpo:build_dpo_trainer"
    if args.path == BESIDE_POLICY:
        start_idle_policy(cfg)
    sampler = CpuSampler(include_self=args.path == "plain")
    sampler.start()
    t = time.perf_counter()
    if args.path == "plain":
        import importlib

        module, fn = builder.rsplit(":", 1)
        with tempfile.TemporaryDirectory() as scratch:
            trainer = getattr(importlib.import_module(module), fn)({**c, "scratch": scratch})
            out = trainer.train()
            metrics = {**out.metrics, "num_input_tokens_seen": trainer.state.num_input_tokens_seen}
    else:
        import ray

        from pipelines.train.ray_train import fit

        if not ray.is_initialized():
            ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as d:
            metrics = fit(builder, c, s, Path(d) / "adapter", f"bench-{args.kind}")["metrics"]
        if args.path == BESIDE_POLICY:
            from ray import serve

            serve.shutdown()
        ray.shutdown()
    wall = time.perf_counter() - t
    sampler.stop()
    where = shares(sampler, os.getpid() if args.path == "plain" else "ray::RayTrainWorker", threads)
    tokens = float(metrics.get("num_input_tokens_seen") or 0)
    runtime = float(metrics.get("train_runtime") or 0)
    import resource

    # this process's peak: the whole of a plain run; for Ray Train only the driver (workers are raylet's children)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("RESULT " + json.dumps({"tokens": tokens, "train_runtime": runtime, "wall": wall, "peak_rss_gb": peak_gb,
                                  "tok_s": tokens / runtime if runtime else 0.0, "cores": where}), flush=True)


BESIDE_POLICY = "ray+policy"


def start_idle_policy(cfg) -> None:
    """The config's policy app on Ray Serve, started the way the main job starts it and left idle: the main job's
    trainers compute beside it (its engine, replicas, proxy and Serve controller keep their cores' share)."""
    from pipelines.runtime import init_ray
    from services.policy import start_policy

    init_ray(cfg)
    start_policy(cfg)


def gemm_peak_gflops(threads: int, dtype: str = "float32", n: int = 1024, seconds: float = 2.0) -> float:
    """This CPU's matmul speed with `threads` threads: square GEMMs for about `seconds` (the roof training's share
    is measured against; more honest than a datasheet number on a shared or throttled machine)."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b  # warm-up
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t) / 1e9


def training_gflops(tokens_per_s: float, params: int) -> float:
    """Useful training FLOP/s of LoRA on a frozen base: forward 2N and backward ~2N per token (gradients flow
    through the frozen weights but are not kept for them; the adapter's own are small). Attention ignored."""
    return 4 * params * tokens_per_s / 1e9


def model_params(cfg) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from safetrigger.model_cache import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.source), dtype=torch.float32)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "embedded"))
    ap.add_argument("--config", default=str(REPO / "configs" / "embedded.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to run")
    ap.add_argument("--plain-only", action="store_true", help="only the single-process trainer (memory, settings)")
    ap.add_argument("--kinds", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    ap.add_argument("--repeats", type=int, default=1, help="runs of each path, in turn; ratios are medians of pairs")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--kind", choices=["sft", "dpo"])
    ap.add_argument("--beside-policy", action="store_true",
                    help="also each Ray Train path beside the config's idle policy app, as the main job trains")
    ap.add_argument("--path", choices=["plain", "ray", BESIDE_POLICY])
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows, cores, results_by_kind = [], [], {}
    for kind in args.kinds:
        paths = ["ray"] + ([BESIDE_POLICY] if args.beside_policy else [])
        plan = [("plain", 1)] + ([] if args.plain_only else [(p, w) for w in args.workers for p in paths])
        results: dict[tuple[str, int], list[dict]] = {p: [] for p in plan}
        for repeat in range(args.repeats):
            for path, workers in plan:
                results[(path, workers)].append(r := run_child(args, kind, path, workers))
                print(f"{kind:3} {path:5} workers={workers} (run {repeat + 1}/{args.repeats}): {r['tok_s']:7.1f} tok/s "
                      f"training, {r['train_runtime']:6.1f}s training, {r['wall']:6.1f}s wall"
                      + (f", peak RSS {r['peak_rss_gb']:.2f} GB" if path == "plain" else ""), flush=True)
        results_by_kind[kind] = results
        base = results[("plain", 1)]
        for (path, workers), runs in results.items():
            ratios = [r["tok_s"] / b["tok_s"] if b["tok_s"] else 0.0 for r, b in zip(runs, base)]
            rows.append((kind, f"{path} x{workers}", median([r["tok_s"] for r in runs]), median(ratios),
                         median([r["wall"] for r in runs]), ratios))
            cores.append((kind, f"{path} x{workers}", [r["cores"] for r in runs if r.get("cores")]))
    print("\n| stage | path | tokens/s (median) | vs plain TRL (median of pairs) | pairs | wall s |\n"
          "|---|---|---:|---:|---|---:|")
    for kind, path, tps, ratio, wall, ratios in rows:
        print(f"| {kind} | {path} | {tps:.1f} | {ratio:.2f} | {' '.join(f'{x:.2f}' for x in ratios)} | {wall:.0f} |")
    for kind, path, tps, ratio, _, ratios in rows:
        if path == "ray x1":
            verdict = "met" if ratio >= 0.9 else "NOT met"
            print(f"{kind}: Ray Train (1 worker) / plain TRL = {ratio:.2f}, median of {len(ratios)} pair(s) "
                  f"(target >= 0.90: {verdict})")
    print_beside_policy(results_by_kind)
    print_cores(cores)
    print_share_of_peak(rows, args)


def print_beside_policy(results_by_kind) -> None:
    """Each Ray Train path beside the idle policy app against the same path alone (medians of the run pairs)."""
    for kind, results in results_by_kind.items():
        for (path, workers), runs in results.items():
            alone = results.get(("ray", workers), [])
            if path == BESIDE_POLICY and alone:
                ratios = [r["tok_s"] / a["tok_s"] for r, a in zip(runs, alone) if a["tok_s"]]
                print(f"{kind}: Ray Train x{workers} beside the idle policy / alone = {median(ratios):.2f} "
                      f"(pairs {' '.join(f'{x:.2f}' for x in ratios)})")


def print_cores(cores) -> None:
    """Where the cores went while the trainer computed (bench/cpu_share.py), medians over the runs; the busiest
    other processes of the last run."""
    print("\n| stage | path | trainer's cores | other processes' cores | busiest others (last run) |\n"
          "|---|---|---:|---:|---|")
    for kind, path, runs in cores:
        if runs:
            top = ", ".join(f"{lab} {c:.3f}" for lab, c in runs[-1]["top_others"])
            print(f"| {kind} | {path} | {median([r['trainer_cores'] for r in runs]):.2f} | "
                  f"{median([r['other_cores'] for r in runs]):.2f} | {top} |")


def run_child(args, kind: str, path: str, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--path", path, "--workers", str(workers),
           "--steps", str(args.steps), "--run-dir", args.run_dir, "--config", args.config]
    cmd += [f"--set={kv}" for kv in args.set]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=allocator_env(args, kind))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{kind}/{path}/{workers} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else 0.0


def allocator_env(args, kind: str) -> dict[str, str]:
    """The child's environment: the plain trainer gets the allocator the Ray Train workers get
    (`TrainSettings.allocator`), so the two paths differ by Ray Train alone."""
    from safetrigger.config import load_config, parse_overrides
    from safetrigger.hardware import tcmalloc_library, with_preload

    settings = getattr(load_config(args.config, parse_overrides(args.set)), kind)
    library = tcmalloc_library() if settings.allocator == "tcmalloc" else None
    return with_preload(dict(os.environ), library, os.environ.get("LD_PRELOAD"))


def print_share_of_peak(rows, args) -> None:
    """Training's useful FLOP/s against the CPU's measured GEMM peak on all its cores, in the precision each
    stage trains in (bf16 autocast where the CPU has native bf16: its matmuls run at the bf16 peak, not fp32's)
    (target >= 35%)."""
    from safetrigger.config import load_config, parse_overrides
    from safetrigger.hardware import this_cpu, training_precision

    cfg = load_config(args.config, parse_overrides(args.set))
    cores = os.cpu_count() or 1
    cpu = this_cpu()
    peaks = {dtype: gemm_peak_gflops(cores, dtype) for dtype in ("float32", "bfloat16")}
    params = model_params(cfg)
    print(f"\nCPU: {cpu.describe()}; GEMM peak on {cores} threads: float32 {peaks['float32']:.1f}, "
          f"bfloat16 {peaks['bfloat16']:.1f} GFLOP/s; model {params / 1e6:.0f}M parameters")
    for kind, path, tps, *_ in rows:
        s = getattr(cfg, kind)
        dtype = training_precision(s.precision, s.use_gpu, cpu).dtype
        used = training_gflops(tps, params)
        print(f"{kind} {path}: {used:.1f} GFLOP/s = {100 * used / peaks[dtype]:.0f}% of the measured {dtype} peak "
              "(target >= 35%)")


if __name__ == "__main__":
    main()
