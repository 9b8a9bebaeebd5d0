"""The main job on the embedded reasoning model (its template prefills `<think>\\n`, as R1-Distill's does), end to end
on the real stack: where the verdicts are read, where `<safe>` lands, and what the report says about both."""

from __future__ import annotations

import json
import time

import pytest

from pipelines.datasets import load_all
from pipelines.run import run
from pipelines.stage_store import StageStore
from safetrigger.method import SplitSource, parse_safe, safe_position
from tests.test_stack import make_cfg

pytestmark = pytest.mark.stack

PORT = 8434


@pytest.fixture(scope="module")
def think_stack(tmp_path_factory, data_root, think_model_path):
    import ray
    from ray import serve

    from pipelines.runtime import init_ray, set_threads
    from services.policy import start_policy

    tmp = tmp_path_factory.mktemp("think")
    cfg = make_cfg(tmp, data_root, model={"source": "embedded:smollm2-135m-think", "max_model_len": 1024,
                                          "reasoning": {"fallback": "none"}},
                   serving={"http_port": PORT}, generation={"max_tokens": 96},
                   # make_cfg trains on one Ray Train worker (tests/conftest.py: TRAIN_ONE_WORKER)
                   dpo={"max_tokens": 64})
    set_threads(1)
    init_ray(cfg)
    t = time.monotonic()
    endpoint = start_policy(cfg, think_model_path)
    print(f"think policy ready in {time.monotonic() - t:.0f}s")
    yield cfg, endpoint, tmp
    serve.shutdown()
    ray.shutdown()


@pytest.mark.timeout(1800)  # a whole main job: ~620 s on a 2-core AVX2 EPYC, CI machines are slower
def test_main_job_on_the_think_model(think_stack, capsys):
    from pipelines.chat import load_tokenizer
    from pipelines.judge import judge_prompt_ids
    from pipelines.review import needs_review, plan_review_rows
    from pipelines.rows import Judgement, Review, Trajectory

    cfg, ep, tmp = think_stack
    summary = run(cfg, endpoint=ep)
    out = capsys.readouterr().out
    tok = load_tokenizer(ep.model_path)
    queries = {q.id: q for q in load_all(cfg.data)}
    generated = StageStore(summary["stages"]["generate"], row=Trajectory).read()  # a real run's rows, typed
    sources = [g.split_source for g in generated]
    print({s: sources.count(s) for s in set(sources)})
    assert sources.count(SplitSource.PREFILLED_THINK.value) >= len(generated) // 2  # it reasons, then answers
    assert set(sources) <= {SplitSource.PREFILLED_THINK.value, SplitSource.UNCLOSED_THINK.value}
    # the verdict is read after a closed think block, never at the first token of the reasoning
    g = generated[0]
    assert tok.decode(judge_prompt_ids(tok, cfg, g.prompt, g.reasoning)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nAnswer:")
    judged = StageStore(summary["stages"]["judge"], row=Judgement).read()
    assert sum(j.resolved for j in judged) >= 0.8 * len(judged)
    assert "judge health" in out
    # the self-review opens <safe> after the reasoning; every tagged SFT target has it after `</think>`
    todo = [t for t in generated if needs_review(t)]
    assert all(tok.decode(r["prompt_ids"]).endswith("<think>\n\n</think>\n\n<safe>\n1. Is the core question safe?")
               for r in plan_review_rows(todo[:3], cfg, ep.model_path, {t.query_id: "1. Is the core question safe?"
                                                                       for t in todo[:3]}))
    examples = [json.loads(line) for line in open(summary["stages"]["sft_data"])]
    tagged = [e for e in examples if e["tagged"]]
    assert examples and all(e["prompt"].endswith("<|im_start|>assistant\n<think>\n") for e in examples)
    assert all(safe_position(e["completion"], opened=True) == "after_think" for e in tagged)
    # a review holding a think tag (this 135M model often closes its reasoning in place of a review part) is
    # dropped with its reason, never trained on
    reviews = StageStore(summary["stages"]["review"], row=Review).read()
    with_tag = {r.query_id for r in reviews if "think>" in r.review}
    assert not with_tag & {e["query_id"] for e in examples}
    dropped = summary["sft_data"]["dropped"]
    assert (sum(v for k, v in dropped.items() if k.endswith("/think_tag_in_review")) > 0) == bool(with_tag)
    assert all("</think>" in e["completion"] and not parse_safe(e["completion"]).triggered
               for e in examples if not e["tagged"])  # general targets keep their reasoning, untouched
    assert summary["sft_data"]["safe_position"] == ({"after_think": len(tagged)} if tagged else {})
    # the report: incomplete answers counted apart, judge health, and where <safe> sits per model
    report = summary["report"]
    metrics = json.load(open(report["metrics"]))
    assert {m["model"] for m in metrics["suites"] if m["metric"] == "incomplete"} == {"base", "ST-S", "ST-D"}
    import pyarrow.parquet as pq

    recs = pq.read_table(report["records"]).to_pylist()
    for model, trig in metrics["trigger"].items():
        placed = [r for r in recs if r["model"] == model and r["safe_position"] in ("after_think", "not_after_think")]
        assert trig["safe_after_think"]["n"] == len(placed)
        assert trig["safe_after_think"]["k"] == sum(r["safe_position"] == "after_think" for r in placed)
        print(f"{model}: <safe> after </think> in {trig['safe_after_think']['k']}/{trig['safe_after_think']['n']}")
    assert all(r["incomplete"] == "reasoning_cut_off" for r in recs if r["safe_position"] == "none"
               and "</think>" not in r["response"])
    html = open(report["html"]).read()
    assert "`<safe>` after `</think>`" in open(report["markdown"]).read() and "Judge health" in html
    assert len(queries) == summary["queries"]
