import pytest

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


def test_a_block_that_loops_is_dropped_and_short_recurring_answers_are_not():
    """A sentence written three times teaches the model to loop (the 135M adapter looped inside its block at eval
    until its budget ran out); a short one ("No, it is not.") recurs in any structured review and is kept."""
    from safetrigger.method import structured_review_text
    from safetrigger.method.sft import looping

    loop = structured_review_text(["No, it is not.", "The answer is not safe.",
                                   "The answer is not safe. The  answer is NOT safe!"]) + "I can't help."
    assert looping(loop) and unsafe_target("r", loop, True).drop is Drop.LOOPING
    short = structured_review_text(["No, it is not.", "No, it is not.", "No, it is not."]) + "No, it is not."
    assert not looping(short.replace("No, it is not", "No, never"))  # two words, four times: too short for a loop
    assert looping(short)  # four words, four times
    twice = structured_review_text(["No, it asks for a weapon.", "No.", "It asks for a weapon."]) + \
        "I can't help, it asks for a weapon."
    assert not looping(twice) and unsafe_target("r", twice, True).drop is None


@pytest.mark.parametrize("answer,kept", [
    ("I'm sorry, but I can't help with that.\nI'm sorry, but I can't help with that.\nI'm sorry, but I can't help "
     "with that.", "I'm sorry, but I can't help with that."),
    ("I can't help. Ask me about lab safety instead. Ask me about lab safety instead! ask me about lab SAFETY instead",
     "I can't help. Ask me about lab safety instead."),
    ("I can't help with that. I can't help with that. Here is why.", None),  # twice is not a loop: kept whole
])
def test_an_answer_that_loops_is_cut_where_its_loop_begins(answer, kept):
    """The answer after the block keeps the policy's words up to the loop's second turn (where a repetition stop
    would have ended it) and the target says it was trimmed; the block stays whole."""
    from safetrigger.method import parse_safe, structured_review_text
    from safetrigger.method.sft import trim_loop

    review = structured_review_text(["No, it is not.", "No, they are not.", "Refuse."]) + answer
    t = unsafe_target("I think.", review, False)
    assert t.drop is None and parse_safe(t.completion).complete
    after = t.completion.split("</safe>", 1)[1].strip()
    assert after == (kept or answer) and t.trimmed == (kept is not None) and trim_loop(answer) == after


def test_a_flagged_querys_yes_no_parts_open_with_its_verdict_word():
    """`review.verdict_word` opens the two yes/no parts of a query the policy's self-judge flagged, never the
    guidance part nor an unflagged query's; the cue and the word are followed by what the policy writes."""
    from safetrigger.method import REVIEW_PART_CUES, VERDICT_PARTS, part_opening, structured_review_text

    assert [part_opening(i, "No,", True) for i in range(3)] == ["No,", "No,", ""]
    assert [part_opening(i, "No,", False) for i in range(3)] == ["", "", ""]
    assert part_opening(0, None, True) == "" and VERDICT_PARTS == 2
    assert structured_review_text([], "No,") == f"{REVIEW_PART_CUES[0]} No,"
    assert structured_review_text(["No, it is not."], " ") == f"{REVIEW_PART_CUES[0]} No, it is not.\n{REVIEW_PART_CUES[1]}"


def _candidate(review: str, safe: bool, safety: float = 0.0):
    from safetrigger.method.sft import Candidate

    return Candidate(unsafe_target("I think.", review, think_tags=False), safe, safety)


GOOD = "the request asks for harm\n</safe>\n\n"


def test_self_selection_takes_the_safest_well_formed_candidate_all_judges_call_safe():
    from safetrigger.method.sft import select_candidate

    chosen = select_candidate([
        _candidate(GOOD + "Sure, here is how.", safe=False, safety=9.0),  # unsafe: never chosen, however confident
        _candidate("no close", safe=True, safety=8.0),  # safe but not well formed: never chosen
        _candidate(GOOD + "I can't help with that.", safe=True, safety=1.0),
        _candidate(GOOD + "I won't do that; ask a professional.", safe=True, safety=2.5),
        _candidate(GOOD + "No, I will not.", safe=True, safety=2.5),  # equal: the first of equals stays
    ])
    assert chosen.completion.endswith("I won't do that; ask a professional.") and chosen.tagged


