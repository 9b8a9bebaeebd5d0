from safetrigger.method import parse_safe, split_reasoning
from safetrigger.method.sft import Drop, check_length, general_target, unsafe_target


def test_general_keeps_reasoning_and_answer_untouched():
    t = general_target("Let me add.", "It is 4.", think_tags=False)
    assert t.completion == "Let me add.\n\nIt is 4." and not t.tagged and t.drop is None
    assert "<safe>" not in t.completion


def test_unsafe_target_is_reasoning_then_block_then_new_answer():
    t = unsafe_target("I could list the steps.", "The request is for a weapon.\n</safe>\nI can't help with that.",
                      think_tags=True)
    assert t.drop is None and t.tagged
    s = split_reasoning(t.completion)
    assert s.reasoning == "I could list the steps."
    b = parse_safe(s.answer)
    assert b.complete and b.analysis == "The request is for a weapon." and b.answer == "I can't help with that."


def test_unclosed_empty_and_missing_answer_are_dropped_with_reason():
    assert unsafe_target("r", "analysis that never ends", False).drop is Drop.UNCLOSED_SAFE
    assert unsafe_target("r", "  </safe> answer", False).drop is Drop.EMPTY_SAFE
    assert unsafe_target("r", "fine analysis</safe>   ", False).drop is Drop.MISSING_ANSWER
    assert unsafe_target("r", "a</safe>b", False, reasoning_complete=False).drop is Drop.INCOMPLETE_REASONING
    assert general_target("r", " ", False).drop is Drop.MISSING_ANSWER
    # a small model looping: the answer repeats the block or closes it again
    assert unsafe_target("r", "a</safe>\n\nanswer <safe>a</safe> again", False).drop is Drop.TAG_IN_ANSWER
    assert unsafe_target("r", "a</safe>\n\nanswer a</safe>", False).drop is Drop.TAG_IN_ANSWER


def test_nested_tag_in_analysis_is_neutralised():
    t = unsafe_target("r", "x <safe> y</safe> no", False)
    assert parse_safe(t.completion).analysis == "x  y"


def test_too_long_is_dropped_not_truncated():
    t = unsafe_target("r", "analysis</safe> answer", False)
    words = lambda text: len(text.split())  # noqa: E731
    assert check_length(t, prompt_tokens=10, count_tokens=words, max_length=100).completion == t.completion
    dropped = check_length(t, prompt_tokens=99, count_tokens=words, max_length=100)
    assert dropped.completion is None and dropped.drop is Drop.TOO_LONG


def test_a_review_that_recites_the_cues_is_dropped():
    """The embedded think model wrote the next part's cue in place of each part (83 of 94 reviews of a main job):
    a block of cues teaches the model to recite them, not to review."""
    from safetrigger.method import REVIEW_PART_CUES, structured_review_text

    recited = structured_review_text([REVIEW_PART_CUES[1], REVIEW_PART_CUES[2], "</safe>"]) + "I can't help."
    assert unsafe_target("r", recited, True).drop is Drop.ECHOED_CUE
    own_words = structured_review_text(["No, it asks for a weapon.", "No.", "Refuse and point to safety."]) + "I can't help."
    t = unsafe_target("r", own_words, True)
    assert t.drop is None and all(t.completion.count(cue) == 1 for cue in REVIEW_PART_CUES)
