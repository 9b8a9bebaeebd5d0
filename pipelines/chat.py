"""Chat-template handling on the driver: token counts and exact prompt token ids.

The judge needs the exact tokens the model sees before its verdict, so it tokenizes here rather than letting
the server template the chat; the same template (including e.g. R1-Distill's prefilled `<think>\\n`) is used.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import Convention, ReasoningRule, convention_of, verdict_prefill
from safetrigger.method.prompts import Message


class PromptTooLongError(ValueError):
    pass


@lru_cache(maxsize=4)
def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def chat_prompt_ids(
    tokenizer: Any, messages: list[Message], template_kwargs: dict[str, Any] | None = None, prefill: str = ""
) -> list[int]:
    """Token ids of the templated chat ending in an open assistant turn, optionally prefilled with text."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return tokenizer(text + prefill, add_special_tokens=False)["input_ids"]


_CONVENTIONS: dict[tuple[int, str, str], Convention] = {}


def convention(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> Convention:
    """The reasoning convention of this tokenizer's template with these options, rendered once per process."""
    key = (id(tokenizer), getattr(tokenizer, "chat_template", None) or "", json.dumps(template_kwargs or {}, sort_keys=True))
    if key not in _CONVENTIONS:
        _CONVENTIONS[key] = convention_of(tokenizer, template_kwargs)
    return _CONVENTIONS[key]


def verdict_prompt_ids(tokenizer: Any, messages: list[Message], template_kwargs: dict[str, Any] | None = None,
                       prefill: str = "") -> list[int]:
    """Prompt ids whose next token is the one-word verdict: past an empty, closed think block and a cue for
    reasoning templates (see `safetrigger.method.thinking`), then `prefill`."""
    past = verdict_prefill(convention(tokenizer, template_kwargs))
    return chat_prompt_ids(tokenizer, messages, template_kwargs, prefill=past + prefill)


def reasoning_rule(cfg: RunConfig, model_path: str) -> ReasoningRule:
    """The configured split rule, told whether the policy's template opens the think block itself."""
    opened = convention(load_tokenizer(model_path), cfg.model.chat_template_kwargs) == "prefilled"
    return dataclasses.replace(cfg.model.reasoning.rule(), opened=opened)


def first_token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return ids[0]


def truncate_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """Keep the head of a long text: the judge and the review need the start of the reasoning most."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens]) + " …"


def prompt_completion_text(
    tokenizer: Any, messages: list[Message], completion: str, template_kwargs: dict[str, Any] | None = None
) -> tuple[str, str]:
    """Training text: the prompt exactly as the policy saw it (chat template, generation prompt and any prefill
    such as R1-Distill's `<think>\\n`) and the completion as plain text after it.

    Conversational records would be templated again by the trainer, and templates that strip `<think>` blocks
    from assistant turns (R1-Distill does) would silently drop the reasoning from every target.
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))
    if prompt.rstrip().endswith("<think>") and completion.lstrip().startswith("<think>"):
        completion = completion.lstrip()[len("<think>"):].lstrip("\n")
    return prompt, completion
