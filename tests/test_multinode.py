"""A real two-node Ray cluster on this machine (`ray start --head` and `ray start --address`, both on 127.0.0.1,
own ports and temp dir): the main job on the embedded reasoning model is submitted as a Ray Job and must place its
work on both nodes; then a node is lost mid-SFT. Every process the nodes start is stopped by pid at the end."""

import json
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from safetrigger.config import REPO_ROOT
from tests.conftest import TRAIN_SFT, six_step_sft_config, wait_for_a_registered_checkpoint
from tests.ray_cluster import HeadPorts, cluster_env, head_node, ray_start
from tests.test_stack import make_cfg

pytestmark = pytest.mark.stack

GCS, DASHBOARD, SERVE_PORT = 6391, 8276, 8433


HEAD = HeadPorts(gcs=GCS, dashboard=DASHBOARD, agent=52400, client=6392, workers=(20000, 20999))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    env = cluster_env()
    # logical CPUs (more than the cores, as in ray.num_cpus): the head holds the policy replica, its ingress and
    # Ray Data's stage actors, and must still fit one of the two Train workers
    with head_node(HEAD, "mn", num_cpus=8, resources='{"node:head-test": 1}'):
        ray_start(["--address", f"127.0.0.1:{GCS}", "--node-ip-address", "127.0.0.1", "--num-cpus", "4",
                   "--dashboard-agent-listen-port", "52410", "--metrics-export-port", "52411",
                   "--min-worker-port", "21000", "--max-worker-port", "21999"], env)
        import ray

        ray.init(address=f"127.0.0.1:{GCS}")
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2, nodes
        yield tmp, env, nodes


@pytest.mark.timeout(1500)
def test_the_think_models_main_job_runs_on_both_nodes(cluster, data_root, think_model_path):
    """The main job on the embedded reasoning model (its template prefills `<think>\\n`, as R1-Distill's does),
    submitted as a Ray Job to the two-node cluster: its work is placed on both nodes (the policy replica where it
    fits, one SFT worker per node), and the think-aware parts hold end to end (`_check_the_think_job`). One job for
    both: apart, each started an engine and ran a main job (the multinode one without DPO): 147 s and 87 s of the
    suite on 2 cores, 145 s together."""
    from ray.util.state import list_actors

    tmp, env, nodes = cluster
    cfg = make_cfg(tmp, data_root, model={"source": "embedded:smollm2-135m-think", "max_model_len": 1024,
                                          "reasoning": {"fallback": "none"}},
                   ray={"address": "auto"}, generation={"max_tokens": 96},
                   serving={"http_port": SERVE_PORT, "route_prefix": None},
                   # one Train worker per node for SFT; DPO on one (make_cfg: tests/conftest.py TRAIN_ONE_WORKER)
                   sft={"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "torch_threads": 1,
                        "cpus_per_worker": 1},
                   dpo={"max_tokens": 64})
    path = tmp / "multinode.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    logs = _run_job(f"{sys.executable} -m apps.cli run {path}", 1300)

    out = Path(cfg.output_dir)
    assert f"[done] {out / 'summary.json'}" in logs, logs[-3000:]  # what the job's user reads
    summary = json.loads((out / "summary.json").read_text())
    assert summary["queries"] == 24 and Path(summary["report"]["html"]).is_file()
    assert (Path(summary["stages"]["sft_adapter"]) / "adapter_model.safetensors").is_file()
    placed: dict[str, set[str]] = {}
    for a in list_actors(address=f"127.0.0.1:{GCS}", limit=10_000, detail=True, raise_on_missing_output=False):
        placed.setdefault(a.class_name, set()).add(a.node_id)
    replicas = set().union(*[n for c, n in placed.items() if "PolicyServer" in c])
    trainers = placed.get("RayTrainWorker", set())
    node_ids = {n["NodeID"] for n in nodes}
    print("placement:", {c: sorted(x[:8] for x in n) for c, n in placed.items()})
    assert replicas and replicas <= node_ids
    assert trainers == node_ids  # the two SFT workers ran on the two nodes
    _check_the_think_job(cfg, summary, logs, think_model_path)


