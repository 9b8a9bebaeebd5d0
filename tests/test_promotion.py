"""Per-job adapter registries and the operator's promotion (issue 17, finding 3): a job decides only in its own
registry; promotion into the served one is an admin action under the server's gate, decided again on the job's
report. The same report and gate functions the pipeline runs, on a small hand-made evaluation (no Ray)."""

import json

import pytest

from pipelines.evaluate import Model, gate_and_promote
from pipelines.report import write_report
from safetrigger.config import RunConfig
from safetrigger.evaluation.regate import decide_again
from services import adapters, registry
from services.gateway.config import PromotionPolicy
from services.promotion import PromotionRefused, promote_from_job
from tests.conftest import tiny_adapter
from tests.test_report import _records, _result

JOB = "st-0123456789ab"


def _job_run(tmp_path, cand_refuses=5):
    """A gateway job's evaluation: adapters published into its own registry, its gate decided, its report written."""
    cfg = RunConfig.model_validate({
        "name": "tenant", "output_dir": str(tmp_path / "jobs" / JOB / "run"),
        "serving": {"adapter_root": str(tmp_path / "adapters"), "adapter_scope": JOB},
        "data": {"sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}]},
        "eval": {"bootstrap_samples": 200}})
    job_root = adapters.registry_root(cfg.serving.adapter_root, JOB)
    versions = {a: adapters.publish(job_root, a, tiny_adapter(tmp_path / f"src-{a}", a)) for a in ("st-s", "st-d")}
    result, models = _result(cfg, _records(cand_refuses))
    gate_and_promote(result, [Model(m, "" if m == "base" else m.lower(), []) for m in models], cfg, versions, "r.html")
    result.adapters = {"ST-S": "st-s", "ST-D": "st-d"}
    paths = write_report(tmp_path / "jobs" / JOB / "report", result, models, cfg, [])
    return cfg, result, paths["metrics"]


def test_a_job_decides_in_its_own_registry_and_changes_nothing_served(tmp_path):
    cfg, result, _ = _job_run(tmp_path)
    root = cfg.serving.adapter_root
    assert result.decisions[0].candidate == "st-d" and result.decisions[0].promote  # its gate passed it...
    assert result.promoted is None and registry.promoted(root) is None  # ...and nothing is served from it
    assert registry.decisions(root) == [] and adapters.list_current(root) == {}
    job_log = registry.decisions(adapters.registry_root(root, JOB))
    assert [(d["candidate"], d["version"], d["promoted"]) for d in job_log] == [("st-d", 1, False), ("st-s", 1, False)]
    # the replicas find its adapters only under the scoped name, which the gateway's model grammar never accepts
    assert adapters.locate(root, f"{JOB}/st-d") == (adapters.registry_root(root, JOB), "st-d")
    assert adapters.current(*adapters.locate(root, f"{JOB}/st-d"))[0] == 1
    with pytest.raises(adapters.AdapterError):
        adapters.current(root, "st-d")


def test_the_operator_promotes_under_the_servers_gate(tmp_path):
    cfg, result, metrics = _job_run(tmp_path)
    root = cfg.serving.adapter_root
    # the report's numbers decide as the job's own gate did when the rules are the same
    again = decide_again(json.loads(metrics.read_text()), "st-d", cfg.eval.gate.rules(), 1)
    assert again.promote == result.decisions[0].promote
    assert [c.reason for c in again.checks if c.judge != "size"] == [c.reason for c in result.decisions[0].checks]

    strict = PromotionPolicy(min_suite_examples=20)  # the harmful and jailbreak suites hold 5 examples each
    with pytest.raises(PromotionRefused) as e:
        promote_from_job(root, JOB, "st-d", None, metrics, strict, "policy", None, "ops")
    assert e.value.status == 409 and "harmful: asr on 5 examples" in e.value.message and "at least 20" in e.value.message
    assert registry.promoted(root) is None and registry.decisions(root)[-1]["promoted"] is False

    done = promote_from_job(root, JOB, "st-d", None, metrics, PromotionPolicy(min_suite_examples=5), "policy", None, "ops")
    assert done["promoted"]["model"] == "policy:st-d@v1" and done["promoted"]["job"] == JOB
    assert registry.promoted(root)["by"] == "ops" and adapters.list_current(root) == {"st-d": 1}
    served, job_copy = adapters.current(root, "st-d")[1], adapters.current(adapters.registry_root(root, JOB), "st-d")[1]
    assert (served / "adapter_model.safetensors").read_bytes() == (job_copy / "adapter_model.safetensors").read_bytes()
    assert registry.decisions(root)[-1]["promoted"] is True and registry.decisions(root)[-1]["job_version"] == 1


def test_promotion_refuses_what_the_jobs_report_did_not_evaluate(tmp_path):
    cfg, _, metrics = _job_run(tmp_path)
    root, policy = cfg.serving.adapter_root, PromotionPolicy(min_suite_examples=1)
    adapters.publish(adapters.registry_root(root, JOB), "st-d", tiny_adapter(tmp_path / "later", "later"))  # v2
    with pytest.raises(PromotionRefused, match="evaluated no st-d v2") as e:
        promote_from_job(root, JOB, "st-d", None, metrics, policy, "policy", None, "ops")
    assert e.value.status == 409
    for job, adapter, version in ((JOB, "st-x", None), (JOB, "st-d", 7), ("st-ffffffffffff", "st-d", None)):
        with pytest.raises(PromotionRefused) as e:
            promote_from_job(root, job, adapter, version, metrics, policy, "policy", None, "ops")
        assert e.value.status == 404
    with pytest.raises(PromotionRefused, match="no report"):
        promote_from_job(root, JOB, "st-d", 1, None, policy, "policy", None, "ops")
    assert registry.promoted(root) is None


def test_a_failing_candidate_is_refused_with_the_gates_reasons(tmp_path):
    cfg, result, metrics = _job_run(tmp_path, cand_refuses=0)  # ST-S refuses less than the base: ASR rises
    with pytest.raises(PromotionRefused) as e:
        promote_from_job(cfg.serving.adapter_root, JOB, "st-s", None, metrics, PromotionPolicy(min_suite_examples=1),
                         "policy", None, "ops")
    assert e.value.status == 409 and "FAILS" in e.value.message and e.value.decision["promote"] is False
    assert registry.promoted(cfg.serving.adapter_root) is None


@pytest.mark.parametrize("scope", ["../x", "Jobs", "a/b", "", "x" * 65])
def test_registry_scopes_and_the_reserved_name(tmp_path, scope):
    with pytest.raises(adapters.AdapterError):
        adapters.registry_root(tmp_path, scope)
    with pytest.raises(adapters.AdapterError, match="reserved"):
        adapters.publish(tmp_path, adapters.JOBS_DIR, tiny_adapter(tmp_path / "a"))
