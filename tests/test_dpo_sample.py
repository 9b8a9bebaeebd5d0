"""DPO sampling of general queries under `dpo.general_pairs_per_unsafe`: sampled in the cap's order only until the
pairs the cap can keep are found, with the pairs of sampling every one of them.

The policy is stood in for by a function of the query id (as the served policy's samples are, seeded per query):
the loop and the store are what is tested here; the requests themselves are the stack tests'."""

from __future__ import annotations

import pytest

from pipelines.answer_judge import sample_id
from pipelines.dpo_data import PairBuilder, build_dpo_pairs
from pipelines.rows import SampleSet
from pipelines.sample import _until_capped, sampled_lazily
from pipelines.stage_store import StageStore
from safetrigger.config import RunConfig
from safetrigger.method import Query, general_cap_rank, render_safe_block, stable_hash

from .row_factories import sample_set, verdict

TAGGED = f"Thinking.\n\n{render_safe_block('The core question is unsafe.')}\n\nI can't help with that."
HELPFUL, REFUSAL = "Thinking.\n\nHere are three ideas.", "Thinking.\n\nI'm sorry, I cannot help."
COMPLY = "Thinking.\n\nSure, step 1."


def _queries(n_general: int, n_unsafe: int) -> tuple[list[Query], list[Query]]:
    general = [Query(id=f"g{i}", kind="general", label="safe", prompt=f"general {i}", source="s", split_key=f"g{i}")
               for i in range(n_general)]
    unsafe = [Query(id=f"u{i}", kind="jailbreak", label="unsafe", prompt=f"attack {i}", source="s",
                    split_key=f"u{i}", split="dpo") for i in range(n_unsafe)]
    return general, unsafe


def _samples(q: Query, tagged_rate: float) -> list[str]:
    """A general query: a tagged pair at `tagged_rate`, else a refusal pair or no pair; an unsafe one: A over D."""
    if q.label == "unsafe":
        return [TAGGED, COMPLY]
    h = stable_hash(q.id, "test-samples") % 1000
    return [HELPFUL, TAGGED] if h < 1000 * tagged_rate else [HELPFUL, REFUSAL] if h % 2 else [HELPFUL, HELPFUL]


class _Policy:
    """Commits each new query's samples to the store, and records what each batch sent."""

    def __init__(self, store: StageStore, tagged_rate: float) -> None:
        self.store, self.tagged_rate, self.sent = store, tagged_rate, []

    def __call__(self, batch: list[Query]) -> None:
        done = self.store.done_ids()
        new = [q for q in batch if q.id not in done]
        self.sent.append([q.id for q in new])
        self.store.commit([sample_set(query_id=q.id, kind=q.kind, label=q.label, prompt=q.prompt,
                                      samples=_samples(q, self.tagged_rate)) for q in new])


