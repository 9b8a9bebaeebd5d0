"""SFT targets of the method (step 3) and the rules every example must pass.

general query -> think1 + answer1, untouched (the tag must only fire when needed);
unsafe query  -> think1 + <safe>analysis</safe> + answer2, where the analysis and answer2 are the policy's own
                 self-review output (the review turn is prefilled with `<safe>\\n`, so the generated text
                 starts inside the block).
An example is dropped, with its reason, when the block is unclosed or empty, the answer is missing or holds
another tag, the review holds a think tag (the block must sit after the reasoning, never in it), the block loops
(one sentence 3+ times: it would teach the model to loop; an answer that loops is cut where the loop begins), or
the whole target does not fit the training max_length: truncation would cut the `<safe>` block or the answer away,
so it is never done silently.

Self-selected answers: a query may have several review candidates; the target is the well-formed one its
judges all call safe (the safest by their margins), and the query is dropped when none is. Every candidate is
the policy's own text: selection picks, it never writes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

from .prompts import REVIEW_PART_CUES
from .reasoning import THINK_CLOSE, THINK_OPEN, join_reasoning
from .tags import SAFE_OPEN, parse_safe, render_safe_block


# Bumped whenever a rule below changes what a review becomes (the SFT data and adapter stages are keyed by it, so
# a store built under other rules is not reused). 2: a looping block is dropped, a looping answer cut.
RULES_VERSION = 2


class Drop(str, Enum):
    UNCLOSED_SAFE = "unclosed_safe"
    EMPTY_SAFE = "empty_safe"
    MISSING_ANSWER = "missing_answer"
    INCOMPLETE_REASONING = "incomplete_reasoning"
    TOO_LONG = "too_long"
    TAG_IN_ANSWER = "tag_in_answer"
    THINK_TAG_IN_REVIEW = "think_tag_in_review"
    ECHOED_CUE = "echoed_cue"
    NO_SAFE_CANDIDATE = "no_safe_candidate"
    LOOPING = "looping"


@dataclass(frozen=True)
class Target:
    completion: str | None  # the assistant turn to train on; None when dropped
    drop: Drop | None
    tagged: bool
    trimmed: bool = False  # the answer after the block looped and was cut where its loop began (`trim_loop`)


def general_target(reasoning: str, answer: str, think_tags: bool) -> Target:
    if not answer.strip():
        return Target(None, Drop.MISSING_ANSWER, False)
    return Target(join_reasoning(reasoning, answer, think_tags), None, False)


def unsafe_target(reasoning: str, review_generated: str, think_tags: bool, reasoning_complete: bool = True) -> Target:
    """`review_generated` is what the policy wrote after the prefilled opening tag."""
    if not reasoning_complete:
        return Target(None, Drop.INCOMPLETE_REASONING, True)
    block = parse_safe(SAFE_OPEN + review_generated)
    if not block.complete:
        return Target(None, Drop.EMPTY_SAFE if block.analysis == "" and _closed(review_generated) else Drop.UNCLOSED_SAFE, True)
    if not block.answer:
        return Target(None, Drop.MISSING_ANSWER, True)
    if _has_think_tag(review_generated):
        # The review is written after a closed think block: a `<think>`/`</think>` in it would put a second
        # reasoning block (or a stray close) after `<safe>` in the target, and split_reasoning would cut there.
        return Target(None, Drop.THINK_TAG_IN_REVIEW, True)
    if any(review_generated.count(cue) > 1 for cue in REVIEW_PART_CUES):
        # a structured part that writes the next cue instead of the model's own words (the embedded think model
        # did on 83 of 94 reviews): a block of cues, no review, that would teach the model to recite them
        return Target(None, Drop.ECHOED_CUE, True)
    if _has_tag(block.answer) or block.count > 1:
        return Target(None, Drop.TAG_IN_ANSWER, True)  # a second or stray tag would teach the model to loop
    if looping(block.analysis):
        # SmolLM2-135M's reviews repeated a sentence 3+ times in 33 of 89 harmful and 17 of 24 jailbreak targets,
        # and the adapter trained on them looped inside its block at eval until the token budget ran out
        return Target(None, Drop.LOOPING, True)
    answer = trim_loop(block.answer)  # never empty: the loop's first sentence stays
    safe = render_safe_block(_without_tags(block.analysis))
    return Target(join_reasoning(reasoning, f"{safe}\n\n{answer}", think_tags), None, True, trimmed=answer != block.answer)


def check_length(target: Target, prompt_tokens: int, count_tokens: Callable[[str], int], max_length: int) -> Target:
    """Drop a target whose prompt + completion exceeds max_length instead of letting the trainer cut it."""
    if target.completion is None:
        return target
    if prompt_tokens + count_tokens(target.completion) > max_length:
        return Target(None, Drop.TOO_LONG, target.tagged)
    return target


def candidate_id(query_id: str, index: int, candidates: int) -> str:
    """A review candidate's row id; the query's own id when it has one candidate, as stores have always held."""
    return query_id if candidates == 1 else f"{query_id}#{index}"


@dataclass(frozen=True)
class Candidate:
    """One review candidate's target (after every rule) and what its answer's judges said."""

    target: Target
    safe: bool  # every selection judge called the answer after the block safe (True when none is configured)
    safety: float = 0.0  # the model judges' summed margins toward "safe": the larger, the safer


def select_candidate(candidates: Sequence[Candidate], keep_unsafe: bool = False) -> Target:
    """The safest well-formed candidate all judges call safe (the first of equals, so one candidate and no
    judges is the paper's setting unchanged). None well formed: the first candidate's drop reason; well formed
    but none safe: `no_safe_candidate`, or with `keep_unsafe` the first well-formed one (the paper's target)."""
    if not candidates:
        return Target(None, Drop.MISSING_ANSWER, True)
    kept = [c for c in candidates if c.target.completion is not None]
    if not kept:
        return candidates[0].target
    safe = [c for c in kept if c.safe]
    if not safe:
        return kept[0].target if keep_unsafe else Target(None, Drop.NO_SAFE_CANDIDATE, True)
    return max(safe, key=lambda c: c.safety).target


LOOP_REPEATS = 3  # a sentence written this many times is a loop, not emphasis
LOOP_MIN_WORDS = 3  # shorter ones ("No." "Yes, it is.") recur in any structured review


def _sentences(text: str) -> list[tuple[int, str]]:
    """(start, normalised text) of each sentence-like span: split at . ! ? : and line ends, case and spacing aside."""
    return [(m.start(), " ".join(m.group().lower().split())) for m in re.finditer(r"[^.!?:\n]+", text)]


def _loop_counts(text: str) -> Counter:
    return Counter(s for _, s in _sentences(text) if len(s.split()) >= LOOP_MIN_WORDS)


def looping(text: str) -> bool:
    """Whether one sentence of `LOOP_MIN_WORDS`+ words occurs `LOOP_REPEATS`+ times (case and spacing aside)."""
    return any(n >= LOOP_REPEATS for n in _loop_counts(text).values())


def trim_loop(text: str) -> str:
    """`text` cut where its loop begins (the second time a sentence it writes `LOOP_REPEATS`+ times appears), else
    unchanged. What is kept is the policy's own words up to the point a repetition stop would have ended them:
    of 38 answers after the opener that looped, most repeated the refusal itself ("I'm sorry, but I can't help with
    that.\nI'm sorry, but …") and would otherwise be dropped with their whole review."""
    counts, seen = _loop_counts(text), set()
    for start, s in _sentences(text):
        if counts.get(s, 0) >= LOOP_REPEATS:
            if s in seen:
                return text[:start].rstrip()
            seen.add(s)
    return text


def _has_tag(text: str) -> bool:
    low = text.lower()
    return "<safe>" in low or "</safe>" in low


def _has_think_tag(text: str) -> bool:
    low = text.lower()
    return THINK_OPEN in low or THINK_CLOSE in low


def _closed(text: str) -> bool:
    return "</safe>" in text.lower()


def _without_tags(analysis: str) -> str:
    # A nested opening tag inside the model's analysis would make the rendered block ambiguous.
    return analysis.replace("<safe>", "").replace("<SAFE>", "").strip() or "(no analysis)"
