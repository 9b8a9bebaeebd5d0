"""Stage 3, self-review: for unsafe training queries the policy sees the query with its own reasoning again and
writes its `<safe>` block and a new answer. The assistant turn is prefilled with the opening tag, so the
generated text starts inside the block; `safetrigger.method.sft` turns it into the SFT target.

Two modes (`review.mode`):
- `free`: one completion writes the whole block and the answer (the paper's setting, for capable models);
- `structured`: one round per part of the block, each cued and finished by the policy in one line, then the
  block is closed and a last round writes the answer. Each round commits to its own store, so a killed stage
  resumes in the round it was in.

`review.candidates` > 1 samples several reviews per query (structured: several answers after one block), each
a row of its own (`<query_id>#<i>`), for the SFT data stage to select from by their judges' verdicts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import (
    REVIEW_PART_CUES, SAFE_CLOSE, SAFE_OPEN, Judgement, Trajectory, part_opening, review_messages, review_prefill,
    structured_review_text,
)
from safetrigger.method.sft import candidate_id
from services.policy import PolicyEndpoint

from .chat import chat_prompt_ids, convention, load_tokenizer, truncate_tokens
from .generate import MIN_NEW_TOKENS
from .policy_recovery import Recovery
from .rows import Review
from .serve_batch import SampledCompletion, completion_row, run_through_policy
from .stage_store import StageStore, chunked


def needs_review(t: Trajectory) -> bool:
    return t.label == "unsafe" and t.split == "train"


def plan_review_rows(
    trajectories: list[Trajectory], cfg: RunConfig, model_path: str, written: dict[str, str] | None = None,
    max_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Requests continuing each review after the prefilled opening tag and what is `written` of it so far."""
    tok = load_tokenizer(model_path)
    rows = []
    for t in trajectories:
        reasoning = truncate_tokens(tok, t.reasoning, cfg.judge.max_reasoning_tokens)
        so_far = (written or {}).get(t.query_id, "")
        ids = chat_prompt_ids(tok, review_messages(t.prompt, reasoning), cfg.model.chat_template_kwargs,
                              prefill=review_prefill(convention(tok, cfg.model.chat_template_kwargs)) + so_far)
        room = cfg.model.max_model_len - len(ids)
        if room < MIN_NEW_TOKENS:
            continue  # reported by the SFT data stage as a missing review
        rows.append({"query_id": t.query_id, "prompt_ids": ids,
                     "max_tokens": min(max_tokens or cfg.review.max_tokens, room)})
    return rows


def _review_request(model: str, cfg: RunConfig, round_name: str = "", line: bool = False) -> SampledCompletion:
    temperature = cfg.review.temperature
    if round_name == "answer" and cfg.review.answer_temperature is not None:
        temperature = cfg.review.answer_temperature
    sampling: dict[str, Any] = {"temperature": temperature, "top_p": cfg.generation.top_p}
    if line:  # one line of the block: at least a word, stop at the line's end
        sampling.update(stop=["\n"], min_tokens=2)
    elif round_name:  # the answer after the closed block: a small model starts the block over
        sampling.update(stop=[SAFE_OPEN, SAFE_CLOSE])
    return SampledCompletion(model, sampling, cfg.generation.seed, "review" + round_name)


def flagged_queries(cfg: RunConfig, judgements: list[Judgement] | None) -> set[str]:
    """The queries whose self-judge verdict was unsafe, where the review opens its parts or answer."""
    if not cfg.review.reads_verdicts():
        return set()
    if judgements is None:
        raise ValueError("review.answer_opener or review.verdict_word is set but the review stage got no self-judge verdicts")
    return {j.query_id for j in judgements if j.verdict_unsafe}


def answer_openers(cfg: RunConfig, flagged: set[str]) -> dict[str, str]:
    """The answer opener of each flagged query (`review.answer_opener`), with the space the policy goes on after."""
    opener = cfg.review.answer_opener
    return {} if opener is None else {q: opener.strip() + " " for q in flagged}


