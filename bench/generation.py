"""Generation throughput, side by side in one run: Serve + Ray Data vs vLLM in-process vs transformers.

The same N chat prompts, the same number of new tokens (EOS ignored so every path does equal work), in the
dtype the config resolves to on this CPU (`model.dtype: auto`), on the embedded model unless --config says
otherwise. Each path runs in its own subprocess, one after another, so none competes with another for the two
cores. Prints output tok/s and the ratios the spine issue targets: Serve+Data >= 3x transformers, and within
15% of vLLM in-process; and the decode speed with a LoRA adapter with our grouped CPU LoRA ops
(`services/vllm_cpu_lora.py`) versus vLLM's own; and in-process decoding with our inverse-CDF sampler
(`services/vllm_cpu_sampler.py`) versus vLLM's Gumbel-max one.

    .venv/bin/python bench/generation.py [--prompts 64] [--new-tokens 128] [--config configs/embedded.yaml]
    .venv/bin/python bench/generation.py --only serve vllm --set serving.engine_threads=1
    .venv/bin/python bench/generation.py --only serve vllm --repeats 3   # paths in turn; medians of the pairs
    .venv/bin/python bench/generation.py --only vllm vllm-native-sampler --seeded --prompts 256 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prompts(n: int) -> list[str]:
    from pipelines.datasets import load_all
    from safetrigger.config import load_config

    cfg = load_config(REPO / "configs" / "embedded.yaml")
    qs = [q.prompt for q in load_all(cfg.data) if len(q.prompt) < 600]
    return qs[:n]


def random_adapter(cfg, model_path: str, out: str) -> str:
    """An adapter of the configured SFT shape with non-zero weights (the decode cost does not depend on them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = cfg.sft.lora
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                     init_lora_weights=False)).save_pretrained(out)
    return out


def run_vllm(cfg, texts, new_tokens, adapter: bool = False, seeded: bool = False) -> dict:
    import tempfile

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from safetrigger.model_cache import resolve_model
    from services.policy import build_llm_config, cpu_engine_env

    os.environ.update({k: v for k, v in cpu_engine_env(cfg).items() if k != "LD_PRELOAD"})
    # Exactly the engine arguments the Serve replicas get (LoRA enabled included). The executor is vLLM's own CPU
    # default, its multiprocess one: its platform turns a requested "uni" into it (the replicas set it back after
    # that step: services/policy_server.py), and in-process it was the faster of the two here (256 prompts x 128
    # tokens, bf16, 2-core AVX512-BF16 EPYC, interleaved: 524.7 and 572.7 tok/s against 469.0 and 540.5 with
    # "uni" kept), so the baseline is vLLM at its best, not at the replicas' setting.
    engine_kwargs = dict(build_llm_config(cfg).engine_kwargs)
    llm = LLM(resolve_model(cfg.model.source), **engine_kwargs)
    g = cfg.generation
    sp = SamplingParams(max_tokens=new_tokens, temperature=g.temperature, top_p=g.top_p, ignore_eos=True)
    if seeded:  # a seed per request, as the main job's requests carry: vLLM then keeps a generator per request
        sp = [SamplingParams(max_tokens=new_tokens, temperature=g.temperature, top_p=g.top_p, ignore_eos=True, seed=i)
              for i in range(len(texts))]
    msgs = [[{"role": "user", "content": t}] for t in texts]
    lora = None
    if adapter:
        lora = LoRARequest("bench", 1, random_adapter(cfg, resolve_model(cfg.model.source), tempfile.mkdtemp()))
    llm.chat(msgs[:4], sp[:4] if seeded else sp, use_tqdm=False, lora_request=lora)  # warm-up
    t = time.perf_counter()
    out = llm.chat(msgs, sp, use_tqdm=False, lora_request=lora)
    dt = time.perf_counter() - t
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in out), "seconds": dt}


