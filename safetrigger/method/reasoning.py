"""Splitting a response into reasoning (`think1`) and answer (`answer1`).

Reasoning models wrap their reasoning in `<think>…</think>`. Chat templates such as R1-Distill's prefill the
opening `<think>\\n` into the prompt, so the generated text then starts mid-reasoning and only the closing tag
appears. Models that emit no tags at all (the embedded SmolLM2) get an explicit, configurable rule: the leading
part of the response stands for the reasoning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_OPEN_RE = re.compile(r"<think>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"</think>", re.IGNORECASE)
_PARAGRAPH_RE = re.compile(r"\n\s*\n")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?:])\s+(?=\S)")


class Fallback(str, Enum):
    """What stands for the reasoning when the response has no think tags."""

    LEADING = "leading"  # the first paragraph(s), else the first sentence(s)
    NONE = "none"  # no reasoning: the whole response is the answer


class SplitSource(str, Enum):
    THINK_TAGS = "think_tags"
    PREFILLED_THINK = "prefilled_think"
    UNCLOSED_THINK = "unclosed_think"
    LEADING_PARAGRAPHS = "leading_paragraphs"
    LEADING_SENTENCES = "leading_sentences"
    NONE = "none"


# the splits that found think tags (the answer is what follows `</think>`)
THINK_SOURCES = (SplitSource.THINK_TAGS, SplitSource.PREFILLED_THINK, SplitSource.UNCLOSED_THINK)


@dataclass(frozen=True)
class ReasoningRule:
    fallback: Fallback = Fallback.LEADING
    leading_paragraphs: int = 1
    leading_sentences: int = 1
    # The chat template opens the think block (`thinking.Convention` "prefilled"): a response with no tag at all
    # is reasoning cut off before it closed, never an answer.
    opened: bool = False

    def __post_init__(self) -> None:
        if self.leading_paragraphs < 1 or self.leading_sentences < 1:
            raise ValueError("leading_paragraphs and leading_sentences must be >= 1")


@dataclass(frozen=True)
class Split:
    reasoning: str
    answer: str
    source: SplitSource

    @property
    def reasoning_complete(self) -> bool:
        """False when the reasoning was cut off before it closed (the answer is then missing too)."""
        return self.source is not SplitSource.UNCLOSED_THINK


def split_reasoning(text: str, rule: ReasoningRule = ReasoningRule()) -> Split:
    """Split a generated response. The rule applies only when no think tag occurs at all.

    - `<think>R</think>A`: reasoning R, answer A (text before `<think>` is dropped: templates put nothing there).
    - `R</think>A` (opening tag prefilled by the template): reasoning R, answer A.
    - `<think>R` never closed (cut off): reasoning R, empty answer, marked incomplete.
    - further think blocks inside the answer are removed from it, so the answer never carries reasoning;
    - no tag at all: reasoning cut off when the template opened the block (`rule.opened`), else the fallback.
    """
    closing = _CLOSE_RE.search(text)
    opening = _OPEN_RE.search(text)
    if closing is not None and (opening is None or opening.start() > closing.start()):
        return Split(text[: closing.start()].strip(), _strip_think(text[closing.end() :]), SplitSource.PREFILLED_THINK)
    if opening is not None:
        closing = _CLOSE_RE.search(text, opening.end())
        if closing is None:
            return Split(text[opening.end() :].strip(), "", SplitSource.UNCLOSED_THINK)
        reasoning = text[opening.end() : closing.start()].strip()
        return Split(reasoning, _strip_think(text[closing.end() :]), SplitSource.THINK_TAGS)
    if rule.opened:
        return Split(text.strip(), "", SplitSource.UNCLOSED_THINK)
    return _split_untagged(text.strip(), rule)


def _strip_think(text: str) -> str:
    """Remove later think blocks (closed or not) and stray tags from an answer."""
    text = re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.IGNORECASE | re.DOTALL)
    return _CLOSE_RE.sub("", text).strip()


def _split_untagged(text: str, rule: ReasoningRule) -> Split:
    if rule.fallback is Fallback.NONE or not text:
        return Split("", text, SplitSource.NONE)
    paragraphs = [p for p in _PARAGRAPH_RE.split(text) if p.strip()]
    if len(paragraphs) > rule.leading_paragraphs:
        head = paragraphs[: rule.leading_paragraphs]
        tail = paragraphs[rule.leading_paragraphs :]
        return Split("\n\n".join(p.strip() for p in head), "\n\n".join(p.strip() for p in tail), SplitSource.LEADING_PARAGRAPHS)
    sentences = _SENTENCE_END_RE.split(text)
    if len(sentences) > rule.leading_sentences:
        head = " ".join(sentences[: rule.leading_sentences]).strip()
        tail = " ".join(sentences[rule.leading_sentences :]).strip()
        return Split(head, tail, SplitSource.LEADING_SENTENCES)
    # One sentence: it is the answer; there is no separate reasoning to re-present.
    return Split("", text, SplitSource.NONE)


def join_reasoning(reasoning: str, answer: str, tagged: bool) -> str:
    """Inverse of the split, for building training targets in the model's own format."""
    if tagged:
        return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}".rstrip()
    if not reasoning:
        return answer
    return f"{reasoning}\n\n{answer}".rstrip()
