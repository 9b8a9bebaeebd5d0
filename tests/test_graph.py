"""The declared stage graph: keys kept bit-for-bit with the stores earlier versions wrote, inputs declared before
use, skips that propagate, and the runner's store handling (a finished stage is read, not redone)."""

from dataclasses import dataclass

import pytest

from pipelines.graph import Job, Skip, Stage, compute_keys, mermaid, run_stages, stage_paths
from pipelines.stages import QUERIES, main_graph
from safetrigger.config import load_config

from .conftest import REPO

# Computed by the pre-graph `pipelines/run.py` (hand-written key recipes) for configs/embedded.yaml (frozen in
# tests/fixtures/key-recipes.yaml) with these overrides: a store written by that code must be found by this one.
# Except the eval-judge stages: they judge only the ASR suites' answers now (`pipelines.evaluate.suite_selected`) and
# their keys hash those suites' filters, so a store of verdicts on every answer is judged anew (new pins below).
PINNED = {
    "float32": {"override": {"model.dtype": "float32"}, "queries": "29245d43ddd3", "keys": {
        "generate": "e052b7359531", "judge": "02abed58257e", "review": "4374ef4f85fc", "sft-data": "b56bebb1db79",
        "sft-adapter": "14b47789c506", "eval-st-s": "475836efa88f", "dpo-sample": "8234a66f735a",
        "dpo-judge": "01d3de54c2dc", "dpo-pairs": "e4390daed2eb", "dpo-adapter": "664b0cc393d4",
        "eval-st-d": "e4911210cb23", "eval-judge-self-base": "b7e6d45e210b", "eval-judge-self-st-s": "e26242133f06",
        "eval-judge-self-st-d": "363e290bdb87"}},
    "bfloat16": {"override": {"model.dtype": "bfloat16", "dpo.delta": 0.3, "judge.threshold": 0.5},
                 "queries": "29245d43ddd3", "keys": {
        "generate": "e594fcf870ff", "judge": "a99b2bd46949", "review": "f2703cee549c", "sft-data": "bbf6ea31aeac",
        "sft-adapter": "0bc0dac8fd12", "eval-st-s": "4f3c6ed58401", "dpo-sample": "6dc62b5faf70",
        "dpo-judge": "5714c4d342b7", "dpo-pairs": "b4fdbed30220", "dpo-adapter": "3c05addf91d4",
        "eval-st-d": "d368399162f2", "eval-judge-self-base": "4bb9376af2a2", "eval-judge-self-st-s": "94acf1c2f685",
        "eval-judge-self-st-d": "cd3c4b67f028"}},
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_keys_equal_the_hand_written_recipes_of_earlier_runs(case, data_root, monkeypatch):
    from pipelines.datasets import load_all
    from pipelines.run import queries_key
    from safetrigger.method import sft

    monkeypatch.setattr(sft, "RULES_VERSION", 1)  # the SFT rules those runs built their data under

    pinned = PINNED[case]
    cfg = load_config(REPO / "tests" / "fixtures" / "key-recipes.yaml", {**pinned["override"], "data.root": str(data_root)})
    assert queries_key(load_all(cfg.data)) == pinned["queries"]
    keys = compute_keys(main_graph(cfg), cfg, {QUERIES: pinned["queries"]})
    assert {k: keys[k] for k in pinned["keys"]} == pinned["keys"]


def _cfg():
    return load_config(REPO / "configs" / "embedded.yaml")


def test_a_rebuilt_think_model_keys_every_stage_anew(monkeypatch):
    """The think model is rebuilt under the same name when its recipe changes: a run directory holding results
    of the old build must not hand them to the new one."""
    from safetrigger import think_model

    cfg = load_config(REPO / "configs" / "embedded-think.yaml")
    before = compute_keys(main_graph(cfg), cfg, {QUERIES: "q"})
    monkeypatch.setattr(think_model, "recipe_id", lambda spec=None: "another-recipe")
    after = compute_keys(main_graph(cfg), cfg, {QUERIES: "q"})
    assert all(before[s] != after[s] for s in before if s != QUERIES)


@dataclass
class _Row:
    query_id: str
    completion_tokens: int


def _rows(name):
    def run(job, results, store):
        store.commit([{"query_id": f"{name}-{i}", "completion_tokens": 3} for i in range(2)])
        job.calls.append(name)
        return store.read()

    return run


def _stage(name, inputs, key, run):
    return Stage(name, inputs, key, run, row=_Row)


def test_a_rows_stage_declares_its_row_type_and_reads_its_rows_back_as_it(tmp_path):
    with pytest.raises(TypeError, match="declares its row type"):
        Stage("a", (QUERIES,), lambda c, k: ("a",), _rows("a"))
    with pytest.raises(TypeError, match="only a rows stage"):
        Stage("a", (QUERIES,), lambda c, k: ("a",), _rows("a"), output="jsonl", row=_Row)
    stages = [_stage("a", (QUERIES,), lambda c, k: ("a", k[QUERIES]), _rows("a"))]
    keys = compute_keys(stages, _cfg(), {QUERIES: "q"})
    first = run_stages(stages, _job(tmp_path), keys, {})
    again = run_stages(stages, _job(tmp_path), keys, {})  # finished earlier: read back from the store
    assert first["a"] == again["a"] == [_Row("a-0", 3), _Row("a-1", 3)]


class _Job(Job):
    calls: list


def _job(tmp_path):
    job = _Job(_cfg(), tmp_path, [], "", lambda: None, emit=lambda s: None)
    job.calls = []
    return job


def test_a_recipe_may_read_only_its_declared_inputs():
    stages = [_stage("a", (QUERIES,), lambda c, k: ("a", k[QUERIES]), _rows("a")),
              _stage("b", ("a",), lambda c, k: ("b", k[QUERIES]), _rows("b"))]
    with pytest.raises(KeyError, match="'b' reads the key of 'queries'"):
        compute_keys(stages, _cfg(), {QUERIES: "q"})


def test_an_input_must_be_declared_before_its_reader():
    stages = [_stage("b", ("a",), lambda c, k: ("b", k["a"]), _rows("b")),
              _stage("a", (QUERIES,), lambda c, k: ("a", k[QUERIES]), _rows("a"))]
    with pytest.raises(ValueError, match=r"stage 'b' reads \['a'\]"):
        compute_keys(stages, _cfg(), {QUERIES: "q"})


def test_keys_chain_through_inputs():
    stages = [_stage("a", (QUERIES,), lambda c, k: ("a", k[QUERIES]), _rows("a")),
              _stage("b", ("a",), lambda c, k: ("b", k["a"]), _rows("b"))]
    one, two = compute_keys(stages, _cfg(), {QUERIES: "q1"}), compute_keys(stages, _cfg(), {QUERIES: "q2"})
    assert one["a"] != two["a"] and one["b"] != two["b"]


def test_a_finished_stage_is_read_back_not_run_again(tmp_path):
    stages = [_stage("a", (QUERIES,), lambda c, k: ("a", k[QUERIES]), _rows("a"))]
    keys = compute_keys(stages, _cfg(), {QUERIES: "q"})
    job = _job(tmp_path)
    first = run_stages(stages, job, keys, {QUERIES: []})
    second = run_stages(stages, job, keys, {QUERIES: []})
    assert job.calls == ["a"] and first["a"] == second["a"] and len(first["a"]) == 2
    assert [t["stage"] for t in job.stage_times] == ["a", "a"] and "a_s" in job.timings
    assert stage_paths(stages, tmp_path, keys) == {"a": str(tmp_path / f"a-{keys['a']}")}


def test_a_stage_that_starts_the_policy_is_timed_without_the_start(tmp_path):
    """The first stage to call `job.policy()` starts it; that start is `serve_start_s`, not the stage's time."""
    import time

    job = _job(tmp_path)

    def start_policy():
        time.sleep(0.6)
        job.timings["serve_start_s"] = 0.6

    def run(job, results, store):
        job.policy()
        return _rows("a")(job, results, store)

    job.policy = start_policy
    stages = [_stage("a", (QUERIES,), lambda c, k: ("a",), run)]
    run_stages(stages, job, compute_keys(stages, _cfg(), {QUERIES: "q"}), {QUERIES: []})
    assert 0 <= job.timings["a_s"] < 0.3 and job.stage_times[0]["seconds"] == job.timings["a_s"]


def test_a_skip_propagates_to_readers_with_its_reason(tmp_path):
    lines = []
    stages = [_stage("a", (QUERIES,), lambda c, k: ("a",), lambda job, r, store: Skip("nothing to sample")),
              _stage("b", ("a",), lambda c, k: ("b", k["a"]), _rows("b")),
              _stage("c", (QUERIES,), lambda c, k: ("c",), _rows("c"))]
    job = _job(tmp_path)
    job.emit = lines.append
    results = run_stages(stages, job, compute_keys(stages, _cfg(), {QUERIES: "q"}), {QUERIES: []})
    assert results["a"] == results["b"] == Skip("nothing to sample") and job.calls == ["c"]
    assert [ln for ln in lines if "skipped" in ln] == ["[a] skipped: nothing to sample"]  # once, where it began
    assert not list(tmp_path.glob("a-*/_DONE.json"))  # a skipped stage is not marked finished


def test_without_sft_the_main_graph_asks_the_policy_nothing_for_the_review_and_what_reads_it(tmp_path):
    """The review's blocks and answers are SFT targets: with SFT off, the review and SFT data are skipped with the
    reason, before any request, and the stages that do not read them still run."""
    cfg = load_config(REPO / "configs" / "embedded.yaml", {"sft.enabled": False, "dpo.enabled": False})
    graph = {s.name: s for s in main_graph(cfg)}
    stages = [graph["review"], graph["sft-data"], graph["sft-adapter"],
              _stage("report-input", ("generate",), lambda c, k: ("r", k["generate"]), _rows("report-input"))]
    lines = []

    def no_policy():
        raise AssertionError("the policy was asked for")

    job = _Job(cfg, tmp_path, [], "", no_policy, emit=lines.append)
    job.calls = []
    keys = compute_keys(stages, cfg, {QUERIES: "q", "generate": "g", "judge": "j"})
    results = run_stages(stages, job, keys, {QUERIES: [], "generate": [], "judge": []})
    assert all(isinstance(results[s], Skip) for s in ("review", "sft-data", "sft-adapter")), results
    assert job.calls == ["report-input"]
    assert [ln for ln in lines if "skipped" in ln] == [
        "[review] skipped: sft.enabled is false: the review's blocks and answers are SFT targets, nothing else reads them"]


def test_the_main_graph_declares_every_stage_once_and_draws_it():
    stages = main_graph(_cfg())
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    assert names[:11] == ["generate", "judge", "review", "sft-data", "sft-adapter", "eval-st-s", "dpo-sample",
                          "dpo-judge", "dpo-pairs", "dpo-adapter", "eval-st-d"]
    assert {s.publish for s in stages if s.output == "adapter"} == {"st-s", "st-d"}
    drawing = mermaid(stages, (QUERIES,))
    assert all(f"{s.name}<br/>" in drawing for s in stages) and "sft_adapter --> eval_st_s" in drawing


def test_self_selection_adds_its_judge_stage_and_keys_everything_it_changes():
    """Off: the graph and keys of earlier runs (the pins above). On: the review key follows the candidate count
    only, and every stage the choice of judges changes (the judge stage, SFT data, ST-S and all after it) is
    keyed anew, so a run with other judges never reuses an adapter trained on another selection."""
    plain = load_config(REPO / "configs" / "embedded.yaml", {"review.candidates": 1, "review.select_judges": [],
                                                             "review.answer_temperature": None})
    selves = [{"name": "self", "type": "policy"}]
    one = load_config(REPO / "configs" / "embedded.yaml", {"review.candidates": 3, "review.select_judges": selves})
    two = load_config(REPO / "configs" / "embedded.yaml", {
        "review.candidates": 3, "review.select_judges": [*selves, {"name": "refusal", "type": "refusal"}]})
    assert "review-judge" not in [s.name for s in main_graph(plain)]
    names = [s.name for s in main_graph(one)]
    assert names.index("review") < names.index("review-judge") < names.index("sft-data")
    k0, k1, k2 = (compute_keys(main_graph(c), c, {QUERIES: "q"}) for c in (plain, one, two))
    assert k1["review"] == k2["review"] != k0["review"]
    keep = load_config(REPO / "configs" / "embedded.yaml", {"review.candidates": 3, "review.select_judges": selves,
                                                            "review.when_none_safe": "first"})
    k3 = compute_keys(main_graph(keep), keep, {QUERIES: "q"})
    assert k3["review"] == k1["review"] and all(k3[s] != k1[s] for s in ("review-judge", "sft-data", "sft-adapter"))
    assert all(k1[s] != k2[s] for s in ("review-judge", "sft-data", "sft-adapter", "eval-st-s", "dpo-adapter"))
    assert k1["generate"] == k2["generate"] == k0["generate"] and k1["judge"] == k0["judge"]
    assert "review --> review_judge" in mermaid(main_graph(one), (QUERIES,))


NO_VERDICTS = {"review.answer_opener": None, "review.verdict_word": None}


def test_an_answer_opener_makes_the_review_read_the_self_judge_and_keys_what_it_changes():
    """Without an opener or verdict word the review reads only the trajectories (the pins above); with either it
    follows the self-judge's verdicts, so a changed judge, opener or word re-keys the review and what trains on it."""
    cfg = load_config(REPO / "configs" / "embedded.yaml", NO_VERDICTS)
    a = load_config(REPO / "configs" / "embedded.yaml", {**NO_VERDICTS, "review.answer_opener": "I can't help with that."})
    b = load_config(REPO / "configs" / "embedded.yaml", {**NO_VERDICTS, "review.answer_opener": "I won't do that."})
    w = load_config(REPO / "configs" / "embedded.yaml", {**NO_VERDICTS, "review.verdict_word": "No,"})
    aw = load_config(REPO / "configs" / "embedded.yaml", {"review.answer_opener": "I can't help with that.",
                                                          "review.verdict_word": "No,"})
    for c in (a, w, aw):
        assert {s.name: s for s in main_graph(c)}["review"].inputs == ("generate", "judge")
    assert {s.name: s for s in main_graph(cfg)}["review"].inputs == ("generate",)
    keys = [compute_keys(main_graph(c), c, {QUERIES: "q"}) for c in (cfg, a, b, w, aw)]
    assert len({k["generate"] for k in keys}) == 1 and len({k["judge"] for k in keys}) == 1
    assert all(len({k[s] for k in keys}) == len(keys) for s in ("review", "sft-data", "sft-adapter", "dpo-adapter"))
    judged = load_config(REPO / "configs" / "embedded.yaml", {**NO_VERDICTS, "review.answer_opener": "I can't help with that.",
                                                               "judge.unsafe_option": "Unsafe", "judge.safe_option": "Safe"})
    assert compute_keys(main_graph(judged), judged, {QUERIES: "q"})["review"] != keys[1]["review"]


def test_a_change_of_the_sft_rules_rekeys_the_sft_data_and_everything_trained_on_it(monkeypatch):
    from safetrigger.method import sft

    cfg = load_config(REPO / "configs" / "embedded.yaml")
    now = compute_keys(main_graph(cfg), cfg, {QUERIES: "q"})
    monkeypatch.setattr(sft, "RULES_VERSION", sft.RULES_VERSION + 1)
    later = compute_keys(main_graph(cfg), cfg, {QUERIES: "q"})
    assert [s for s in now if now[s] != later[s]] == [
        s for s in now if s in ("sft-data", "sft-adapter") or s.startswith(("eval-st-s", "eval-st-d", "eval-judge-self-st",
                                                                            "dpo-"))]
    assert now["review"] == later["review"] and now["eval-judge-self-base"] == later["eval-judge-self-base"]


def test_the_eval_judges_are_rekeyed_by_the_suites_that_select_what_they_judge():
    """A judge stage judges the answers its metric's suites select: another filter there re-judges (else verdicts
    would be missing for rows the new suite reads), a renamed suite does not."""
    from safetrigger.config import SuiteConfig

    cfg = load_config(REPO / "configs" / "embedded.yaml", {"eval.xstest_judge": {"name": "xstest", "type": "policy", "format": "xstest"}})

    def keys_with(change):
        suites = [SuiteConfig.model_validate(change(s.model_dump())) for s in cfg.eval.suites]
        other = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"suites": suites})})
        return compute_keys(main_graph(other), other, {QUERIES: "q"})

    now = keys_with(lambda s: s)

    def another_source(metric):
        return lambda s: {**s, "sources": s["sources"] + ["another"]} if s["metric"] == metric else s

    judges = {s for s in now if s.startswith("eval-judge-self-")}
    xstest = {s for s in now if s.startswith("eval-judge-xstest-")}
    assert len(judges) == len(xstest) == 3
    later = keys_with(another_source("asr"))
    assert {s for s in now if now[s] != later[s]} == judges
    later = keys_with(another_source("over_refusal"))
    assert {s for s in now if now[s] != later[s]} == xstest
    assert keys_with(lambda s: {**s, "name": s["name"] + "x"}) == now


