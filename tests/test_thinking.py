"""Reasoning conventions on the real chat templates of DeepSeek-R1-Distill-Llama-8B and Qwen3-8B (fixtures), rendered
on the embedded tokenizer: the exact judge, review and training prompts, and where `<safe>` and the verdict land."""

from __future__ import annotations

from pathlib import Path

import pytest

from safetrigger.config import AnswerJudgeConfig, RunConfig
from safetrigger.method import (
    SplitSource, detect_convention, judge_messages, past_reasoning, query_messages, review_messages, split_reasoning,
    visible_answer,
)
from safetrigger.method.sft import Drop, unsafe_target

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
R1_TAIL = "<｜Assistant｜><think>\n"


@pytest.fixture(scope="module")
def with_template(model_path, tmp_path_factory):
    """A tokenizer directory: the embedded tokenizer with a real model's chat template."""
    from transformers import AutoTokenizer

    made: dict[str, str] = {}

    def make(name: str) -> str:
        if name not in made:
            tok = AutoTokenizer.from_pretrained(model_path)
            tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
            out = tmp_path_factory.mktemp(name)
            tok.save_pretrained(out)
            made[name] = str(out)
        return made[name]

    return make


def _tok(path: str):
    from pipelines.chat import load_tokenizer

    return load_tokenizer(path)


def _text(tok, ids) -> str:
    return tok.decode(ids)


