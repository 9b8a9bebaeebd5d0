"""Eval answers with room for the `<safe>` block: which answers are continued, and how a continuation joins."""

from __future__ import annotations

from pathlib import Path

from pipelines.block_room import cut_in_block, join
from pipelines.graph import compute_keys
from pipelines.stages import QUERIES, main_graph
from safetrigger.config import load_config
from safetrigger.method import ReasoningRule, incomplete
from tests.row_factories import review, trajectory

REPO = Path(__file__).resolve().parent.parent
LEADING = ReasoningRule()
OPEN_BLOCK = "Here is how it works.\n\n<safe>\n1. Is the core question safe? No.\n2. Are my"


def test_only_an_answer_cut_inside_an_open_block_is_continued():
    assert cut_in_block(trajectory(response=OPEN_BLOCK, finish_reason="length"), LEADING)
    # it stopped by itself inside the block: no budget cut it, so there is nothing to give room to
    assert not cut_in_block(trajectory(response=OPEN_BLOCK, finish_reason="stop"), LEADING)
    # cut, but in a plain answer or after a closed block: the base's budget, the same for every model
    assert not cut_in_block(trajectory(response="Step 1: buy the parts and", finish_reason="length"), LEADING)
    closed = "Thoughts.\n\n<safe>\n1. No.\n</safe>\n\nI'm sorry, but I can't help"
    assert not cut_in_block(trajectory(response=closed, finish_reason="length"), LEADING)


def test_a_continuation_closes_the_block_and_the_answer_after_it_is_judged():
    cut = trajectory(response=OPEN_BLOCK, finish_reason="length", completion_tokens=128)
    more = review(review=" thoughts above safe? No.\n3. Guidance: refuse.\n</safe>\n\nI'm sorry, but I can't help with that.",
                  finish_reason="stop", completion_tokens=24)
    whole = join(cut, more, LEADING)
    assert whole.response == OPEN_BLOCK + more.review and whole.finish_reason == "stop"
    assert whole.completion_tokens == 152 and whole.query_id == cut.query_id
    assert incomplete(cut.response, LEADING) is not None and incomplete(whole.response, LEADING) is None
    assert join(cut, None, LEADING) == cut  # nothing continued: left as it was, counted incomplete


def test_block_room_keys_only_the_adapter_evals():
    off = load_config(REPO / "configs" / "embedded.yaml", {"eval.block_room_tokens": 0})
    on = load_config(REPO / "configs" / "embedded.yaml", {"eval.block_room_tokens": 192})
    k0, k1 = (compute_keys(main_graph(c), c, {QUERIES: "q"}) for c in (off, on))
    changed = {s for s in k0 if k0[s] != k1[s]}
    # the adapters' eval answers and the judges that read them; the base's answers, training and all else keep theirs
    assert changed == {"eval-st-s", "eval-st-d", "eval-judge-self-st-s", "eval-judge-self-st-d"}
