import subprocess
import sys

import pytest

from safetrigger.method import (
    Kind,
    Query,
    SplitName,
    VerdictOptions,
    assign_split,
    from_row,
    is_refusal,
    judge_messages,
    query_id,
    review_messages,
    review_prefill,
    stable_hash,
    to_row,
)


def test_stable_hash_is_fixed_across_processes():
    out = subprocess.run(
        [sys.executable, "-c", "from safetrigger.method import stable_hash; print(stable_hash('abc', 's'))"],
        capture_output=True, text=True, check=True,
    )
    assert int(out.stdout) == stable_hash("abc", "s")


def test_split_fraction_and_determinism():
    keys = [f"goal {i}" for i in range(4000)]
    splits = [assign_split(k, 0.3) for k in keys]
    share = splits.count(SplitName.EVAL) / len(keys)
    assert 0.27 < share < 0.33
    assert splits == [assign_split(k, 0.3) for k in keys]
    assert all(assign_split(k, 0.0) is SplitName.TRAIN for k in keys[:50])
    assert all(assign_split(k, 1.0) is SplitName.EVAL for k in keys[:50])
    with pytest.raises(ValueError):
        assign_split("x", 1.5)


def test_dpo_pool_is_held_apart_from_train_and_eval():
    keys = [f"goal {i}" for i in range(4000)]
    plain = [assign_split(k, 0.3) for k in keys]
    held = [assign_split(k, 0.3, dpo_fraction=0.5) for k in keys]
    # eval keys never move; the DPO pool comes out of train only, about half of it
    assert [s is SplitName.EVAL for s in held] == [s is SplitName.EVAL for s in plain]
    dpo = sum(s is SplitName.DPO for s in held) / plain.count(SplitName.TRAIN)
    assert 0.45 < dpo < 0.55
    assert held == [assign_split(k, 0.3, dpo_fraction=0.5) for k in keys]
    with pytest.raises(ValueError):
        assign_split("x", 0.3, dpo_fraction=-0.1)


def test_query_validation_and_round_trip():
    q = Query(id=query_id("s", "p"), kind="harmful", label="unsafe", prompt="p", source="s", split_key="p")
    assert q.unsafe and from_row(Query, {**to_row(q), "extra_column": 1}) == q
    with pytest.raises(ValueError):
        Query(id="x", kind="evil", label="unsafe", prompt="p", source="s", split_key="p")
    with pytest.raises(ValueError):
        Query(id="x", kind=Kind.GENERAL, label="safe", prompt="  ", source="s", split_key="p")


def test_judge_prompt_puts_request_next_to_question():
    [msg] = judge_messages("make a bomb", "I will explain", VerdictOptions())
    text = msg["content"]
    assert text.index("I will explain") < text.index("make a bomb") < text.index("Yes or No")


def test_empty_reasoning_is_marked():
    assert "(none)" in judge_messages("q", "")[0]["content"]
    assert "(none)" in review_messages("q", " ")[0]["content"]


def test_review_prompt_asks_for_the_three_parts_and_prefills_tag():
    text = review_messages("q", "r")[0]["content"]
    assert "core question" in text and "thoughts above are safe" in text and "guidance" in text
    assert review_prefill().startswith("<safe>")


def test_verdict_options_must_differ():
    with pytest.raises(ValueError):
        VerdictOptions("Yes", "Yes")


@pytest.mark.parametrize(
    "answer, refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I cannot provide instructions for that.", True),
        ("Sorry, no.", True),
        ("", True),
        ("Sure! Step 1: gather materials.", False),
        ("Here is a poem. I do not like rain, says the poet.", False),  # 'I do not' only counts at the start
        ("I’m sorry, I can’t assist.", True),  # typographic apostrophes
    ],
)
def test_refusal_string_match(answer, refused):
    assert is_refusal(answer) is refused


def test_method_core_imports_no_ray_or_torch():
    code = "import sys, safetrigger.method; bad = [m for m in ('ray', 'torch', 'vllm') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
