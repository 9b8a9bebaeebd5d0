"""Stage: DPO sampling. The SFT model (served hot as an adapter) answers each query of the held-apart `dpo`
split k times at high temperature (paper: 4), in one request per query (`n=k`, seeded per query). General queries
under a cap on their pairs are sampled only until the cap's pairs are found.
"""

from __future__ import annotations

import math
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import Query, general_cap_rank
from services.policy import PolicyEndpoint

from .dpo_data import PairBuilder
from .generate import ChatRequest, plan_requests
from .policy_recovery import Recovery
from .progress_log import say
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


def run_sample(queries: list[Query], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str,
               emit=say) -> list[SampleSet]:
    """Sample every query of the pool, except general queries under `dpo.general_pairs_per_unsafe`: those are
    sampled in the cap's order only until the pairs the cap can keep are found (`_until_capped`)."""
    cap = cfg.dpo.general_pairs_per_unsafe
    lazy = [q for q in queries if cap is not None and sampled_lazily(q)]
    sample = _Sampler(endpoint, cfg, store, adapter)
    if not lazy:
        sample(queries)
        return store.read()
    eager = [q for q in queries if not sampled_lazily(q)]
    _until_capped(eager, lazy, int(cap * len(eager)), sample, PairBuilder(cfg, endpoint.model_path), emit)
    return store.read()


def sampled_lazily(q: Query) -> bool:
    """A general query whose pair reads no verdict (`PairBuilder`): the sampler can tell, alone, what it yields."""
    return q.kind == "general" and q.label != "unsafe"


class _Sampler:
    """k samples per query of a batch, those not yet in the store, through the policy."""

    def __init__(self, endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str) -> None:
        self.endpoint, self.cfg, self.store, self.adapter = endpoint, cfg, store, adapter

    def __call__(self, batch: list[Query]) -> None:
        cfg, store, g, d = self.cfg, self.store, self.cfg.generation, self.cfg.dpo
        done = store.of(SampleSet).done_ids()
        rows = plan_requests([q for q in batch if q.id not in done], cfg, self.endpoint.model_path,
                             max_tokens=d.max_tokens)
        sampling = {"n": d.num_samples, "temperature": d.temperature, "top_p": d.top_p}
        pre = ChatRequest(cfg, self.endpoint.served_model(self.adapter), sampling, d.seed, salt="dpo-sample")
        run_through_policy(rows, self.endpoint, pre, _Post(d.num_samples, self.adapter),
                           store, "dpo-sample", batch_size=sampling_window(g.batch_size, d.num_samples),
                           concurrency=g.concurrency, fanout=g.fanout,
                           recovery=Recovery.of(g), chunk_rows=g.chunk_rows, total=len(done) + len(rows),
                           slow_tokens_per_s=g.slow_tokens_per_s)


def _until_capped(eager: list[Query], general: list[Query], need: int, sample: _Sampler, builder: PairBuilder,
                  emit) -> None:
    """Sample the `eager` queries and the `general` ones in the cap's order (`general_cap_rank`) until `need` of
    the latter yield a pair that rejects a tagged answer, or none are left.

    The pairs are those sampling every general query gives: the cap keeps the tagged-rejected pairs first, in
    that order, at most `need` of them (`need` = the cap times the unsafe queries, at least the unsafe pairs), and
    each query's samples are seeded by its id whatever else is sampled. Measured on the embedded main job: 64 of
    140 general queries had such a pair, 24 were kept beside 24 jailbreak pairs. A resumed run counts only the
    prefix of that order sampled without a gap."""
    order = sorted(general, key=lambda q: general_cap_rank(q.id))
    batch = eager + order[: 2 * need]  # a guess: about one in two general queries had such a pair (above)
    while True:
        if batch:
            sample(batch)
        rows = {r.query_id: r for r in sample.store.read()}
        sampled, found = _tagged_pairs_in_prefix(order, rows, builder)
        if found >= need or sampled == len(order):
            break
        # enough for what is missing at the rate seen so far, a quarter more, and never a batch that leaves the
        # engine mostly idle
        rate = found / sampled if found else 0.25
        batch = order[sampled: sampled + max(16, math.ceil(1.25 * (need - found) / rate))]
    emit(f"[dpo-sample] general queries sampled in the cap's order: {sampled} of {len(order)}; {found} reject a "
         f"tagged answer, the cap keeps at most {need} (dpo.general_pairs_per_unsafe x {len(eager)} other queries)")


def _tagged_pairs_in_prefix(order: list[Query], rows: dict[str, SampleSet], builder: PairBuilder) -> tuple[int, int]:
    """How many queries of `order` are sampled before the first that is not, and how many of those yield a pair
    whose rejected side is tagged (as `build_dpo_pairs` would keep it: not too long)."""
    found = 0
    for i, q in enumerate(order):
        if q.id not in rows:
            return i, found
        _, outcome = builder.build(rows[q.id], {})
        found += not isinstance(outcome, str) and outcome[0].rejected.tagged
    return len(order), found
