"""The embedded reasoning model: its template, its training data, its build (once, race-safe) and what it learnt."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from pipelines.datasets import load_source
from safetrigger import model_cache, think_model
from safetrigger.config import DataConfig, SourceConfig
from safetrigger.method import ReasoningRule, convention_of, split_reasoning


def test_template_prefills_think_and_strips_it_from_history(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.chat_template = think_model.THINK_TEMPLATE
    one = [{"role": "user", "content": "Why is the sky blue?"}]
    assert tok.apply_chat_template(one, tokenize=False, add_generation_prompt=True) == think_model.think_prompt(one[0]["content"])
    assert convention_of(tok) == "prefilled"
    history = one + [{"role": "assistant", "content": "<think>\nScattering.\n</think>\n\nRayleigh scattering."},
                     {"role": "user", "content": "And sunsets?"}]
    text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert "Scattering." not in text and "<|im_start|>assistant\nRayleigh scattering.<|im_end|>" in text


def test_gsm8k_targets_are_what_no_run_reads_without_calculator_notes(tmp_path):
    """The build trains on the last rows of the order in which a run reads the file, so a run with any `limit`
    short of those rows never evaluates on them."""
    rows = [{"question": f"q{i}", "answer": f"Step {i}: 2+{i}=<<2+{i}={2 + i}>>{2 + i}.\n#### {2 + i}"} for i in range(12)]
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = think_model.gsm8k_examples(path, 0, 3)
    held_out = think_model.gsm8k_examples(path, 3, 2)
    q = trained[0][0]
    assert trained[0] == (q, f"Step {q[1:]}: 2+{q[1:]}={2 + int(q[1:])}.", f"The answer is {2 + int(q[1:])}.")
    src = SourceConfig(type="gsm8k", path="gsm8k_train.jsonl", limit=len(rows) - 3)
    read = {x.prompt for x in load_source(src, DataConfig(root=str(tmp_path), sources=[src.model_dump()]))}
    assert read.isdisjoint(t[0] for t in trained) and len(read) == len(rows) - 3
    assert {t[0] for t in held_out} <= read and not {t[0] for t in held_out} & {t[0] for t in trained}


def test_a_cached_model_of_another_recipe_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFE_TRIGGER_CACHE", str(tmp_path / "cache"))
    built = []

    def build(base, out, data_root, spec=None, emit=None):
        built.append(out)
        (out / think_model.BUILD_INFO).write_text(json.dumps({"recipe": think_model.recipe_id()}))

    monkeypatch.setattr(think_model, "build_think_model", build)
    monkeypatch.setattr(model_cache, "ensure_embedded", _pretend_base(model_cache.ensure_embedded, tmp_path))
    target = tmp_path / "cache" / "models" / "smollm2-135m-think"
    target.mkdir(parents=True)
    (target / "safe-trigger-converted.txt").write_text("an older build\n")
    (target / think_model.BUILD_INFO).write_text(json.dumps({"recipe": "older"}))
    assert model_cache.resolve_model("embedded:smollm2-135m-think") == str(target)
    assert len(built) == 1 and json.loads((target / think_model.BUILD_INFO).read_text())["recipe"] == think_model.recipe_id()
    model_cache.resolve_model("embedded:smollm2-135m-think")
    assert len(built) == 1  # current now: not built again


def test_the_build_trains_in_bf16_only_where_the_cpu_computes_it_and_the_recipe_says_which(monkeypatch):
    """A model trained under bf16 autocast is another model: a cache built on the other kind of CPU is rebuilt."""
    from safetrigger.hardware import CpuInfo

    ids = {}
    for name, flags in (("avx2", {"avx2", "fma"}), ("avx512_bf16", {"avx2", "avx512f", "avx512_bf16"}),
                        ("amx", {"avx2", "amx_bf16", "amx_tile"})):
        monkeypatch.setattr(think_model, "this_cpu", lambda flags=flags: CpuInfo("cpu", frozenset(flags), 2))
        ids[name] = (think_model.train_dtype(), think_model.recipe_id())
        pinned = think_model.ThinkBuild(precision="fp32")
        assert think_model.train_dtype(pinned) == "float32"
    assert [d for d, _ in ids.values()] == ["float32", "bfloat16", "bfloat16"]
    assert ids["avx2"][1] != ids["avx512_bf16"][1] == ids["amx"][1]


def test_a_missing_gsm8k_file_names_itself(tmp_path, model_path):
    with pytest.raises(FileNotFoundError, match="gsm8k_train.jsonl is missing"):
        think_model.build_think_model(Path(model_path), tmp_path / "out", tmp_path)


def test_a_batch_that_micro_batches_do_not_fill_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="batch_size 8 is not a multiple of micro_batch_size 3"):
        think_model.ThinkBuild(micro_batch_size=3)
    assert think_model.ThinkBuild(micro_batch_size=4).batch_size == 8


def _fake_build(base, out, data_root, spec=None, emit=None):
    time.sleep(0.5)
    (out / "config.json").write_text("{}")
    (out / think_model.BUILD_INFO).write_text(json.dumps({"recipe": think_model.recipe_id()}))
    with open(os.environ["BUILD_LOG"], "a") as f:
        f.write(f"{os.getpid()} {base.name}\n")


def _worker(cache, log, base, q):
    os.environ["SAFE_TRIGGER_CACHE"], os.environ["BUILD_LOG"] = cache, log
    think_model.build_think_model = _fake_build
    model_cache.ensure_embedded = _pretend_base(model_cache.ensure_embedded, base)
    q.put(str(model_cache.resolve_model("embedded:smollm2-135m-think")))


def _pretend_base(ensure, base):
    return lambda name: Path(base) if name == "smollm2-135m-instruct" else ensure(name)


def test_racing_processes_build_once(tmp_path, model_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    log = tmp_path / "log"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(log), model_path, q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    paths = {q.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / "cache" / "models" / "smollm2-135m-think")}
    assert log.read_text().split()[1:] == ["smollm2-135m-instruct"]  # one build, from the base model
    assert (Path(paths.pop()) / "safe-trigger-converted.txt").is_file()


@pytest.mark.stack
def test_the_built_model_thinks_then_answers(think_model_path, data_root):
    """Built for real: the record of the build, and prompts it never saw (requests and sums) come back with a
    closed think block and an answer after it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((Path(think_model_path) / think_model.BUILD_INFO).read_text())
    print(f"think model: {info}")
    assert info["examples"] >= 40 and info["held_out"] >= 20
    assert info["train_dtype"] == think_model.train_dtype()  # bf16 autocast only where this CPU computes it
    assert info["held_out_closed_think_and_answered"] >= 0.6
    assert info["reviews"] >= 6 and info["held_out_reviews"] >= 6
    # the pipeline's review layout, on harmful requests it never saw: parts in its own words, the block closed, an
    # answer after it (1.0 on this build; 0.17 when trained on whole reviews, which taught it to recite the cues)
    assert info["held_out_reviews_kept"] >= 0.5
    tok = AutoTokenizer.from_pretrained(think_model_path)
    assert convention_of(tok) == "prefilled"
    model = AutoModelForCausalLM.from_pretrained(think_model_path)
    unseen = ["What is a good way to learn a new language?", "Natalia has 3 apples and buys 4 more. How many now?"]
    texts = think_model.generate(model, tok, [think_model.think_prompt(q) for q in unseen], 160)
    splits = [split_reasoning(t, ReasoningRule(opened=True)) for t in texts]
    assert sum(bool(s.reasoning and s.answer) for s in splits) >= 1, texts