def run_review(
    trajectories: list[Trajectory], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str = "",
    judgements: list[Judgement] | None = None,
) -> list[Review]:
    """One row per review candidate (`review.candidates`; id `candidate_id`), resuming from what the store holds.
    With `review.answer_opener`, the answers of queries the policy judged unsafe (`judgements`) start with it."""
    n = cfg.review.candidates
    todo = [t for t in trajectories if needs_review(t)]
    done = store.of(Review).done_ids()
    pending = [t for t in todo if any(candidate_id(t.query_id, i, n) not in done for i in range(n))]
    model = endpoint.served_model(adapter)
    g = cfg.generation
    if cfg.review.mode == "free":
        rows = plan_review_rows(_as_candidates(pending, n, done), cfg, endpoint.model_path)
        run_through_policy(rows, endpoint, _review_request(model, cfg), completion_row, store, "review", batch_size=g.batch_size,
                           concurrency=g.concurrency, fanout=g.fanout,
                           recovery=Recovery.of(g), chunk_rows=g.chunk_rows, total=len(todo) * n)
        return store.read()
    _structured(pending, endpoint, cfg, store, model, done, flagged_queries(cfg, judgements))
    return store.read()


def _as_candidates(trajectories: list[Trajectory], n: int, skip: set[str]) -> list[Trajectory]:
    """Each trajectory once per candidate still to write, under the candidate's id (its sampling seed differs)."""
    return [replace(t, query_id=cid) for t in trajectories for i in range(n)
            if (cid := candidate_id(t.query_id, i, n)) not in skip]


def _structured(pending, endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, model: str, done: set[str],
                flagged: set[str]) -> None:
    """The block's parts once per query, the yes/no ones of `flagged` queries started with `review.verdict_word`;
    then `review.candidates` answers after it, each its own row, a flagged query's started with its opener."""
    g, n = cfg.generation, cfg.review.candidates
    opened = answer_openers(cfg, flagged)
    rounds = Path(f"{store.root}.rounds")
    parts: dict[str, list[str]] = {t.query_id: [] for t in pending}
    tokens: dict[str, int] = {t.query_id: 0 for t in pending}
    for i in range(len(REVIEW_PART_CUES) + 1):
        line = i < len(REVIEW_PART_CUES)
        name = f"part{i + 1}" if line else "answer"
        rstore = StageStore(rounds / name, row=Review)
        live = [t for t in pending if t.query_id in parts]
        have = rstore.done_ids()
        opening = {q: part_opening(i, cfg.review.verdict_word, q in flagged) for q in parts}
        written = {q: structured_review_text(p, opening[q]) + ("" if line else opened.get(q, "")) for q, p in parts.items()}
        if line:
            asked = [t for t in live if t.query_id not in have]
        else:
            asked = _as_candidates(live, n, have)
            written = {candidate_id(q, j, n): w for q, w in written.items() for j in range(n)}
        rows = plan_review_rows(asked, cfg, endpoint.model_path, written,
                                max_tokens=cfg.review.part_max_tokens if line else cfg.review.max_tokens)
        run_through_policy(rows, endpoint, _review_request(model, cfg, name, line), completion_row, rstore, f"review/{name}",
                           batch_size=g.batch_size, concurrency=g.concurrency, fanout=g.fanout,
                           recovery=Recovery.of(g), chunk_rows=g.chunk_rows,
                           total=len(live) * (1 if line else n))
        results = {r.query_id: r for r in rstore.read()}
        if line:
            for q in list(parts):
                if q not in results:  # no room left in the context: the SFT data stage reports it missing
                    del parts[q]
                    continue
                tokens[q] += results[q].completion_tokens
                parts[q].append(f"{opening[q]}{results[q].review}")
            continue
        final = [replace(r, review=structured_review_text(parts[q]) + opened.get(q, "") + r.review,
                         completion_tokens=r.completion_tokens + (tokens[q] if j == 0 else 0))  # the block counted once
                 for q in parts for j in range(n)
                 if (cid := candidate_id(q, j, n)) not in done and (r := results.get(cid)) is not None]
        for chunk in chunked(final, g.chunk_rows):
            store.commit(chunk)
