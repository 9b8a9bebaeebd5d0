"""Gateway overhead: N concurrent streaming clients through the gateway vs straight to the policy replicas.

    .venv/bin/python bench/gateway.py --clients 8 --requests 6 --max-tokens 32

Both paths are measured in alternating rounds in one run (this machine is noisy), with greedy decoding and
`ignore_eos` so every response has exactly max_tokens tokens. Prints p50/p99 of the whole streamed response
and of the first token, throughput, and the p50 the gateway adds (target: <= 5 ms on top of generation).
"""

from __future__ import annotations

import argparse
import asyncio
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6, help="per client per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per path")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8441)
    args = ap.parse_args()

    from pipelines.run import init_ray, set_threads
    from safetrigger.config import load_config
    from services.gateway.auth import hash_key
    from services.gateway.config import GatewayConfig
    from services.gateway.deploy import start_gateway
    from services.policy import start_policy

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/embedded.yaml",
                      {"serving.http_port": args.port, "serving.adapter_root": str(tmp / "adapters"), "output_dir": str(tmp)})
    set_threads(1)
    init_ray(cfg)
    ep = start_policy(cfg)
    gw = GatewayConfig(policy_base_url=ep.base_url, keys=[{"id": "bench", "sha256": hash_key(KEY), "scopes": ["inference"],
                                                           "requests_per_minute": 1e6, "burst": 10_000, "max_concurrent": 1000}],
                       adapter_root=cfg.serving.adapter_root)
    prefix = start_gateway(gw)
    paths = {"direct": (ep.base_url + "/chat/completions", {}),
             "gateway": (f"http://127.0.0.1:{args.port}{prefix}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"})}
    asyncio.run(round_(*paths["direct"], 2, 1, 4))  # warm both paths
    asyncio.run(round_(*paths["gateway"], 2, 1, 4))
    res = {k: ([], [], 0.0) for k in paths}
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
    added = 1e3 * (pct(res["gateway"][0], 50) - pct(res["direct"][0], 50))
    added_ttft = 1e3 * (statistics.median(res["gateway"][1]) - statistics.median(res["direct"][1]))
    print(f"\ngateway adds p50 {added:+.1f} ms to the whole response and {added_ttft:+.1f} ms to the first token "
          f"(target <= 5 ms); throughput ratio gateway/direct {res['direct'][2] / res['gateway'][2]:.2f}")


if __name__ == "__main__":
    main()