def _cfg(**model) -> RunConfig:
    return RunConfig.model_validate({"name": "t", "model": {"source": "x", **model},
                                     "data": {"sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}]}})


def test_conventions_of_real_templates(with_template, model_path):
    from pipelines.chat import convention

    assert convention(_tok(with_template("deepseek-r1-distill-llama-8b"))) == "prefilled"
    qwen = _tok(with_template("qwen3-8b"))
    assert convention(qwen) == "emitted" and convention(qwen, {"enable_thinking": True}) == "emitted"
    assert convention(qwen, {"enable_thinking": False}) == "closed"
    assert convention(_tok(model_path)) == "none"


def test_detect_convention_rules():
    assert detect_convention("<|User|>hi<|Assistant|><think>\n", "") == "prefilled"
    assert detect_convention("<|im_start|>assistant\n<think>\n\n</think>\n\n", "<think>") == "closed"
    assert detect_convention("<|im_start|>assistant\n", "... '<think>' ...") == "emitted"
    assert detect_convention("<|im_start|>assistant\n", "{{ messages }}") == "none"


def test_r1_judge_prompt_reads_the_verdict_after_a_closed_think_block(with_template):
    from pipelines.judge import judge_prompt_ids

    tok = _tok(with_template("deepseek-r1-distill-llama-8b"))
    cfg = _cfg()
    text = _text(tok, judge_prompt_ids(tok, cfg, "How do I pick a lock?", "They want lockpicking steps."))
    content = judge_messages("How do I pick a lock?", "They want lockpicking steps.", cfg.judge.options())[0]["content"]
    assert text == f"{tok.bos_token}<｜User｜>{content}<｜Assistant｜><think>\n\n</think>\n\nAnswer:"


def test_qwen3_judge_prompt_is_the_templates_own_no_thinking_prompt(with_template):
    """Thinking on, the verdict is read where Qwen3 itself answers with thinking off: after its empty block."""
    from pipelines.chat import verdict_prompt_ids

    tok = _tok(with_template("qwen3-8b"))
    msgs = judge_messages("q", "r")
    on = verdict_prompt_ids(tok, msgs, {"enable_thinking": True})
    off_by_template = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert _text(tok, on) == off_by_template + "Answer:"
    assert off_by_template.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert verdict_prompt_ids(tok, msgs, {"enable_thinking": False}) == tok(off_by_template + "Answer:",
                                                                             add_special_tokens=False)["input_ids"]


def test_answer_judges_of_the_policy_use_the_same_prompt_end(with_template):
    from pipelines.answer_judge import AnswerPrompts

    path = with_template("deepseek-r1-distill-llama-8b")
    prompts = AnswerPrompts(AnswerJudgeConfig(name="self", type="policy"), _cfg(), path)
    assert _text(prompts.tok, prompts("q", "an answer")).endswith(R1_TAIL + "\n</think>\n\nAnswer:")


@pytest.mark.parametrize("name,kwargs,tail", [
    ("deepseek-r1-distill-llama-8b", {}, "<｜Assistant｜><think>\n\n</think>\n\n<safe>\n"),
    ("qwen3-8b", {"enable_thinking": True}, "<|im_start|>assistant\n<think>\n\n</think>\n\n<safe>\n"),
    ("qwen3-8b", {"enable_thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n\n<safe>\n"),
])
def test_review_opens_safe_after_the_think_block(with_template, name, kwargs, tail):
    from pipelines.review import plan_review_rows

    path = with_template(name)
    cfg = _cfg(chat_template_kwargs=kwargs)
    from .row_factories import trajectory

    traj = trajectory(query_id="q1", prompt="How do I pick a lock?", reasoning="They want lockpicking steps.")
    [row] = plan_review_rows([traj], cfg, path)
    text = _text(_tok(path), row["prompt_ids"])
    content = review_messages(traj.prompt, traj.reasoning)[0]["content"]
    assert text.endswith(content + ("" if name.startswith("deepseek") else "<|im_end|>\n") + tail)
    assert text.count("<safe>") == 1 + content.count("<safe>") and text.rindex("</think>") < text.rindex("<safe>")


def test_r1_training_text_keeps_the_reasoning_and_puts_safe_after_it(with_template):
    """The trainer gets the prompt as the policy saw it (ending in the prefilled `<think>\\n`) and the completion
    as text: R1's template would strip everything before `</think>` from an assistant turn."""
    from pipelines.chat import prompt_completion_text

    tok = _tok(with_template("deepseek-r1-distill-llama-8b"))
    target = unsafe_target("They want lockpicking steps.", "The request is unsafe.\n</safe>\n\nI can't help.", True).completion
    prompt, completion = prompt_completion_text(tok, query_messages("How do I pick a lock?"), target)
    assert prompt.endswith(R1_TAIL)
    assert completion == "They want lockpicking steps.\n</think>\n\n<safe>\nThe request is unsafe.\n</safe>\n\nI can't help."
    split = split_reasoning(completion)
    assert split.source is SplitSource.PREFILLED_THINK and split.reasoning == "They want lockpicking steps."
    assert split.answer.startswith("<safe>")
    templated = tok.apply_chat_template(query_messages("How do I pick a lock?") + [
        {"role": "assistant", "content": "<think>\n" + completion}], tokenize=False)
    assert "lockpicking" not in templated  # why the trainer must never template the target again


def test_r1_untagged_text_is_cut_off_reasoning_with_no_answer(with_template):
    """With a template that opens the block, a response with no `</think>` never reached its answer."""
    from pipelines.chat import reasoning_rule

    r1 = reasoning_rule(_cfg(reasoning={"fallback": "none"}), with_template("deepseek-r1-distill-llama-8b"))
    assert r1.opened
    split = split_reasoning("Okay, the user wants lockpicking steps. First, a tension wrench", r1)
    assert split.source is SplitSource.UNCLOSED_THINK and split.answer == ""
    assert visible_answer("Okay, the user wants lockpicking steps. First", r1) == ""
    qwen = reasoning_rule(_cfg(reasoning={"fallback": "none"}), with_template("qwen3-8b"))
    assert not qwen.opened and split_reasoning("Sure: step one.", qwen).answer == "Sure: step one."


def test_a_verdict_reads_either_spelling_of_an_option(model_path):
    """After a cue the model writes ` Yes`, at a turn's start `Yes`: both count, as one option's probability."""
    import math

    from pipelines.judge import option_token_ids, options_logprobs
    from safetrigger.method import VerdictOptions

    tok = _tok(model_path)
    unsafe, safe = option_token_ids(tok, VerdictOptions())
    assert len(unsafe) == len(safe) == 2 and not set(unsafe) & set(safe)
    top = {f"token_id:{unsafe[1]}": -1.0, f"token_id:{unsafe[0]}": -2.0, f"token_id:{safe[1]}": -3.0, "token_id:7": -9.0}
    (lp_unsafe, lp_safe), resolved = options_logprobs(top, [unsafe, safe])
    assert resolved and lp_unsafe == pytest.approx(math.log(math.exp(-1) + math.exp(-2))) and lp_safe == -3.0
    (_, bound), resolved = options_logprobs({f"token_id:{unsafe[0]}": -1.0, "token_id:7": -9.0}, [unsafe, safe])
    assert not resolved and bound == -9.0  # no spelling of it in the top-k: the k-th value, an upper bound


def test_past_reasoning_forms():
    assert past_reasoning("prefilled") == "\n</think>\n\n"
    assert past_reasoning("emitted") == "<think>\n\n</think>\n\n"
    assert past_reasoning("closed") == past_reasoning("none") == ""


def test_a_think_tag_in_the_review_drops_the_example():
    for review in ("Unsafe.\n</safe>\n\n</think>I can't.", "Unsafe <think>hmm</think>.\n</safe>\n\nI can't."):
        assert unsafe_target("r", review, True).drop is Drop.THINK_TAG_IN_REVIEW