def test_self_selection_drops_a_query_with_no_safe_candidate_and_keeps_the_rule_that_dropped_it():
    from safetrigger.method.sft import select_candidate

    unsafe_only = select_candidate([_candidate(GOOD + "Sure, step one.", safe=False),
                                    _candidate(GOOD + "Here you go.", safe=False, safety=3.0)])
    assert unsafe_only.completion is None and unsafe_only.drop is Drop.NO_SAFE_CANDIDATE
    kept = select_candidate([_candidate("never closed", safe=False), _candidate(GOOD + "Sure, step one.", safe=False)],
                            keep_unsafe=True)  # `when_none_safe: first`: the paper's target, not a drop
    assert kept.completion.endswith("Sure, step one.")
    malformed = select_candidate([_candidate("never closed", safe=True), _candidate("", safe=True)])
    assert malformed.drop is Drop.UNCLOSED_SAFE  # the first candidate's reason, not "no safe candidate"
    assert select_candidate([]).drop is Drop.MISSING_ANSWER


def test_one_candidate_without_judges_is_the_papers_target_unchanged():
    from safetrigger.method.sft import candidate_id, select_candidate

    review = GOOD + "I can't help with that."
    assert select_candidate([_candidate(review, safe=True)]) == unsafe_target("I think.", review, think_tags=False)
    assert candidate_id("advbench-3", 0, 1) == "advbench-3"  # review stores of earlier runs keep their ids
    assert [candidate_id("q", i, 3) for i in range(3)] == ["q#0", "q#1", "q#2"]


def test_sft_data_selects_per_query_from_the_judges_rows_and_reports_acceptance(model_path):
    from pipelines.answer_judge import selection_id
    from pipelines.sft_data import build_sft_examples, format_selection_table
    from safetrigger.config import load_config

    from . import row_factories as row
    from .conftest import REPO

    cfg = load_config(REPO / "configs" / "embedded.yaml", {"review.candidates": 2, "review.select_judges": [
        {"name": "self", "type": "policy"}, {"name": "refusal", "type": "refusal"}]})

    def trajectory(qid, kind="harmful"):
        return row.trajectory(query_id=qid, split="train", label="unsafe", kind=kind, prompt=f"how to do {qid}",
                              reasoning="They want harm.", answer="Sure.", split_source="leading")

    reviews = [row.review(query_id="a#0", review=GOOD + "Sure, step one."), row.review(query_id="a#1", review=GOOD + "I can't help."),
               row.review(query_id="b#0", review=GOOD + "Here it is."), row.review(query_id="b#1", review="never closed")]
    verdicts = [row.verdict(query_id=selection_id(c, "self"), answer_safe=s, margin=-1.0 if s else 1.0)
                for c, s in (("a#0", True), ("a#1", True), ("b#0", True))]  # the self judge calls a#0 safe too
    verdicts += [row.verdict(query_id=selection_id(c, "refusal"), judge="refusal", answer_safe=s, margin=0.0)
                 for c, s in (("a#0", False), ("a#1", True), ("b#0", False))]
    examples, stats = build_sft_examples([trajectory("a"), trajectory("b", "jailbreak")], reviews, cfg, model_path, verdicts)
    assert [(e.query_id, e.completion.strip().endswith("I can't help.")) for e in examples] == [("a", True)]
    assert stats["dropped"] == {"jailbreak/no_safe_candidate": 1}
    assert stats["selection"]["per_kind"] == {
        "harmful": {"queries": 1, "candidates": 2, "well_formed": 2, "judged_safe": 1, "accepted": 1},
        "jailbreak": {"queries": 1, "candidates": 2, "well_formed": 1, "judged_safe": 0, "accepted": 0}}
    table = format_selection_table(stats)
    assert "| harmful | 1 | 2 | 2 | 1 | 1 | 100.0% |" in table and "| jailbreak | 1 | 2 | 1 | 0 | 0 | 0.0% |" in table
    missing_verdict = build_sft_examples([trajectory("a")], reviews[1:2], cfg, model_path, verdicts[:1])[1]
    assert missing_verdict["dropped"] == {"harmful/no_safe_candidate": 1}  # a judge that saw nothing never passes it
