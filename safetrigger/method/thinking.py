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


# What follows the closed think block of a verdict prompt. Measured on 12 demo prompts, Yes/No (either spelling)
# held 2% of the embedded think model's probability right after an empty `<think>\n\n</think>\n\n` (it goes on to
# answer as if asked a sum) and 28% after `Answer:`; the plain model holds 21% at the start of its turn.
VERDICT_CUE = "Answer:"


def verdict_prefill(convention: Convention) -> str:
    """Past the reasoning and cued for the one-word verdict; models with no think convention are asked at the
    start of their turn, as measured for the plain embedded model (safetrigger/method/prompts.py)."""
    return "" if convention == "none" else past_reasoning(convention) + VERDICT_CUE


def review_prefill(convention: Convention = "none") -> str:
    """The self-review turn's prefill: the `<safe>` block opens after the reasoning, never inside it."""
    return past_reasoning(convention) + SAFE_OPEN + "\n"


SafePosition = Literal["after_think", "not_after_think", "no_think", "none"]


def safe_position(text: str, opened: bool = False) -> SafePosition:
    """Where the first `<safe>` opens: after the reasoning's `</think>` (the method's place), before or inside the
    think block, in a response without one (`no_think`), or nowhere (`none`). `opened`: the template opened the
    block, so text before any `</think>` is reasoning."""
    low = text.lower()
    at = low.find(SAFE_OPEN)
    if at < 0:
        return "none"
    close = low.find(THINK_CLOSE)
    if close < 0:
        return "not_after_think" if opened or THINK_OPEN in low[:at] else "no_think"
    return "after_think" if at > close else "not_after_think"