def run_serve(cfg, texts, new_tokens, seeded: bool = False) -> dict:
    import tempfile

    import ray

    from pipelines.runtime import init_ray
    from pipelines.serve_batch import run_through_policy
    from pipelines.stage_store import StageStore
    from services.policy import start_policy

    init_ray(cfg)
    ep = start_policy(cfg)
    rows = [{"query_id": str(i), "prompt": t} for i, t in enumerate(texts)]

    def pre(row):
        return {**row, "method": "chat", "dtype": "ChatCompletionRequest", "request_kwargs": {
            "model": ep.model_id, "messages": [{"role": "user", "content": row["prompt"]}],
            "max_tokens": new_tokens, "temperature": cfg.generation.temperature, "top_p": cfg.generation.top_p,
            "ignore_eos": True, **({"seed": int(row["query_id"])} if seeded else {})}}

    def post(row):
        return {"query_id": row["query_id"], "tokens": row["usage"]["completion_tokens"]}

    g = cfg.generation
    with tempfile.TemporaryDirectory() as d:
        run_through_policy(rows[:4], ep, pre, post, StageStore(Path(d) / "warm"), "warm-up",
                           batch_size=g.batch_size, concurrency=g.concurrency, chunk_rows=g.chunk_rows)
        store = StageStore(Path(d) / "bench")
        t = time.perf_counter()
        run_through_policy(rows, ep, pre, post, store, "bench", batch_size=len(rows), concurrency=1,
                           chunk_rows=len(rows))
        dt = time.perf_counter() - t
        tokens = sum(r["tokens"] for r in store.read())
    ray.shutdown()
    return {"tokens": tokens, "seconds": dt}


