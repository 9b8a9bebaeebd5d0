"""DPO scoring and pair choice on hand-made responses (pure logic), and the pair stage's rules on a real tokenizer."""

import pytest

from safetrigger.method import (ReasoningRule, category, choose_pair, general_category, reward, score_sample,
                               visible_answer)
from safetrigger.method.reasoning import Fallback

THINK = ReasoningRule(Fallback.NONE)
LEAD = ReasoningRule(Fallback.LEADING, 1, 1)

TAGGED_REFUSAL = "<think>\nThis asks for a weapon.\n</think>\n\n<safe>\nUnsafe request.\n</safe>\n\nI can't help with that."
TAGGED_COMPLY = "<think>\nOk.\n</think>\n\n<safe>\nIt is unsafe.\n</safe>\n\nSure, here is how: step 1 ..."
UNCLOSED = "<think>\nOk.\n</think>\n\n<safe>\nIt is unsafe and I will"
PLAIN_REFUSAL = "<think>\nHmm.\n</think>\n\nI'm sorry, I cannot help."
PLAIN_COMPLY = "<think>\nOk.\n</think>\n\nSure, step 1 ..."


def test_visible_answer_hides_reasoning_and_safe_analysis():
    assert visible_answer(TAGGED_COMPLY, THINK) == "Sure, here is how: step 1 ..."
    assert visible_answer(UNCLOSED, THINK) == ""
    # an untagged model without <think>: the whole text is visible, minus the block
    assert visible_answer("First para.\n\n<safe>x</safe>\n\nAnswer.", LEAD).split() == ["First", "para.", "Answer."]


def test_score_sample_facts():
    s = score_sample(TAGGED_REFUSAL, True, THINK)
    assert (s.safe, s.tagged, s.reasoning_complete, s.safe_complete) == (True, True, True, True)
    s = score_sample(UNCLOSED, True, THINK)
    assert s.tagged and not s.safe_complete
    s = score_sample("<think>\nstill thinking", False, THINK)
    assert not s.reasoning_complete and not s.tagged


def test_unsafe_query_pair_is_best_versus_worst():
    samples = [score_sample(t, safe, THINK) for t, safe in
               [(PLAIN_COMPLY, False), (TAGGED_REFUSAL, True), (PLAIN_REFUSAL, True), (TAGGED_COMPLY, False)]]
    choice = choose_pair(samples, unsafe_query=True, delta=0.5)
    assert choice.pair.chosen.text == TAGGED_REFUSAL and choice.pair.rejected.text == PLAIN_COMPLY
    assert choice.rewards[1] == max(choice.rewards) and choice.rewards[0] == min(choice.rewards) == 0.0


@pytest.mark.parametrize("delta, kept", [(0.25, True), (0.35, False)])
def test_delta_filter(delta, kept):
    # B (0.5) vs C (0.2): margin 0.3
    samples = [score_sample(PLAIN_REFUSAL, True, THINK), score_sample(TAGGED_COMPLY, False, THINK)]
    assert (choose_pair(samples, unsafe_query=True, delta=delta).pair is not None) is kept


def test_general_query_untagged_helpful_answer_wins():
    helpful, tagged = score_sample(PLAIN_COMPLY, None, THINK), score_sample(TAGGED_REFUSAL, None, THINK)
    choice = choose_pair([tagged, helpful], unsafe_query=False, delta=0.5)
    assert choice.pair.chosen is helpful and choice.pair.rejected is tagged and choice.rewards == ()
    assert (general_category(helpful), general_category(tagged)) == ("helpful", "tagged")
    # all untagged and helpful: nothing to prefer
    assert choose_pair([helpful, helpful], unsafe_query=False, delta=0.5).pair is None
    # a refusal loses to a helpful answer on a general query
    refusal = score_sample(PLAIN_REFUSAL, None, THINK)
    assert choose_pair([refusal, helpful], unsafe_query=False, delta=0.5).pair.chosen is helpful
    assert general_category(refusal) == "refusal"


def test_an_unjudged_sample_has_no_reward_or_category():
    """A general query's samples are not judged (their pair reads no verdict): scoring one as if judged fails."""
    unjudged = score_sample(PLAIN_COMPLY, None, THINK)
    with pytest.raises(ValueError, match="not judged"):
        reward(unjudged)
    with pytest.raises(ValueError, match="not judged"):
        category(unjudged)
    with pytest.raises(ValueError, match="not judged"):
        choose_pair([unjudged, score_sample(TAGGED_REFUSAL, None, THINK)], unsafe_query=True, delta=0.5)


def test_rejecting_tagged_but_complying_samples_teaches_the_answer_after_the_tag():
    """Best vs worst pairs A with D whenever a D exists, which teaches the tag and nothing about the answer after
    it; `tagged_unsafe` rejects the C sample instead (delta permitting), and falls back to the worst without one."""
    a, c, d = (score_sample(TAGGED_REFUSAL, True, THINK), score_sample(TAGGED_COMPLY, False, THINK),
               score_sample(PLAIN_COMPLY, False, THINK))
    assert choose_pair([a, c, d], unsafe_query=True, delta=0.5).pair.rejected is d
    pair = choose_pair([a, c, d], unsafe_query=True, delta=0.5, reject="tagged_unsafe").pair
    assert pair.chosen is a and pair.rejected is c and pair.margin == pytest.approx(3.0 - 0.2)
    assert choose_pair([a, d], unsafe_query=True, delta=0.5, reject="tagged_unsafe").pair.rejected is d
    b = score_sample(PLAIN_REFUSAL, True, THINK)  # B (0.5) over C (0.2) is 0.3: below delta, so the worst stays
    assert choose_pair([b, c, d], unsafe_query=True, delta=0.5, reject="tagged_unsafe").pair.rejected is d
