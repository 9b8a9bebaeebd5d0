"""Streaming `<safe>` hiding agrees with parse_safe on every chunking and never emits part of a tag."""

import random

import pytest

from safetrigger.method import parse_safe, strip_safe_blocks
from safetrigger.method.safe_stream import SafeStream

TEXTS = [
    "Plain answer with no block.",
    "<safe>\n1. unsafe core question\n2. thoughts unsafe\n3. refuse\n</safe>\n\nI can't help with that.",
    "Thinking first. <SAFE>analysis</Safe> Answer after.",
    "<safe>never closed because max_tokens ran out",
    "Stray </safe> closing tag is text. <safe>a</safe>b<safe>second block</safe>c",
    "<safe>nested <safe> opening stays analysis</safe> done",
    "Looks like a tag <sa but is not; <s and <saf too.",
    "<safe></safe>empty block",
    "",
]


def _run(text, sizes):
    s, out, i = SafeStream(), [], 0
    full = strip_safe_blocks(text).text.lstrip()
    for n in sizes:
        piece = text[i:i + n]
        i += n
        out.append(s.feed(piece))
        assert full.startswith("".join(out))  # nothing went out that the final answer does not hold
    out.append(s.close())
    return "".join(out), s.safety


@pytest.mark.parametrize("text", TEXTS)
def test_every_chunking_matches_parse_safe(text):
    rng = random.Random(hash(text) % 1000)
    expected = parse_safe(text)
    for trial in range(200):
        sizes = [1] * len(text) if trial == 0 else [rng.randint(1, 9) for _ in range(len(text) + 1)]
        visible, safety = _run(text, sizes)
        assert visible.rstrip() == expected.answer, (text, sizes)
        assert safety.triggered == expected.triggered
        assert safety.complete == expected.complete
        assert safety.analysis == (expected.analysis if expected.triggered else "")


def test_nothing_of_the_block_leaks_before_it_closes():
    s = SafeStream()
    seen = s.feed("Sure.") + s.feed(" <sa") + s.feed("fe>I should not say ") + s.feed("this")
    assert seen == "Sure. " and "should" not in seen
    assert s.feed("</sa") == "" and s.feed("fe> ok") == " ok"