def _check_the_think_job(cfg, summary: dict, out: str, model_path: str) -> None:
    """Where the verdicts are read, where `<safe>` lands, and what the report says about both, on a finished main
    job of the think model (`out`: what it printed)."""
    import pyarrow.parquet as pq

    from pipelines.chat import load_tokenizer
    from pipelines.datasets import load_all
    from pipelines.judge import judge_prompt_ids
    from pipelines.review import needs_review, plan_review_rows
    from pipelines.rows import Judgement, Review, Trajectory
    from pipelines.stage_store import StageStore
    from safetrigger.method import SplitSource, parse_safe, safe_position

    tok = load_tokenizer(model_path)
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
               for r in plan_review_rows(todo[:3], cfg, model_path, {t.query_id: "1. Is the core question safe?"
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
    # DPO trained ST-D from the think model's own samples, and the report covers base, ST-S and ST-D
    assert (Path(summary["stages"]["dpo_adapter"]) / "adapter_model.safetensors").is_file()
    report = summary["report"]
    metrics = json.load(open(report["metrics"]))
    assert {m["model"] for m in metrics["suites"] if m["metric"] == "incomplete"} == {"base", "ST-S", "ST-D"}
    # incomplete answers counted apart, judge health, and where <safe> sits per model
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


def _run_job(entrypoint: str, timeout_s: float, while_running=None) -> str:
    """A Ray Job on the test cluster, as a user submits one; its logs once it succeeded (`while_running` is
    called with the job id right after submission)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://127.0.0.1:{DASHBOARD}")
    job = client.submit_job(entrypoint=entrypoint,
                            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
                                                      "RAY_AUTH_MODE": "disabled"}})
    if while_running is not None:
        while_running(job)
    deadline = time.monotonic() + timeout_s
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


@pytest.mark.timeout(900)
def test_a_node_lost_mid_sft_resumes_on_the_node_left(cluster, data_root, six_step_sft):
    """The worker node is stopped (its raylet and every process under it SIGKILLed, as a lost VM) while one of
    two Ray Train workers of an SFT job runs there: Ray Train restarts the group on the head, resumes from the last
    registered checkpoint, and trains to the adapter a run without the fault reaches on the same seed
    (`six_step_sft`). Runs last: the cluster keeps one node afterwards."""
    import re

    import ray
    import torch
    from safetensors.torch import load_file

    tmp, _, nodes = cluster
    data, clean = six_step_sft.data, six_step_sft.adapter
    # SPREAD, not STRICT: after the loss both workers must fit on the one node left
    cfg = six_step_sft_config(data_root, placement_strategy="SPREAD")
    work = tmp / "node-loss"
    work.mkdir()
    (work / "cfg.json").write_text(cfg.model_dump_json())
    (work / "train.py").write_text(TRAIN_SFT)
    run = f"{sys.executable} {work / 'train.py'} {work / 'cfg.json'} {data}"
    [worker] = [n for n in ray.nodes() if n["Alive"] and "node:head-test" not in n["Resources"]]
    worker_raylet = [p for p in psutil.process_iter(["name", "cmdline"])  # the raylet's command line names its node
                     if p.info["name"] == "raylet" and f"--node_id={worker['NodeID']}" in (p.info["cmdline"] or [])]
    assert len(worker_raylet) == 1, f"the worker node's raylet was not found ({worker['NodeID']})"
    stopped: list = []

    def stop_the_worker_node_after_step_3(job: str) -> None:
        assert wait_for_a_registered_checkpoint(work, "faulted", 3), "no step-3 checkpoint was registered in time"
        doomed = [worker_raylet[0], *worker_raylet[0].children(recursive=True)]
        titles = []
        for p in doomed:
            try:
                titles.append(" ".join(p.cmdline()))
            except psutil.NoSuchProcess:
                pass
        assert any("RayTrainWorker" in t for t in titles), "no Ray Train worker ran on the worker node"
        for p in doomed:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        stopped.extend(doomed)

    t = time.monotonic()
    faulted = _run_job(f"{run} {work / 'faulted'}", 600, stop_the_worker_node_after_step_3)
    took = time.monotonic() - t
    assert stopped and len([n for n in ray.nodes() if n["Alive"]]) == 1  # the node is gone for good
    resumed = [int(m.group(1)) for m in re.finditer(r"resuming from the checkpoint of step (\d+)", faulted)]
    assert resumed and resumed[0] in (2, 4), faulted[-3000:]
    assert "TRAINED 6" in faulted
    a, b = (load_file(d / "adapter_model.safetensors") for d in (clean, work / "faulted"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"[node-loss] worker node stopped ({len(stopped)} processes) after step 3; resumed from step {resumed[0]} "
          f"on the node left; 6/6 steps in {took:.0f}s; adapter equal to the run without the fault")
