"""Stage 3, self-review: for unsafe training queries the policy sees the query with its own reasoning again and
writes its `<safe>` block and a new answer. The assistant turn is prefilled with the opening tag, so the
generated text starts inside the block; `safetrigger.method.sft` turns it into the SFT target.
"""

from __future__ import annotations

import json
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import review_messages, review_prefill, stable_hash
from services.policy import PolicyEndpoint

from .chat import chat_prompt_ids, load_tokenizer, truncate_tokens
from .generate import MIN_NEW_TOKENS
from .serve_batch import first_choice, run_through_policy
from .stage_store import StageStore


def needs_review(t: dict[str, Any]) -> bool:
    return t["label"] == "unsafe" and t["split"] == "train"


def plan_review_rows(trajectories: list[dict[str, Any]], cfg: RunConfig, model_path: str) -> list[dict[str, Any]]:
    tok = load_tokenizer(model_path)
    rows = []
    for t in trajectories:
        reasoning = truncate_tokens(tok, t["reasoning"], cfg.judge.max_reasoning_tokens)
        ids = chat_prompt_ids(tok, review_messages(t["prompt"], reasoning), cfg.model.chat_template_kwargs,
                              prefill=review_prefill())
        room = cfg.model.max_model_len - len(ids)
        if room < MIN_NEW_TOKENS:
            continue  # reported by the SFT data stage as a missing review
        rows.append({"query_id": t["query_id"], "prompt_ids": ids, "max_tokens": min(cfg.review.max_tokens, room)})
    return rows


class _Pre:
    def __init__(self, model: str, cfg: RunConfig) -> None:
        self.model, self.temperature, self.top_p, self.seed = model, cfg.review.temperature, cfg.generation.top_p, cfg.generation.seed

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": int(row["max_tokens"]),
                    "seed": (self.seed + stable_hash("review" + row["query_id"])) % 2**31}
        kwargs = {"model": self.model, "prompt": [int(i) for i in row["prompt_ids"]], **sampling}
        return {"query_id": row["query_id"], "sampling_json": json.dumps(sampling, sort_keys=True),
                "method": "completions", "dtype": "CompletionRequest", "request_kwargs": kwargs}


def _post(row: dict[str, Any]) -> dict[str, Any]:
    choice = first_choice(row)
    return {"query_id": row["query_id"], "review": choice["text"] or "",
            "finish_reason": str(choice.get("finish_reason") or ""),
            "completion_tokens": int((row.get("usage") or {}).get("completion_tokens") or 0),
            "sampling": row["sampling_json"]}


def run_review(
    trajectories: list[dict[str, Any]], endpoint: PolicyEndpoint, cfg: RunConfig, store: StageStore, adapter: str = ""
) -> list[dict[str, Any]]:
    todo = [t for t in trajectories if needs_review(t)]
    done = store.done_ids()
    rows = plan_review_rows([t for t in todo if t["query_id"] not in done], cfg, endpoint.model_path)
    model = endpoint.served_model(adapter)
    g = cfg.generation
    run_through_policy(rows, endpoint, _Pre(model, cfg), _post, store, "review", batch_size=g.batch_size,
                       concurrency=g.concurrency, chunk_rows=g.chunk_rows, total=len(todo))
    return store.read()
