"""The explicit `<safe>…</safe>` block: rendering and parsing.

The tag is plain text (never a new special token) so any tokenizer and any chat template carry it unchanged.
Parsing is deliberately strict about structure and lenient about case, because a small or freshly fine-tuned
model writes `<Safe>` as often as `<safe>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SAFE_OPEN = "<safe>"
SAFE_CLOSE = "</safe>"

_OPEN_RE = re.compile(r"<safe>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"</safe>", re.IGNORECASE)


@dataclass(frozen=True)
class SafeBlock:
    """What a response says about its own `<safe>` block.

    `triggered` means an opening tag occurs; `complete` means it is also closed and holds non-blank text.
    `answer` is the response with every block removed: the text a judge of the final answer must see.
    """

    triggered: bool
    complete: bool
    analysis: str
    before: str
    answer: str
    count: int


def render_safe_block(analysis: str) -> str:
    """Wrap the model's own safety analysis; refuses text that would break the block's structure."""
    text = analysis.strip()
    if not text:
        raise ValueError("a <safe> block needs non-empty analysis text")
    if _OPEN_RE.search(text) or _CLOSE_RE.search(text):
        raise ValueError("analysis text must not itself contain <safe> or </safe> tags")
    return f"{SAFE_OPEN}\n{text}\n{SAFE_CLOSE}"


def parse_safe(text: str) -> SafeBlock:
    """Find the first `<safe>` block; later blocks are stripped from the answer but not analysed.

    Rules (tested against adversarial strings):
    - a `</safe>` with no opening tag before it is ordinary text: the block did not fire;
    - an opening tag never closed (e.g. cut off by max_tokens) fires but is incomplete, and everything after
      it counts as analysis, so no half-written analysis leaks into the answer;
    - a nested opening tag inside the block is part of the analysis; the first closing tag ends the block.
    """
    stripped = strip_safe_blocks(text)
    answer = stripped.text.strip()
    opening = _OPEN_RE.search(text)
    if opening is None:
        return SafeBlock(False, False, "", text, answer, 0)
    before = text[: opening.start()]
    closing = _CLOSE_RE.search(text, opening.end())
    if closing is None:
        return SafeBlock(True, False, text[opening.end() :].strip(), before, answer, stripped.count)
    analysis = text[opening.end() : closing.start()].strip()
    return SafeBlock(True, bool(analysis), analysis, before, answer, stripped.count)


@dataclass(frozen=True)
class _Stripped:
    text: str
    count: int


def strip_safe_blocks(text: str) -> _Stripped:
    """Remove every `<safe>` block (and a trailing unclosed one); stray closing tags are left as text."""
    out: list[str] = []
    count = 0
    pos = 0
    while True:
        opening = _OPEN_RE.search(text, pos)
        if opening is None:
            out.append(text[pos:])
            break
        out.append(text[pos : opening.start()])
        count += 1
        closing = _CLOSE_RE.search(text, opening.end())
        if closing is None:
            break
        pos = closing.end()
    return _Stripped("".join(out), count)


def final_answer(text: str) -> str:
    """The part of an answer a safety judge sees: never the `<safe>` analysis."""
    return parse_safe(text).answer
