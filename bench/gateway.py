"""Gateway overhead: N concurrent streaming clients through the gateway vs straight to the policy replicas.

    .venv/bin/python bench/gateway.py --clients 8 --requests 6 --max-tokens 32

Three paths in alternating rounds in one run (this machine is noisy), greedy decoding and `ignore_eos` so every
response has exactly max_tokens tokens:
- direct: the policy's own OpenAI ingress (Serve proxy -> ingress -> LLMServer);
- gateway: the gateway's default, the LLMServer by deployment handle (Serve proxy -> gateway -> LLMServer);
- gateway-http: the gateway calling the policy's ingress over HTTP, back through the proxy (the old design).
Prints p50/p99 of the whole streamed response and of the first token, throughput, the p50 each gateway path
adds (target: <= 5 ms on top of generation) and the gateway's own CPU time per request (its /metrics).
Concurrent p50s on a busy 2-core machine differ by +-100 ms run to run; `--paired N` adds one client taking
turns between the paths and reports the median paired difference, which resolves a few ms only where single
requests are steady (a GPU); on the 2-core CPU box its interval was still ~+-150 ms (40 pairs).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

KEY = "st-bench-key"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[float, float]:
    t = time.perf_counter()
    first = None
    async with client.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:") and '"content"' in line:
                first = time.perf_counter() - t
    return time.perf_counter() - t, first or float("nan")


async def round_(url: str, headers: dict, clients: int, requests: int, max_tokens: int) -> tuple[list[float], list[float], float]:
    body = {"model": "policy", "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    total, ttft = [], []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients * 2)) as client:
        async def worker():
            for _ in range(requests):
                a, b = await one(client, url, body, headers)
                total.append(a)
                ttft.append(b)

        t = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - t
    return total, ttft, wall


def own_work(metrics_url: str) -> tuple[float, int]:
    """(seconds, requests) of the gateway's own work so far, from its Prometheus histogram."""
    total, count = 0.0, 0
    for line in httpx.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith("safe_trigger_gateway_own_work_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("safe_trigger_gateway_own_work_seconds_count"):
            count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


def median_diff_ci(a: list[float], b: list[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of median(a) - median(b) (independent resamples of each path)."""
    rng = random.Random(seed)
    diffs = sorted(statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(samples))
    return diffs[int(0.025 * samples)], diffs[int(0.975 * samples) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6, help="per client per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per path")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8441)
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="also N sequential requests per path, one client, paths taking turns request by request, "
                         "compared pair by pair (median difference with a bootstrap interval)")
    args = ap.parse_args()

    from pipelines.runtime import init_ray, set_threads
    from safetrigger.config import load_config
    from services.gateway.auth import hash_key
    from services.gateway.config import GatewayConfig
    from services.gateway.deploy import pointed_at, start_gateway
    from services.policy import start_policy

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/embedded.yaml",
                      {"serving.http_port": args.port, "serving.adapter_root": str(tmp / "adapters"), "output_dir": str(tmp),
                       "serving.route_prefix": "/"})  # the direct path: the policy's own app, opened for the bench
    set_threads(1)
    init_ray(cfg)
    ep = start_policy(cfg)
    gw = pointed_at(GatewayConfig(keys=[{"id": "bench", "sha256": hash_key(KEY), "scopes": ["inference"],
                                         "requests_per_minute": 1e6, "burst": 10_000, "max_concurrent": 1000,
                                         "engine_fields": ["ignore_eos"]}],  # fixed-length responses
                                  adapter_root=cfg.serving.adapter_root), ep)
    by_handle = start_gateway(gw)
    over_http = start_gateway(gw.model_copy(update={"policy_via": "http"}), route_prefix="/gw-http",
                              name="gateway-http")
    auth = {"Authorization": f"Bearer {KEY}"}
    paths = {"direct": (ep.base_url + "/chat/completions", {}),
             "gateway": (f"http://127.0.0.1:{args.port}{by_handle}/v1/chat/completions", auth),
             "gateway-http": (f"http://127.0.0.1:{args.port}{over_http}/v1/chat/completions", auth)}
    for url, headers in paths.values():  # warm every path
        asyncio.run(round_(url, headers, 2, 1, 4))
    res = {k: ([], [], 0.0) for k in paths}
    metrics = {name: f"http://127.0.0.1:{args.port}/{name.replace('gateway', 'gw')}/metrics" for name in ("gateway", "gateway-http")}
    work_before = {name: own_work(url) for name, url in metrics.items()}
    for _ in range(args.rounds):
        for name, (url, headers) in paths.items():
            total, ttft, wall = asyncio.run(round_(url, headers, args.clients, args.requests, args.max_tokens))
            t0, f0, w0 = res[name]
            res[name] = (t0 + total, f0 + ttft, w0 + wall)
    n = args.clients * args.requests * args.rounds
    print(f"\n{args.clients} concurrent streaming clients, {n} requests per path, {args.max_tokens} tokens each\n")
    print("| path | p50 total ms | p99 total ms | p50 first token ms | p99 first token ms | requests/s | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (total, ttft, wall) in res.items():
        print(f"| {name} | {1e3 * pct(total, 50):.1f} | {1e3 * pct(total, 99):.1f} | {1e3 * pct(ttft, 50):.1f} | "
              f"{1e3 * pct(ttft, 99):.1f} | {n / wall:.2f} | {n * args.max_tokens / wall:.1f} |")
    print()
    for name in ("gateway", "gateway-http"):
        added = 1e3 * (statistics.median(res[name][0]) - statistics.median(res["direct"][0]))
        lo, hi = (1e3 * x for x in median_diff_ci(res[name][0], res["direct"][0]))
        added_ttft = 1e3 * (statistics.median(res[name][1]) - statistics.median(res["direct"][1]))
        (t1, c1), (t0, c0) = own_work(metrics[name]), work_before[name]
        print(f"{name} adds p50 {added:+.1f} ms [95% CI {lo:+.1f}, {hi:+.1f}] to the whole response, {added_ttft:+.1f} ms to "
              f"the first token; its own work {1e3 * (t1 - t0) / max(1, c1 - c0):.2f} ms per request "
              f"(target <= 5 ms); throughput ratio {name}/direct {res['direct'][2] / res[name][2]:.2f}")
    if args.paired:
        paired(paths, args.paired, args.max_tokens)

def paired(paths: dict, n: int, max_tokens: int) -> None:
    """One client, no concurrency: direct, gateway and gateway-http take turns, request by request, and each
    gateway request is compared with the direct request next to it."""
    async def run():
        out = {name: [] for name in paths}
        async with httpx.AsyncClient(timeout=600) as client:
            body = {"model": "policy", "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
            for i in range(n):
                order = list(paths) if i % 2 == 0 else list(reversed(paths))  # neither path always goes first
                for name in order:
                    url, headers = paths[name]
                    out[name].append((await one(client, url, body, headers))[0])
        return out

    out = asyncio.run(run())
    print(f"\npaired, one client, {n} requests per path: median total "
          + ", ".join(f"{k} {1e3 * statistics.median(v):.1f} ms" for k, v in out.items()))
    rng = random.Random(0)
    for name in ("gateway", "gateway-http"):
        diffs = [g - d for g, d in zip(out[name], out["direct"])]
        boot = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
        print(f"{name} adds {1e3 * statistics.median(diffs):+.1f} ms per request "
              f"[95% CI {1e3 * boot[50]:+.1f}, {1e3 * boot[1949]:+.1f}] (median of {n} paired differences)")


if __name__ == "__main__":
    main()
