"""Stage 4, SFT data: trajectories + self-reviews -> chat-format prompt/completion examples (train split only).

Written as TRL prompt-completion JSONL (loss on the completion only): the prompt is the exact templated text
the policy saw, the completion the assistant turn as text (see `chat.prompt_completion_text`). Every dropped
example is counted by reason; nothing is truncated.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import SplitSource, query_messages, safe_position
from safetrigger.method.reasoning import THINK_OPEN, THINK_SOURCES
from safetrigger.method.sft import Drop, Target, check_length, general_target, unsafe_target

from .chat import chat_prompt_ids, load_tokenizer, prompt_completion_text

_THINK_SOURCES = {s.value for s in THINK_SOURCES}


def build_sft_examples(
    trajectories: list[dict[str, Any]], reviews: list[dict[str, Any]], cfg: RunConfig, model_path: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    tok = load_tokenizer(model_path)
    by_id = {r["query_id"]: r for r in reviews}
    examples, drops, kept, positions = [], Counter(), Counter(), Counter()

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for t in sorted(trajectories, key=lambda r: r["query_id"]):
        if t["split"] != "train":
            continue
        think = t["split_source"] in _THINK_SOURCES
        if t["label"] == "safe":
            target = general_target(t["reasoning"], t["answer"], think)
        elif t["query_id"] in by_id:
            target = unsafe_target(t["reasoning"], by_id[t["query_id"]]["review"], think,
                                   reasoning_complete=t["split_source"] != SplitSource.UNCLOSED_THINK.value)
        else:
            target = Target(None, Drop.MISSING_ANSWER, True)  # no review (prompt left no room for one)
        messages = query_messages(t["prompt"], cfg.model.system_prompt)
        prompt_tokens = len(chat_prompt_ids(tok, messages, cfg.model.chat_template_kwargs))
        target = check_length(target, prompt_tokens, count, cfg.sft_data.max_length)
        if target.completion is None:
            drops[f"{t['kind']}/{target.drop.value}"] += 1
            continue
        kept[t["kind"]] += 1
        prompt, completion = prompt_completion_text(tok, messages, target.completion, cfg.model.chat_template_kwargs)
        if target.tagged:  # the method puts the block after the reasoning: counted, so the report can show it
            positions[safe_position(completion, opened=prompt.rstrip().endswith(THINK_OPEN))] += 1
        examples.append({"query_id": t["query_id"], "kind": t["kind"], "tagged": target.tagged,
                         "prompt": prompt, "completion": completion})
    stats = {"kept": dict(kept), "dropped": dict(drops), "max_length": cfg.sft_data.max_length,
             "safe_position": dict(positions)}
    return examples, stats


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
