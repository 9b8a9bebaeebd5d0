"""Ray Train's fault tolerance with real TRL steps on the embedded model (two-worker SFT and DPO producing trained
adapters are checked on the main job's own adapters: tests/test_stack.py)."""

import pytest
from safetensors.torch import load_file

from pipelines.train.sft import train_sft
from safetrigger.model_cache import resolve_model
from tests.conftest import six_step_sft_config, wait_for_a_registered_checkpoint

pytestmark = pytest.mark.stack


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def test_a_worker_killed_mid_sft_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path, data_root, six_step_sft):
    """Ray Train restarts the worker group after one of its workers is SIGKILLed mid-SFT, resumes from the last
    checkpoint (optimizer state included) and ends with the adapter a run without the fault trains on the same
    seed (`six_step_sft`); the progress lines say what happened."""
    import os
    import signal
    import threading

    import psutil
    import ray
    import torch

    from pipelines.runtime import init_ray

    cfg = six_step_sft_config(data_root)
    data, clean = six_step_sft.data, six_step_sft.adapter
    model_path = resolve_model(cfg.model.source)
    started_here = not ray.is_initialized()
    init_ray(cfg)
    lines: list[str] = []
    killed: list[int] = []

    def kill_a_worker_after_step_3() -> None:
        wait_for_a_registered_checkpoint(tmp_path, "faulted", 3)
        # by process title (the state API needs the dashboard, which a plain run does not start), among this
        # process's descendants only: the local cluster's raylet is our child, and another test process on the
        # machine (pytest -n) runs Ray Train workers of its own
        workers = sorted(p.pid for p in psutil.Process().children(recursive=True)
                         if "RayTrainWorker" in " ".join(_cmdline(p)))
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    try:
        killer = threading.Thread(target=kill_a_worker_after_step_3, daemon=True)
        killer.start()
        faulted = train_sft(data, model_path, tmp_path / "faulted", cfg, name="faulted", emit=lines.append)
        killer.join(timeout=5)
    finally:
        if started_here:
            ray.shutdown()
    assert killed, "no Ray Train worker was found to kill"
    # the last checkpoint before the kill: step 2, or step 4 when the kill landed after its checkpoint was saved
    # (steps take about a second here; the killer acts on rank 0's step-3 line)
    import re

    resumed = [int(m.group(1)) for ln in lines if (m := re.search(r"resuming from the checkpoint of step (\d+)", ln))]
    assert resumed and resumed[0] in (2, 4), "\n".join(lines)
    assert any("step 6/6" in ln for ln in lines)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (clean, tmp_path / "faulted"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert faulted["metrics"]["step"] == 6


def test_every_rank_reports_the_checkpoint_of_the_step_it_saved(six_step_sft):
    """Two workers, checkpoints at steps 2, 4 and 6, rank 0 slow to write them (`six_step_sft`'s clean run): every
    rank hands Ray Train a copy of the checkpoint of the step just saved (not the one before, which Ray Train would
    merge with rank 0's), and the registered final checkpoint is step 6's throughout."""
    import json

    reports = [json.loads(line) for line in six_step_sft.reports.read_text().splitlines()]
    assert sorted((r["rank"], r["step"]) for r in reports) == [(0, 2), (0, 4), (0, 6), (1, 2), (1, 4), (1, 6)]
    assert all(r["copied"] == r["step"] for r in reports), reports
    snapshot = json.loads((six_step_sft.train_dir / "checkpoint_manager_snapshot.json").read_text())
    final = six_step_sft.train_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert json.loads((final / "checkpoint" / "trainer_state.json").read_text())["global_step"] == 6
    assert sorted(p.name for p in (final / "checkpoint").glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
