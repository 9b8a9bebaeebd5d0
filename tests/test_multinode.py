"""A real two-node Ray cluster on this machine (`ray start --head` and `ray start --address`, both on 127.0.0.1,
own ports and temp dir): the tiny pipeline is submitted as a Ray Job and must place its work on both nodes.
Every process the nodes start is stopped by pid at the end."""

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
def test_pipeline_job_uses_both_nodes(cluster, data_root):
    from ray.util.state import list_actors

    tmp, env, nodes = cluster
    out = tmp / "run"
    config = {
        "name": "multinode", "output_dir": str(out), "model": {"max_model_len": 1024},
        "serving": {"cpus_per_replica": 2, "kv_cache_space_gib": 1, "http_port": SERVE_PORT, "max_num_seqs": 16,
                    "adapter_root": str(tmp / "adapters")},
        "ray": {"address": "auto"},
        "data": {"root": str(data_root), "sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}],
                 "dpo_fraction": 0.5},
        "generation": {"max_tokens": 16, "batch_size": 8, "chunk_rows": 8},
        "judge": {"max_reasoning_tokens": 32},
        "review": {"mode": "structured", "part_max_tokens": 8, "max_tokens": 16},
        "sft_data": {"max_length": 512},
        # one Train worker per node
        "sft": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "max_steps": 1, "per_device_batch_size": 1,
                "lora": {"r": 8, "alpha": 16}},
        "dpo": {"enabled": False},
        "eval": {"judges": [{"name": "refusal", "type": "refusal"}]},
    }
    path = tmp / "multinode.yaml"
    path.write_text(yaml.safe_dump(config))
    logs = _run_job(f"{sys.executable} -m apps.cli run {path}", 1300)

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
    assert trainers == node_ids  # the two Train workers ran on the two nodes


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
    data, clean = six_step_sft
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
