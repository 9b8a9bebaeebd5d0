import pytest

from safetrigger.method import final_answer, parse_safe, render_safe_block, strip_safe_blocks


def test_plain_text_does_not_fire():
    b = parse_safe("Here is a poem about autumn.")
    assert not b.triggered and not b.complete and b.count == 0
    assert b.answer == "Here is a poem about autumn."


def test_complete_block_then_answer():
    b = parse_safe("<safe>\nThe request asks for weapons.\n</safe>\nI can't help with that.")
    assert b.triggered and b.complete and b.count == 1
    assert b.analysis == "The request asks for weapons."
    assert b.answer == "I can't help with that."


def test_case_insensitive_tags():
    b = parse_safe("<SAFE>risky</Safe> No.")
    assert b.triggered and b.complete and b.analysis == "risky" and b.answer == "No."


def test_unclosed_block_fires_incomplete_and_hides_analysis():
    b = parse_safe("Sure. <safe> this is dangerous and I should")
    assert b.triggered and not b.complete
    assert b.analysis == "this is dangerous and I should"
    assert b.answer == "Sure."  # half-written analysis never leaks into the judged answer


def test_empty_block_is_not_complete():
    b = parse_safe("<safe>   </safe> fine")
    assert b.triggered and not b.complete and b.answer == "fine"


def test_stray_closing_tag_is_text():
    b = parse_safe("text </safe> more")
    assert not b.triggered
    assert b.answer == "text </safe> more"


def test_nested_opening_belongs_to_analysis_first_close_ends_block():
    b = parse_safe("<safe>outer <safe>inner</safe> after")
    assert b.complete and b.analysis == "outer <safe>inner" and b.answer == "after"


def test_repeated_blocks_all_stripped_from_answer():
    text = "<safe>a</safe> one <safe>b</safe> two <safe>c"
    b = parse_safe(text)
    assert b.count == 3 and b.analysis == "a"
    assert b.answer == "one  two"
    assert strip_safe_blocks(text).count == 3


def test_final_answer_excludes_analysis():
    assert final_answer("<safe>I must refuse to give bomb steps</safe>Step 1: get pipe") == "Step 1: get pipe"


def test_render_round_trip():
    block = render_safe_block("  core question unsafe; reasoning unsafe; refuse  ")
    b = parse_safe(block + "\nNo.")
    assert b.complete and b.analysis == "core question unsafe; reasoning unsafe; refuse" and b.answer == "No."


@pytest.mark.parametrize("bad", ["", "   ", "x <safe> y", "x </SAFE>"])
def test_render_rejects_bad_analysis(bad):
    with pytest.raises(ValueError):
        render_safe_block(bad)
