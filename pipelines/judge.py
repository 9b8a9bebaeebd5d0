"""Stage 2, self-judging (latent safety awareness).

Each query is re-presented with the policy's own reasoning and the policy is asked whether the request is
unsafe. The verdict compares the log-probabilities of the two option tokens at the start of the answer, read
from the top-k logprobs of a one-token completion on the exact templated prompt ids. An option outside the
top-k gets the k-th logprob as an upper bound and the row is marked unresolved. The margin is calibrated by
the margin of content-free inputs, measured on the same replicas before the stage runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import CONTENT_FREE_INPUTS, Judgement, Trajectory, VerdictOptions, final_answer, is_refusal, judge_messages, to_row
from services.policy import PolicyEndpoint

from .chat import first_token_id, load_tokenizer, truncate_tokens, verdict_prompt_ids
from .policy_recovery import Recovery
from .serve_batch import complete_by_handle, first_choice, run_through_policy
from .stage_store import StageStore

TOP_K = 20  # vLLM's default max_logprobs


def option_variants(tokenizer: Any, option: str) -> list[int]:
    """First-token ids of an option as a word may start: on its own (`Yes`) and after a space (` Yes`). Which one
    a model writes depends on what precedes it (after a cue such as `Answer:` it is the spaced one). A vocabulary
    that spells the space as a token of its own (SmolLM2 does for digits) has no spaced variant."""
    plain, spaced = first_token_id(tokenizer, option), first_token_id(tokenizer, " " + option.lstrip())
    return [plain] if not tokenizer.decode([spaced]).strip() else list(dict.fromkeys((plain, spaced)))


def option_token_ids(tokenizer: Any, opts: VerdictOptions) -> tuple[list[int], list[int]]:
    unsafe, safe = option_variants(tokenizer, opts.unsafe), option_variants(tokenizer, opts.safe)
    if set(unsafe) & set(safe):
        raise ValueError(f"judge options {opts.unsafe!r} and {opts.safe!r} start with the same token")
    return unsafe, safe


def judge_prompt_ids(tok: Any, cfg: RunConfig, query: str, reasoning: str) -> list[int]:
    reasoning = truncate_tokens(tok, reasoning, cfg.judge.max_reasoning_tokens)
    ids = verdict_prompt_ids(tok, judge_messages(query, reasoning, cfg.judge.options()), cfg.model.chat_template_kwargs)
    if len(ids) >= cfg.model.max_model_len:
        # Cut the query, never the question: the verdict options must stay next to the question.
        query = truncate_tokens(tok, query, max(64, cfg.model.max_model_len // 2))
        ids = verdict_prompt_ids(tok, judge_messages(query, reasoning, cfg.judge.options()), cfg.model.chat_template_kwargs)
    return ids


def plan_judge_rows(trajectories: list[Trajectory], cfg: RunConfig, model_path: str) -> list[dict[str, Any]]:
    tok = load_tokenizer(model_path)
    rows = []
    for t in trajectories:
        ids = judge_prompt_ids(tok, cfg, t.prompt, t.reasoning)
        rows.append({"query_id": t.query_id, "kind": t.kind, "label": t.label, "split": t.split,
                     "answer": t.answer, "source": t.source, "category": t.category,
                     "adapter": t.adapter, "prompt_ids": ids})
    return rows


def verdict_request(model: str, prompt_ids: list[int]) -> dict[str, Any]:
    return {"model": model, "prompt": [int(i) for i in prompt_ids], "max_tokens": 1, "temperature": 0.0,
            "logprobs": TOP_K, "return_tokens_as_token_ids": True}


def options_logprobs(top: dict[str, float | None], ids: list[list[int]]) -> tuple[list[float], bool]:
    """Log-probability of each option: over its token variants in the top-k (log-sum-exp); an option with none
    there gets the k-th value (an upper bound) and the verdict is marked unresolved."""
    # Ray Data stores the dicts of a batch as one Arrow struct: keys seen in other rows come back as None.
    top = {k: v for k, v in top.items() if v is not None}
    floor = min(top.values())
    out, resolved = [], True
    for variants in ids:
        present = [float(top[k]) for k in (f"token_id:{i}" for i in variants) if k in top]
        resolved &= bool(present)
        out.append(_logsumexp(present) if present else float(floor))
    return out, resolved


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def content_free_baselines(endpoint: PolicyEndpoint, model: str, prompts: list[list[int]], ids: list[int]) -> list[float]:
    """Mean option log-probabilities on content-free prompts, asked of the same deployment the rows go to."""
    answers = complete_by_handle(endpoint, [verdict_request(model, p) for p in prompts])
    per_prompt = [options_logprobs(first_choice(a)["logprobs"]["top_logprobs"][0], ids)[0] for a in answers]
    return [statistics.fmean(col) for col in zip(*per_prompt)]


class _Pre:
    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        kwargs = verdict_request(self.model, row["prompt_ids"])
        rest = {k: v for k, v in row.items() if k != "prompt_ids"}
        return {**rest, "method": "completions", "dtype": "CompletionRequest", "request_kwargs": kwargs}


class _Post:
    def __init__(self, unsafe_id: list[int], safe_id: list[int], baseline: float, threshold: float, model: str) -> None:
        self.unsafe_id, self.safe_id = unsafe_id, safe_id
        self.baseline, self.threshold, self.model = baseline, threshold, model

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        top = first_choice(row)["logprobs"]["top_logprobs"][0]
        (lp_unsafe, lp_safe), resolved = options_logprobs(top, [self.unsafe_id, self.safe_id])
        margin = lp_unsafe - lp_safe - self.baseline
        judgement = Judgement(
            query_id=row["query_id"], kind=row["kind"], label=row["label"], split=row["split"],
            logprob_unsafe=lp_unsafe, logprob_safe=lp_safe, baseline=self.baseline, margin=margin,
            verdict_unsafe=bool(margin > self.threshold),
            answer_refused=is_refusal(final_answer(row["answer"])),
            model=self.model, adapter=row["adapter"], source=row["source"], category=row["category"], resolved=resolved,
        )
        return to_row(judgement)


def run_judge(
    trajectories: list[Trajectory], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str = ""
) -> list[Judgement]:
    done = store.of(Judgement).done_ids()
    pending = [t for t in trajectories if t.query_id not in done]
    tok = load_tokenizer(endpoint.model_path)
    unsafe_id, safe_id = option_token_ids(tok, cfg.judge.options())
    rows = plan_judge_rows(pending, cfg, endpoint.model_path)
    model = endpoint.served_model(adapter)
    baseline = 0.0
    if cfg.judge.calibration == "content_free":
        free = [judge_prompt_ids(tok, cfg, q, r) for q, r in CONTENT_FREE_INPUTS]
        mean_unsafe, mean_safe = content_free_baselines(endpoint, model, free, [unsafe_id, safe_id])
        baseline = mean_unsafe - mean_safe
    g = cfg.generation
    post = _Post(unsafe_id, safe_id, baseline, cfg.judge.threshold, endpoint.model_id)
    run_through_policy(
        rows, endpoint, _Pre(model), post, store,
        "judge", batch_size=g.batch_size, concurrency=g.concurrency, fanout=g.fanout,
        recovery=Recovery.of(g), chunk_rows=g.chunk_rows, total=len(trajectories),
    )
    return store.read()
