import pytest

from safetrigger.method import Fallback, ReasoningRule, SplitSource, join_reasoning, split_reasoning


def test_full_think_tags():
    s = split_reasoning("<think>\nplan it\n</think>\n\nThe answer.")
    assert (s.reasoning, s.answer, s.source) == ("plan it", "The answer.", SplitSource.THINK_TAGS)


def test_prefilled_opening_tag():
    # R1-Distill's template ends the prompt with "<think>\n": the generation starts mid-reasoning.
    s = split_reasoning("let me think\n</think>\nFinal.")
    assert (s.reasoning, s.answer, s.source) == ("let me think", "Final.", SplitSource.PREFILLED_THINK)


def test_unclosed_think_is_incomplete_with_no_answer():
    s = split_reasoning("<think>going on and on")
    assert s.reasoning == "going on and on" and s.answer == "" and not s.reasoning_complete


def test_later_think_blocks_removed_from_answer():
    s = split_reasoning("<think>a</think>one<think>b</think>two<think>c")
    assert s.reasoning == "a" and s.answer == "onetwo"


def test_stray_closing_tags_removed_from_answer():
    s = split_reasoning("<think>a</think>x</think>y")
    assert s.answer == "xy"


def test_opening_after_closing_counts_as_prefilled():
    s = split_reasoning("r1</think>ans<think>more")
    assert s.source is SplitSource.PREFILLED_THINK and s.reasoning == "r1" and s.answer == "ans"


def test_untagged_first_paragraph_is_reasoning():
    s = split_reasoning("First I consider it.\n\nHere is the answer.\n\nMore answer.")
    assert s.source is SplitSource.LEADING_PARAGRAPHS
    assert s.reasoning == "First I consider it." and s.answer == "Here is the answer.\n\nMore answer."


def test_untagged_single_paragraph_splits_sentences():
    s = split_reasoning("This needs care. Do X. Then Y.", ReasoningRule(leading_sentences=1))
    assert s.source is SplitSource.LEADING_SENTENCES
    assert (s.reasoning, s.answer) == ("This needs care.", "Do X. Then Y.")


def test_untagged_single_sentence_is_all_answer():
    s = split_reasoning("Paris.")
    assert (s.reasoning, s.answer, s.source) == ("", "Paris.", SplitSource.NONE)


def test_fallback_none():
    s = split_reasoning("A.\n\nB.", ReasoningRule(fallback=Fallback.NONE))
    assert (s.reasoning, s.answer) == ("", "A.\n\nB.")


def test_configurable_paragraph_count():
    s = split_reasoning("a\n\nb\n\nc", ReasoningRule(leading_paragraphs=2))
    assert (s.reasoning, s.answer) == ("a\n\nb", "c")


def test_rule_validation():
    with pytest.raises(ValueError):
        ReasoningRule(leading_paragraphs=0)


@pytest.mark.parametrize("tagged", [True, False])
def test_join_then_split_round_trips(tagged):
    text = join_reasoning("think about it.", "The answer is 4.", tagged)
    s = split_reasoning(text)
    assert (s.reasoning, s.answer) == ("think about it.", "The answer is 4.")