def test_until_runs_a_stage_and_only_what_it_reads():
    from pipelines.graph import UnknownStageError, upstream_of

    cfg = load_config(REPO / "configs" / "embedded.yaml")
    graph = main_graph(cfg)
    assert [s.name for s in upstream_of(graph, "generate")] == ["generate"]
    # the review reads the self-judge's verdicts: they decide where its answer opener goes (review.answer_opener)
    assert [s.name for s in upstream_of(graph, "sft-adapter")] == ["generate", "judge", "review", "sft-data", "sft-adapter"]
    plain = load_config(REPO / "configs" / "embedded.yaml", NO_VERDICTS)
    assert [s.name for s in upstream_of(main_graph(plain), "sft-adapter")] == ["generate", "review", "sft-data", "sft-adapter"]
    dpo = {s.name for s in upstream_of(graph, "dpo-adapter")}
    assert {"dpo-sample", "dpo-judge", "dpo-pairs", "sft-adapter"} <= dpo and not any(n.startswith("eval") for n in dpo)
    order = [s.name for s in graph]
    assert [s.name for s in upstream_of(graph, "dpo-adapter")] == [n for n in order if n in dpo]  # declaration order
    with pytest.raises(UnknownStageError, match="no stage 'sft'.*generate, judge"):
        upstream_of(graph, "sft")


