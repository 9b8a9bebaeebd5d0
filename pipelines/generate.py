"""Stage 1, self-generation: the policy answers every query; responses are split into reasoning and answer."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import Query, ReasoningRule, Trajectory, query_messages, split_reasoning, stable_hash, to_row
from services.policy import PolicyEndpoint

from .chat import PromptTooLongError, chat_prompt_ids, load_tokenizer, reasoning_rule
from .policy_recovery import Recovery
from .serve_batch import first_choice, run_through_policy
from .stage_store import StageStore

# Room the model needs to say anything at all; a prompt leaving less is rejected rather than cut.
MIN_NEW_TOKENS = 16


def plan_requests(queries: list[Query], cfg: RunConfig, model_path: str, max_tokens: int | None = None) -> list[dict[str, Any]]:
    """Rows for the processor, with per-row max_tokens fitted to the context; over-long prompts are errors."""
    tok = load_tokenizer(model_path)
    max_tokens = max_tokens or cfg.generation.max_tokens
    limit = cfg.model.max_model_len
    rows, too_long = [], []
    for q in queries:
        n = len(chat_prompt_ids(tok, query_messages(q.prompt, cfg.model.system_prompt), cfg.model.chat_template_kwargs))
        room = limit - n
        if room < MIN_NEW_TOKENS:
            too_long.append(f"{q.id} ({q.origin}): {n} prompt tokens")
            continue
        row = asdict(q)
        # The response dict is merged into the row: its own "id" (chatcmpl-…) would overwrite ours.
        row["query_id"] = row.pop("id")
        row["prompt_tokens_local"] = n
        row["max_tokens"] = min(max_tokens, room)
        rows.append(row)
    if too_long:
        raise PromptTooLongError(
            f"{len(too_long)} prompt(s) leave fewer than {MIN_NEW_TOKENS} tokens of the {limit}-token context "
            f"(model.max_model_len): " + "; ".join(too_long[:10]) + (" …" if len(too_long) > 10 else "")
        )
    return rows


class ChatRequest:
    """Picklable preprocess: a chat request per query, seeded per query (and `salt`) so re-runs reproduce."""

    def __init__(self, cfg: RunConfig, model: str, sampling: dict[str, Any], seed: int, salt: str = "") -> None:
        self.model, self.system = model, cfg.model.system_prompt
        self.template_kwargs = cfg.model.chat_template_kwargs
        self.sampling, self.seed, self.salt = sampling, seed, salt

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        sampling = {**self.sampling, "max_tokens": int(row["max_tokens"]),
                    "seed": (self.seed + stable_hash(self.salt + row["query_id"])) % 2**31}
        kwargs: dict[str, Any] = {"model": self.model, "messages": query_messages(row["prompt"], self.system), **sampling}
        if self.template_kwargs:
            kwargs["chat_template_kwargs"] = self.template_kwargs
        return {**row, "sampling_json": json.dumps(sampling, sort_keys=True), "method": "chat",
                "dtype": "ChatCompletionRequest", "request_kwargs": kwargs}


class _Post:
    def __init__(self, rule: ReasoningRule, model: str, adapter: str) -> None:
        self.rule, self.model, self.adapter = rule, model, adapter

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        choice = first_choice(row)
        text = choice["message"]["content"] or ""
        # Servers with a reasoning parser return the reasoning apart; put it back so one splitter sees all.
        reasoning_field = choice["message"].get("reasoning_content") or choice["message"].get("reasoning")
        if reasoning_field:
            text = f"<think>{reasoning_field}</think>{text}"
        split = split_reasoning(text, self.rule)
        usage = row.get("usage") or {}
        return to_row(
            Trajectory(
                query_id=row["query_id"], kind=row["kind"], label=row["label"], split=row["split"], prompt=row["prompt"],
                response=text, reasoning=split.reasoning, answer=split.answer, split_source=split.source.value,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason=str(choice.get("finish_reason") or ""), sampling=row["sampling_json"],
                model=self.model, adapter=self.adapter, category=row["category"], source=row["source"],
            )
        )


def run_generate(
    queries: list[Query], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str = ""
) -> list[Trajectory]:
    """Generate for every query the store does not hold yet; returns all trajectories of the stage."""
    done = store.of(Trajectory).done_ids()
    pending = [q for q in queries if q.id not in done]
    rows = plan_requests(pending, cfg, endpoint.model_path)
    model = endpoint.served_model(adapter)
    g = cfg.generation
    run_through_policy(
        rows, endpoint, ChatRequest(cfg, model, {"temperature": g.temperature, "top_p": g.top_p}, g.seed),
        _Post(reasoning_rule(cfg, endpoint.model_path), endpoint.model_id, adapter), store,
        "generate", batch_size=g.batch_size, concurrency=g.concurrency, fanout=g.fanout,
        recovery=Recovery.of(g), chunk_rows=g.chunk_rows, total=len(queries),
        slow_tokens_per_s=g.slow_tokens_per_s,
    )
    return store.read()
