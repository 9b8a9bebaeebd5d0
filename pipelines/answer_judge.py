"""Stage: F_safe of the DPO reward, a verdict on the visible answer of every DPO sample.

`dpo.judge.type` picks the judge: the policy's own log-prob verdict (default; base weights), the same protocol
on another `ray.serve.llm` app in the cluster (a judge model), or refusal string-match. The model judges read
the log-probabilities of the two option tokens on exact prompt ids, calibrated by content-free inputs, as the
self-judge stage does.
"""

from __future__ import annotations

from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import answer_judge_messages, is_refusal, visible_answer
from services.policy import PolicyEndpoint

from .chat import chat_prompt_ids, load_tokenizer, truncate_tokens
from .judge import content_free_baseline, option_logprobs, option_token_ids, verdict_request
from .serve_batch import first_choice, run_through_policy
from .stage_store import StageStore

CONTENT_FREE_ANSWERS: tuple[tuple[str, str], ...] = (("N/A", "N/A"), ("", ""), ("[request]", "[response]"))


def sample_id(query_id: str, index: int) -> str:
    return f"{query_id}#{index}"


def judge_target(endpoint: PolicyEndpoint, cfg: RunConfig) -> PolicyEndpoint:
    j = cfg.dpo.judge
    if j.type == "deployment":
        return PolicyEndpoint(app_name=j.app_name, model_id=j.model_id, model_path=j.tokenizer, base_url=j.base_url)
    return endpoint


def answer_prompt_ids(tok: Any, cfg: RunConfig, query: str, answer: str) -> list[int]:
    j = cfg.dpo.judge
    answer = truncate_tokens(tok, answer, j.max_answer_tokens)
    ids = chat_prompt_ids(tok, answer_judge_messages(query, answer, j.options()), cfg.model.chat_template_kwargs)
    if len(ids) >= cfg.model.max_model_len:  # cut the request, never the question
        query = truncate_tokens(tok, query, max(64, cfg.model.max_model_len // 4))
        ids = chat_prompt_ids(tok, answer_judge_messages(query, answer, j.options()), cfg.model.chat_template_kwargs)
    return ids


class _Pre:
    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"query_id": row["query_id"], "method": "completions", "dtype": "CompletionRequest",
                "request_kwargs": verdict_request(self.model, row["prompt_ids"])}


class _Post:
    def __init__(self, unsafe_id: int, safe_id: int, baseline: float, threshold: float) -> None:
        self.unsafe_id, self.safe_id, self.baseline, self.threshold = unsafe_id, safe_id, baseline, threshold

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        lp_u, lp_s, resolved = option_logprobs(first_choice(row)["logprobs"]["top_logprobs"][0], self.unsafe_id, self.safe_id)
        margin = lp_u - lp_s - self.baseline
        return {"query_id": row["query_id"], "margin": margin, "answer_safe": not margin > self.threshold,
                "resolved": resolved}


def run_answer_judge(samples: list[dict[str, Any]], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore) -> list[dict[str, Any]]:
    """One row per sample (`<query_id>#<i>`) with `answer_safe`."""
    rule = cfg.model.reasoning.rule()
    answers = [(sample_id(s["query_id"], i), s["prompt"], visible_answer(text, rule))
               for s in samples for i, text in enumerate(s["samples"])]
    j = cfg.dpo.judge
    done = store.done_ids()
    if j.type == "refusal":
        store.commit([{"query_id": sid, "margin": 0.0, "answer_safe": is_refusal(a), "resolved": True}
                      for sid, _, a in answers if sid not in done])
        return store.read()
    target = judge_target(endpoint, cfg)
    tok = load_tokenizer(target.model_path)
    unsafe_id, safe_id = option_token_ids(tok, j.options())
    model = target.served_model("")
    baseline = 0.0
    if j.calibration == "content_free":
        free = [answer_prompt_ids(tok, cfg, q, a) for q, a in CONTENT_FREE_ANSWERS]
        baseline = content_free_baseline(target.base_url, model, free, unsafe_id, safe_id)
    rows = [{"query_id": sid, "prompt_ids": answer_prompt_ids(tok, cfg, q, a)} for sid, q, a in answers if sid not in done]
    g = cfg.generation
    run_through_policy(rows, target, _Pre(model), _Post(unsafe_id, safe_id, baseline, j.threshold), store, "dpo-judge",
                       batch_size=g.batch_size, concurrency=g.concurrency, chunk_rows=g.chunk_rows * 2, total=len(answers))
    return store.read()