def test_dpo_rounds_chain_each_round_on_the_last_and_leave_round_one_alone():
    from pipelines.evaluate import candidate_order
    from pipelines.stages import dpo_round_pool, evaluated

    cfg = _cfg()
    two = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"rounds": 3})})
    names = [s.name for s in main_graph(two)]
    assert [n for n in names if n.endswith("-r3")] == ["dpo-sample-r3", "dpo-judge-r3", "dpo-pairs-r3",
                                                       "dpo-adapter-r3", "eval-st-d-r3", "eval-judge-self-st-d-r3"]
    by = {s.name: s for s in main_graph(two)}
    assert by["dpo-sample-r2"].inputs[0] == "dpo-adapter" and by["dpo-adapter-r3"].inputs == ("dpo-pairs-r3", "dpo-adapter-r2")
    assert by["dpo-adapter-r2"].publish == "st-d-r2"
    assert [m for m, *_ in evaluated(two)] == ["base", "ST-S", "ST-D", "ST-D r2", "ST-D r3"]
    assert candidate_order(two) == ["st-d-r3", "st-d-r2", "st-d", "st-s"]
    one, three = compute_keys(main_graph(cfg), cfg, {QUERIES: "q"}), compute_keys(main_graph(two), two, {QUERIES: "q"})
    same = {n for n in one if one[n] == three.get(n)}
    # everything before DPO keeps its key; round 1's sampling now covers only its share, so it and its readers move
    assert {"generate", "judge", "review", "sft-adapter", "eval-st-s"} <= same and "dpo-sample" not in same

    from safetrigger.method import Query

    qs = [Query(id=f"q{i}", kind="jailbreak", label="unsafe", prompt=f"p{i}", source="s", split_key=f"goal {i // 2}",
                split="dpo") for i in range(60)]
    shares = [dpo_round_pool(qs, r, 3) for r in (1, 2, 3)]
    assert all(shares) and sorted(q.id for sh in shares for q in sh) == sorted(q.id for q in qs)  # disjoint, all
    for sh in shares:  # an attack and its plain request in one round
        assert all(any(o.split_key == q.split_key for o in sh) for q in qs if q in sh)
    assert {q.split_key for q in shares[0]}.isdisjoint({q.split_key for q in shares[1]})
    assert dpo_round_pool(qs, 1, 1) == qs