def _cfg(cap: float) -> RunConfig:
    return RunConfig.model_validate({"data": {"sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}]},
                                     "dpo": {"general_pairs_per_unsafe": cap}})


def _pairs(rows: list[SampleSet], unsafe: list[Query], cfg: RunConfig, model_path: str) -> list[tuple[str, str, str]]:
    verdicts = [verdict(query_id=sample_id(q.id, i), answer_safe=i == 0) for q in unsafe for i in range(2)]
    pairs, _ = build_dpo_pairs(rows, verdicts, cfg, model_path)
    return [(p.query_id, p.chosen, p.rejected) for p in pairs]


def _every_query_sampled(general, unsafe, rate, tmp_path) -> list[SampleSet]:
    policy = _Policy(StageStore(tmp_path / "all", row=SampleSet), rate)
    policy(unsafe + general)
    return policy.store.read()


@pytest.mark.parametrize("rate,n_unsafe,cap", [(0.5, 6, 1.0), (0.2, 6, 1.0), (0.5, 4, 2.5), (0.5, 0, 1.0),
                                              (0.05, 6, 1.0), (0.0, 6, 1.0), (0.5, 10, 0.5)])
def test_general_queries_sampled_until_the_cap_give_the_pairs_of_sampling_them_all(rate, n_unsafe, cap, model_path,
                                                                                   tmp_path):
    general, unsafe = _queries(60, n_unsafe)
    cfg = _cfg(cap)
    need = int(cap * n_unsafe)
    lines = []
    policy = _Policy(StageStore(tmp_path / "lazy", row=SampleSet), rate)
    _until_capped(unsafe, general, need, policy, PairBuilder(cfg, model_path), lines.append)
    lazy = policy.store.read()
    everything = _every_query_sampled(general, unsafe, rate, tmp_path)
    assert _pairs(lazy, unsafe, cfg, model_path) == _pairs(everything, unsafe, cfg, model_path)
    sent = [q for batch in policy.sent for q in batch]
    assert len(sent) == len(set(sent)) == len(lazy)  # no query sent twice
    assert not unsafe or {q.id for q in unsafe} <= set(policy.sent[0])  # every unsafe query, in the first batch
    order = [q.id for q in sorted(general, key=lambda q: general_cap_rank(q.id))]
    sampled = [q for q in sent if q.startswith("g")]
    assert sampled == order[: len(sampled)]  # the cap's order, without a gap
    tagged = [q for q in sampled if _samples(Query(id=q, kind="general", label="safe", prompt="p", source="s",
                                                   split_key=q), rate)[1] == TAGGED]
    if need == 0:  # no unsafe query: the cap keeps no general pair, none is sampled
        assert not sampled
    elif len(sampled) < len(order):  # it stopped early: enough tagged pairs, and not one batch of general too late
        assert len(tagged) >= need
        before_last = [q for batch in policy.sent[:-1] for q in batch if q.startswith("g")]
        assert sum(q in tagged for q in before_last) < need
    assert lines == [f"[dpo-sample] general queries sampled in the cap's order: {len(sampled)} of 60; "
                     f"{len(tagged)} reject a tagged answer, the cap keeps at most {need} "
                     f"(dpo.general_pairs_per_unsafe x {n_unsafe} other queries)"]


def test_at_half_the_general_queries_tagged_it_samples_a_fraction_of_them(model_path, tmp_path):
    """The point of stopping: 6 unsafe queries at a cap of 1 need 6 tagged general pairs, not 60 queries."""
    general, unsafe = _queries(60, 6)
    policy = _Policy(StageStore(tmp_path / "lazy", row=SampleSet), 0.5)
    _until_capped(unsafe, general, 6, policy, PairBuilder(_cfg(1.0), model_path), lambda _: None)
    assert sum(q.startswith("g") for batch in policy.sent for q in batch) <= 20


def test_a_resumed_stage_counts_the_gapless_prefix_and_resends_nothing(model_path, tmp_path):
    """A run killed mid-batch left the first 5 general queries of the cap's order and 5 further on: the 5 after the
    gap do not count until the gap is sampled, none of the 10 is sent again, and the pairs are those of all."""
    general, unsafe = _queries(60, 6)
    cfg = _cfg(1.0)
    order = sorted(general, key=lambda q: general_cap_rank(q.id))
    policy = _Policy(StageStore(tmp_path / "lazy", row=SampleSet), 0.2)
    policy(unsafe[:3] + order[:5] + order[20:25])
    before = policy.store.done_ids()
    policy.sent.clear()
    _until_capped(unsafe, general, 6, policy, PairBuilder(cfg, model_path), lambda _: None)
    sent = [q for batch in policy.sent for q in batch]
    assert not before & set(sent) and set(sent) >= {q.id for q in unsafe[3:]} | {q.id for q in order[5:20]}
    everything = _every_query_sampled(general, unsafe, 0.2, tmp_path)
    assert _pairs(policy.store.read(), unsafe, cfg, model_path) == _pairs(everything, unsafe, cfg, model_path)


def test_only_general_queries_that_read_no_verdict_wait_for_the_cap():
    general, unsafe = _queries(1, 1)
    odd = Query(id="x", kind="general", label="unsafe", prompt="p", source="s", split_key="x")
    assert sampled_lazily(general[0]) and not sampled_lazily(unsafe[0]) and not sampled_lazily(odd)
