"""Experiment tracking on a real MLflow store (sqlite, as the embedded default): the run, its stages, training
steps, the report's numbers, registered adapter versions with their decision, card and alias."""

import json

from mlflow import MlflowClient

from pipelines.tracking import PRODUCTION, Tracker, flat_params, model_card, report_metrics
from safetrigger.config import load_config

from .conftest import REPO, tiny_adapter

METRICS = {
    "suites": [{"model": "base", "suite": "harmful", "metric": "asr", "judge": "refusal", "k": 9, "n": 10, "rate": 0.9,
                "ci95": [0.6, 0.98]},
               {"model": "ST-D", "suite": "harmful", "metric": "asr", "judge": "refusal", "k": 3, "n": 10, "rate": 0.3,
                "ci95": [0.1, 0.6]}],
    "comparisons": {"ST-D": [{"suite": "harmful", "metric": "asr", "judge": "refusal", "base": 0.9, "candidate": 0.3,
                              "delta": {"value": -0.6, "lo": -0.9, "hi": -0.3, "n": 10}}]},
    "trigger": {"ST-D": {"recall": 0.8, "false_alarm": 0.05, "precision": 0.9}},
}


def test_a_main_jobs_tracking_run_holds_what_people_compare(tmp_path):
    cfg = load_config(REPO / "configs" / "embedded.yaml", {"output_dir": str(tmp_path / "run"), "name": "demo"})
    out = tmp_path / "run"
    out.mkdir()
    lines = []
    tracker = Tracker(cfg, out, lines.append)
    tracker.params({"harmful/train": 46})
    tracker.stage("generate", "abc123", {"seconds": 12.5, "rows": 300, "completion_tokens": 4000})
    log = tracker.step_logger("dpo-adapter")
    for step in (1, 2, 3):
        log(step, {"loss": 1.0 / step, "rewards/margins": 0.1 * step, "tokens_per_s": 40.0, "nan": float("nan")})
    adapter = tiny_adapter(tmp_path / "st-d-adapter")
    tracker.stage("dpo-adapter", "def456", {"seconds": 30.0, "train_loss": 0.4}, adapter)
    tracker.register("st-d", 1, "dpo-adapter", "def456", adapter)
    (out / "report").mkdir()
    (out / "report" / "metrics.json").write_text(json.dumps(METRICS))
    (out / "report" / "report.html").write_text("<html></html>")
    decision = {"candidate": "st-d", "promote": True, "reasons": []}
    card = model_card("st-d", cfg, "def456", METRICS, {"queries": 300, "sft_data": {"kept": {"harmful": 40}},
                                                       "dpo_pairs": {"per_kind": {"jailbreak": {"pairs": 12}}}}, decision)
    tracker.evaluation(out / "report" / "metrics.json", out / "report", [decision], {"name": "st-d", "version": 1},
                       {"st-d": card})
    tracker.finish()
    assert not [ln for ln in lines if "stopped" in ln], lines

    client = MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri)
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"  # beside the run: runs of other configs join it
    exp = client.get_experiment_by_name("safe-trigger")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its training runs
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "demo")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["review.mode"] == "structured" and parent.data.params["data.count.harmful/train"] == "46"
    assert parent.data.metrics["ST-D/harmful/asr/refusal"] == 0.3
    assert parent.data.metrics["change/ST-D/harmful/asr/refusal/ci_hi"] == -0.3
    assert parent.data.metrics["trigger/ST-D/false_alarm"] == 0.05
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"generate", "dpo-adapter"}
    assert children["generate"].data.metrics["rows"] == 300
    assert children["generate"].data.tags["safe_trigger.stage_key"] == "abc123"
    steps = client.get_metric_history(children["dpo-adapter"].info.run_id, "rewards/margins")
    assert [(m.step, round(m.value, 3)) for m in steps] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert not client.get_metric_history(children["dpo-adapter"].info.run_id, "nan")
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "report")} == {"report/metrics.json", "report/report.html"}
    assert {f.path for f in client.list_artifacts(children["dpo-adapter"].info.run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    version = client.get_model_version_by_alias("policy-st-d", PRODUCTION)
    assert str(version.version) == "1" and version.tags["safe_trigger.gate"] == "pass"
    assert version.tags["safe_trigger.registry_version"] == "1" and version.run_id == children["dpo-adapter"].info.run_id
    assert "| harmful | asr | refusal | 90.0% | 30.0% | -60.0 pp [-90.0, -30.0] |" in version.description
    assert "**promoted**" in version.description and "`embedded:smollm2-135m-instruct`" in version.description


def test_a_store_that_fails_costs_the_run_nothing(tmp_path, monkeypatch):
    """A tracking server that is down is said once; the pipeline goes on and every later call is a no-op."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default backs off for minutes
    cfg = load_config(REPO / "configs" / "embedded.yaml", {"tracking.uri": "http://127.0.0.1:9"})
    lines = []
    tracker = Tracker(cfg, tmp_path, lines.append)
    tracker.stage("generate", "k", {"seconds": 1.0})
    tracker.finish()
    assert len([ln for ln in lines if ln.startswith("[tracking] stopped")]) == 1


def test_a_model_card_shows_an_unmeasured_number_as_a_dash():
    """metrics.json writes a suite with no examples as null: the card (and so the run) must not fail on it."""
    cfg = load_config(REPO / "configs" / "embedded.yaml")
    unmeasured = {"comparisons": {"ST-S": [{"suite": "general", "metric": "accuracy", "judge": "exact_match", "base": None,
                                            "candidate": None, "delta": {"value": None, "lo": None, "hi": None, "n": 0}}]}}
    card = model_card("st-s", cfg, "k", unmeasured, {}, None)
    assert "| general | accuracy | exact_match | – | – | – |" in card and "gate: not decided" in card


def test_each_rounds_card_counts_the_pairs_its_own_round_trained_on():
    cfg = load_config(REPO / "configs" / "embedded.yaml")
    pairs = lambda n: {"per_kind": {"jailbreak": {"pairs": n}}}  # noqa: E731
    summary = {"dpo_pairs": pairs(12),
               "dpo_rounds": [{"round": 1, "pairs": pairs(12)}, {"round": 2, "pairs": pairs(5)}]}
    assert "DPO pairs 12\n" in model_card("st-d", cfg, "k", {}, summary, None)
    assert "DPO pairs 5\n" in model_card("st-d-r2", cfg, "k", {}, summary, None)
    assert "DPO pairs 0\n" in model_card("st-d-r3", cfg, "k", {}, summary, None)  # a round that trained nothing


def test_params_and_metrics_flatten_the_config_and_the_report():
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}
    m = report_metrics(METRICS)
    assert m["base/harmful/asr/refusal"] == 0.9 and m["base/harmful/asr/refusal/ci_lo"] == 0.6
    assert m["change/ST-D/harmful/asr/refusal"] == -0.6 and m["trigger/ST-D/recall"] == 0.8


def test_runs_and_compare_read_the_store(tmp_path, capsys):
    from apps.cli import main

    out = tmp_path / "runs"
    for name, rate in (("before", 0.9), ("after", 0.4)):
        cfg = load_config(REPO / "configs" / "embedded.yaml", {"output_dir": str(out / name), "name": name})
        (out / name / "report").mkdir(parents=True)
        metrics = {**METRICS, "suites": [{**METRICS["suites"][1], "rate": rate}]}
        (out / name / "report" / "metrics.json").write_text(json.dumps(metrics))
        t = Tracker(cfg, out / name, lambda s: None)
        t.evaluation(out / name / "report" / "metrics.json", out / name / "report", [], None, {})
        t.finish()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert main(["runs", "--uri", uri]) == 0
    table = capsys.readouterr().out
    assert table.index("| after |") < table.index("| before |") and "| 40.0% |" in table  # newest first
    assert main(["compare", "before", "after", "--uri", uri]) == 0
    text = capsys.readouterr().out
    assert "| ST-D/harmful/asr/refusal | 0.9000 [0.1000, 0.6000] | 0.4000 [0.1000, 0.6000] | -0.5000 |" in text
    assert main(["compare", "before", "nope", "--uri", uri]) == 1
    assert "no run 'nope'" in capsys.readouterr().err