def test_general_pairs_from_the_sft_split_add_its_general_queries_to_the_dpo_pool_and_rekey_dpo():
    """`dpo.general_pool: train` samples the SFT split's general queries as well (the trigger's false alarms on
    prompts SFT kept), never its unsafe ones nor the eval split; the pool change re-keys DPO and nothing before it."""
    from safetrigger.method import Query
    from pipelines.stages import dpo_round_pool

    qs = [Query(id=f"{split}-{kind}", kind=kind, label="safe" if kind == "general" else "unsafe", prompt=f"{split} {kind}",
                source="s", split_key=f"{split} {kind}", split=split)
          for split in ("train", "dpo", "eval") for kind in ("general", "harmful", "jailbreak")]
    assert {q.id for q in dpo_round_pool(qs, 1, 1)} == {"dpo-general", "dpo-harmful", "dpo-jailbreak"}
    assert {q.id for q in dpo_round_pool(qs, 1, 1, general_from_train=True)} == {
        "dpo-general", "dpo-harmful", "dpo-jailbreak", "train-general"}
    cfg = _cfg()
    cfg = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"general_pool": "dpo"})})
    wide = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"general_pool": "train"})})
    a, b = compute_keys(main_graph(cfg), cfg, {QUERIES: "q"}), compute_keys(main_graph(wide), wide, {QUERIES: "q"})
    assert {n for n in a if a[n] != b[n]} == {n for n in a if n.startswith(("dpo-", "eval-st-d", "eval-judge-self-st-d"))}