def run_transformers(cfg, texts, new_tokens, batch=8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetrigger.hardware import choose_dtype, this_cpu
    from safetrigger.model_cache import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model(cfg.model.source)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    # the dtype the engine paths serve in: bf16 here on an AVX2-only CPU would time its emulation, not transformers
    dtype = getattr(torch, choose_dtype(cfg.model.dtype, "cpu", this_cpu()).dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in texts]
    tokens, dt = 0, 0.0
    for i in range(0, len(chats), batch):
        enc = tok(chats[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                 temperature=cfg.generation.temperature, top_p=cfg.generation.top_p,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        dt += time.perf_counter() - t
        tokens += int((out[:, enc["input_ids"].shape[1] :] != -1).sum())
    return {"tokens": tokens, "seconds": dt}


def child(mode: str, args) -> None:
    from safetrigger.config import parse_overrides
    from safetrigger.config import load_config

    cfg = load_config(args.config, parse_overrides(args.set))
    texts = prompts(args.prompts)
    seeded = {"seeded": True} if args.seeded else {}
    fn = {"serve": lambda c, t, n: run_serve(c, t, n, **seeded), "vllm": lambda c, t, n: run_vllm(c, t, n, **seeded),
          "transformers": run_transformers,
          "vllm-lora": lambda c, t, n: run_vllm(c, t, n, adapter=True, **seeded),
          "vllm-lora-native": lambda c, t, n: run_vllm(c, t, n, adapter=True, **seeded),
          "vllm-lora-unmerged": lambda c, t, n: run_vllm(c, t, n, adapter=True, **seeded),
          "vllm-native-sampler": lambda c, t, n: run_vllm(c, t, n, **seeded)}[mode]
    result = fn(cfg, texts, args.new_tokens)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--prompts", str(args.prompts),
           "--new-tokens", str(args.new_tokens), "--config", args.config] + [f"--set={kv}" for kv in args.set] + (
        ["--seeded"] if args.seeded else [])
    env = dict(os.environ)
    if mode == "vllm-lora-native":  # vLLM's own per-token LoRA ops instead of our grouped ones
        env["SAFE_TRIGGER_NATIVE_LORA_OPS"] = "1"
    if mode == "vllm-lora-unmerged":  # our grouped ops on every step, no merged weight for one-adapter steps
        env["SAFE_TRIGGER_UNMERGED_LORA"] = "1"
    if mode == "vllm-native-sampler":  # vLLM's Gumbel-max sampler instead of our inverse-CDF one
        env["SAFE_TRIGGER_NATIVE_SAMPLER"] = "1"
    if mode.startswith("vllm"):
        from services.policy import preload_libraries

        env["LD_PRELOAD"] = ":".join(preload_libraries())
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{mode} failed (exit {proc.returncode})")
    r = json.loads(line[len("RESULT ") :])
    return {**r, "tok_s": r["tokens"] / r["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--config", default=str(REPO / "configs" / "embedded.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as in the CLI")
    modes = ["serve", "vllm", "transformers", "vllm-lora", "vllm-lora-native", "vllm-native-sampler",
             "vllm-lora-unmerged"]
    ap.add_argument("--only", choices=modes, nargs="+", help="these paths only, one after another in this run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each path, in turn; tok/s and ratios are medians (a single pair read 0.84 here)")
    ap.add_argument("--seeded", action="store_true",
                    help="a seed per request, as the main job's requests carry (not the transformers path)")
    ap.add_argument("--child", choices=modes)
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    from safetrigger.config import load_config, parse_overrides
    from safetrigger.hardware import choose_dtype, this_cpu

    cfg = load_config(args.config, parse_overrides(args.set))
    print(f"CPU: {this_cpu().describe()}; {choose_dtype(cfg.model.dtype, 'cpu', this_cpu()).dtype}; "
          f"{args.prompts} prompts x {args.new_tokens} tokens", flush=True)
    runs: dict[str, list[dict]] = {mode: [] for mode in args.only or modes}
    for repeat in range(args.repeats):
        for mode in runs:
            runs[mode].append(r := run_child(args, mode))
            print(f"{mode:>12}: {r['tokens']} tokens in {r['seconds']:.1f}s = {r['tok_s']:.1f} tok/s"
                  + (f" (run {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""), flush=True)
    results = {mode: {"tok_s": statistics.median(r["tok_s"] for r in rs)} for mode, rs in runs.items()}
    if "serve" in runs and "vllm" in runs:
        pairs = [s["tok_s"] / v["tok_s"] for s, v in zip(runs["serve"], runs["vllm"])]
        print(f"Serve+Data / vLLM in-process = {statistics.median(pairs):.2f} (target >= 0.85; "
              + (f"median of {len(pairs)} interleaved pairs: {' '.join(f'{x:.2f}' for x in pairs)})"
                 if len(pairs) > 1 else "side by side in this run)"))
    if "vllm" in runs and "vllm-native-sampler" in runs:
        pairs = [o["tok_s"] / n["tok_s"] for o, n in zip(runs["vllm"], runs["vllm-native-sampler"])]
        print(f"vLLM in-process, our inverse-CDF / vLLM's Gumbel-max sampler = {statistics.median(pairs):.2f}x "
              f"({' '.join(f'{x:.2f}' for x in pairs)})")
    if "vllm-lora" in runs and "vllm-lora-unmerged" in runs:
        pairs = [m["tok_s"] / u["tok_s"] for m, u in zip(runs["vllm-lora"], runs["vllm-lora-unmerged"])]
        print(f"vLLM in-process with one adapter, merged weights / unmerged LoRA ops = "
              f"{statistics.median(pairs):.2f}x ({' '.join(f'{x:.2f}' for x in pairs)})")
    if len(results) == len(modes):
        s, v, t, lo, ln, ns, lu = (results[m]["tok_s"] for m in modes)
        print(f"\n| path | output tok/s |\n|---|---:|\n| Serve + Ray Data | {s:.1f} |\n| vLLM in-process | {v:.1f} |"
              f"\n| transformers generate (batch 8) | {t:.1f} |\n| vLLM in-process, LoRA adapter, our grouped ops | {lo:.1f} |"
              f"\n| vLLM in-process, LoRA adapter, vLLM's per-token ops | {ln:.1f} |"
              f"\n| vLLM in-process, vLLM's Gumbel-max sampler | {ns:.1f} |"
              f"\n| vLLM in-process, LoRA adapter, our grouped ops unmerged | {lu:.1f} |")
        print(f"\nServe+Data / transformers = {s / t:.2f}x (target >= 3x)")
        print(f"LoRA decoding, grouped / per-token ops = {lo / ln:.2f}x")


if __name__ == "__main__":
    main()
