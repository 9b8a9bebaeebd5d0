"""An adapter's eval answers, with room for the `<safe>` block (`eval.block_room_tokens`).

The first pass is plain generation at `generation.max_tokens` into its own store (`<stage>.first`). Answers it
cut inside an open block are continued from where they stopped, by a completion from the exact prompt plus the
text so far (`<stage>.blocks`), and the stage's store gets the joined trajectories. Both passes resume from their
stores. Only answers cut inside the block get more tokens: the base never writes one, so this budgets the block
itself, not a longer answer.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from safetrigger.config import RunConfig
from safetrigger.method import Incomplete, Query, ReasoningRule, Trajectory, incomplete, query_messages, split_reasoning
from services.policy import PolicyEndpoint

from .chat import chat_prompt_ids, load_tokenizer, reasoning_rule
from .generate import MIN_NEW_TOKENS, run_generate
from .policy_recovery import Recovery
from .rows import Review
from .serve_batch import SampledCompletion, completion_row, run_through_policy
from .stage_store import StageStore, chunked


def run_eval_answers(queries: list[Query], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore,
                     adapter: str) -> list[Trajectory]:
    room = cfg.eval.block_room_tokens
    if room == 0:
        return run_generate(queries, endpoint, cfg, store, adapter=adapter)
    first = run_generate(queries, endpoint, cfg, StageStore(Path(f"{store.root}.first"), row=Trajectory), adapter=adapter)
    done = store.of(Trajectory).done_ids()
    rule = reasoning_rule(cfg, endpoint.model_path)
    todo = [t for t in first if t.query_id not in done]
    cut = [t for t in todo if cut_in_block(t, rule)]
    more = _continue(cut, endpoint, cfg, StageStore(Path(f"{store.root}.blocks"), row=Review), adapter, room)
    for chunk in chunked([join(t, more.get(t.query_id), rule) for t in todo], cfg.generation.chunk_rows):
        store.commit(chunk)
    return store.read()


def cut_in_block(t: Trajectory, rule: ReasoningRule) -> bool:
    return t.finish_reason == "length" and incomplete(t.response, rule) is Incomplete.SAFE_UNCLOSED


def join(t: Trajectory, more: Review | None, rule: ReasoningRule) -> Trajectory:
    """The trajectory with its continuation appended, split again; unchanged without one."""
    if more is None:
        return t
    response = t.response + more.review
    split = split_reasoning(response, rule)
    return replace(t, response=response, reasoning=split.reasoning, answer=split.answer, split_source=split.source.value,
                   completion_tokens=t.completion_tokens + more.completion_tokens, finish_reason=more.finish_reason)


def _continue(cut: list[Trajectory], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str,
              room: int) -> dict[str, Review]:
    tok = load_tokenizer(endpoint.model_path)
    have = store.done_ids()
    rows = []
    for t in cut:
        if t.query_id in have:
            continue
        ids = chat_prompt_ids(tok, query_messages(t.prompt, cfg.model.system_prompt), cfg.model.chat_template_kwargs,
                              prefill=t.response)
        left = cfg.model.max_model_len - len(ids)
        if left >= MIN_NEW_TOKENS:  # else it stays cut, and counted as incomplete
            rows.append({"query_id": t.query_id, "prompt_ids": ids, "max_tokens": min(room, left)})
    g = cfg.generation
    # sampled as the first pass was, seeded apart from it
    request = SampledCompletion(endpoint.served_model(adapter), {"temperature": g.temperature, "top_p": g.top_p}, g.seed,
                                "block-room")
    run_through_policy(rows, endpoint, request, completion_row, store,
                       "eval/block-room", batch_size=g.batch_size, concurrency=g.concurrency, fanout=g.fanout,
                       recovery=Recovery.of(g), chunk_rows=g.chunk_rows, total=len(cut))
    return {r.query_id: r for r in store.read()}

