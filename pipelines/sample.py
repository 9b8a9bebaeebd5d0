"""Stage: DPO sampling. The SFT model (served hot as an adapter) answers each query of the held-apart `dpo`
split k times at high temperature (paper: 4), in one request per query (`n=k`, seeded per query).
"""

from __future__ import annotations

from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import Query
from services.policy import PolicyEndpoint

from .generate import ChatRequest, plan_requests
from .policy_recovery import Recovery
from .rows import SampleSet
from .serve_batch import PolicyRequestError, run_through_policy
from .stage_store import StageStore


class _Post:
    def __init__(self, n: int, adapter: str) -> None:
        self.n, self.adapter = n, adapter

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        choices = sorted(row.get("choices") or [], key=lambda c: c["index"])
        if len(choices) != self.n:
            raise PolicyRequestError(f"asked for {self.n} samples of {row['query_id']}, got {len(choices)}: {row.get('error')}")
        texts = []
        for c in choices:
            msg = c["message"]
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            texts.append(f"<think>{reasoning}</think>{msg['content'] or ''}" if reasoning else msg["content"] or "")
        usage = row.get("usage") or {}
        return {"query_id": row["query_id"], "kind": row["kind"], "label": row["label"], "split": row["split"],
                "prompt": row["prompt"], "samples": texts,
                "finish_reasons": [str(c.get("finish_reason") or "") for c in choices],
                "completion_tokens": int(usage.get("completion_tokens") or 0), "adapter": self.adapter,
                "sampling": row["sampling_json"]}


def sampling_window(batch_size: int, n: int) -> int:
    """Requests of `n` samples each kept in flight: twice what fills the engine's `batch_size` sequences. A request
    answers when its last sample ends; with exactly batch_size/n out, the slots of its samples that ended sooner
    stayed empty until then, and the engine queues the extra requests to fill them. DPO sampling of the embedded
    main job (167 queries x 4, AVX512-BF16 EPYC, one run each): its rows took 262 s at 16 requests, 241 s at 32."""
    return max(1, 2 * batch_size // n)


def run_sample(queries: list[Query], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str) -> list[SampleSet]:
    done = store.of(SampleSet).done_ids()
    rows = plan_requests([q for q in queries if q.id not in done], cfg, endpoint.model_path, max_tokens=cfg.dpo.max_tokens)
    g = cfg.generation
    d = cfg.dpo
    pre = ChatRequest(cfg, endpoint.served_model(adapter), {"n": d.num_samples, "temperature": d.temperature, "top_p": d.top_p},
                      d.seed, salt="dpo-sample")
    run_through_policy(rows, endpoint, pre, _Post(d.num_samples, adapter),
                       store, "dpo-sample", batch_size=sampling_window(g.batch_size, d.num_samples),
                       concurrency=g.concurrency, fanout=g.fanout,
                       recovery=Recovery.of(g), chunk_rows=g.chunk_rows, total=len(queries),
                       slow_tokens_per_s=g.slow_tokens_per_s)
    return store.read()
