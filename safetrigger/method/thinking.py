"""Where a model reasons, and so where a verdict is read and where the `<safe>` block goes.

A chat template tells a model's reasoning convention by the generation prompt it renders:
- `prefilled`: the template opens the think block itself (DeepSeek-R1-Distill ends it with `<think>\\n`), so
  generated text starts mid-reasoning and only `</think>` appears;
- `emitted`: the model opens `<think>` itself (Qwen3 in thinking mode: the template mentions think tags but the
  generation prompt ends at the assistant header);
- `closed`: the template writes an empty, closed block (Qwen3 with `enable_thinking: false`): no reasoning;
- `none`: no think tags anywhere (SmolLM2-Instruct).

A verdict or a `<safe>` block belongs after the reasoning. Right after a prefilled `<think>\\n` (or where Qwen3
would open one) the next token starts reasoning, so the Yes/No options of a log-prob judge are often not even
in the top-k there. `past_reasoning` closes an empty think block in the model's own form, the one Qwen3's
template writes when thinking is off, and every judge, review and F_safe prompt is built on it.
"""

from __future__ import annotations

from typing import Any, Literal

from .reasoning import THINK_CLOSE, THINK_OPEN
from .tags import SAFE_OPEN

Convention = Literal["prefilled", "emitted", "closed", "none"]

_PROBE = [{"role": "user", "content": "Hello"}]


def detect_convention(generation_prompt: str, template: str) -> Convention:
    """The convention of a chat template, from the generation prompt it renders and its text."""
    tail = generation_prompt.rstrip()
    if tail.endswith(THINK_OPEN):
        return "prefilled"
    if tail.endswith(THINK_CLOSE):
        return "closed"
    if THINK_OPEN in template or THINK_CLOSE in template:
        return "emitted"
    return "none"


def convention_of(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> Convention:
    """The convention of a tokenizer's chat template with these template options (e.g. `enable_thinking`)."""
    prompt = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))
    return detect_convention(prompt, getattr(tokenizer, "chat_template", None) or "")


def past_reasoning(convention: Convention) -> str:
    """What follows the generation prompt so that the next token is the answer's first: an empty think block,
    closed (for `prefilled` only its closing half, since the template wrote the opening)."""
    if convention == "prefilled":
        return "\n" + THINK_CLOSE + "\n\n"
    if convention == "emitted":
        return THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"
    return ""


def review_prefill(convention: Convention = "none") -> str:
    """The self-review turn's prefill: the `<safe>` block opens after the reasoning, never inside it."""
    return past_reasoning(convention) + SAFE_OPEN + "\n"
