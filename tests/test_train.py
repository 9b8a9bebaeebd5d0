"""SFT then DPO on Ray Train with real TRL steps on the embedded model: two gloo workers each, LoRA adapters out."""

import json

import pytest
from safetensors.torch import load_file

from pipelines.chat import load_tokenizer, prompt_completion_text
from pipelines.train.dpo import train_dpo
from pipelines.train.sft import train_sft
from services.adapters import ADAPTER_FILES
from safetrigger.config import RunConfig
from safetrigger.method import render_safe_block
from safetrigger.model_cache import resolve_model
from tests.conftest import sft_examples, wait_for_a_registered_checkpoint

pytestmark = pytest.mark.stack

REFUSAL = render_safe_block("The core question is unsafe.") + "\n\nI can't help with that."


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    import ray

    from pipelines.runtime import init_ray

    tmp = tmp_path_factory.mktemp("train")
    cfg = RunConfig.model_validate({
        "data": {"root": str(data_root), "dpo_fraction": 0.5, "sources": [{"type": "advbench", "path": "advbench.jsonl"}]},
        "sft_data": {"max_length": 256},
        "sft": {"num_workers": 2, "max_steps": 2, "per_device_batch_size": 2, "lora": {"r": 8, "alpha": 16},
                "learning_rate": 1e-3},
        "dpo": {"num_workers": 2, "max_steps": 2, "per_device_batch_size": 1, "max_length": 256, "learning_rate": 1e-3},
    })
    model_path = resolve_model(cfg.model.source)
    tok = load_tokenizer(model_path)
    sft_data, dpo_data = tmp / "sft.jsonl", tmp / "dpo.jsonl"
    with sft_data.open("w") as f, dpo_data.open("w") as g:
        for i in range(8):
            msgs = [{"role": "user", "content": f"question {i}"}]
            answer = REFUSAL if i % 2 == 0 else f"It is {i}."
            prompt, completion = prompt_completion_text(tok, msgs, f"Thinking.\n\n{answer}")
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            g.write(json.dumps({"prompt": prompt, "chosen": f"Thinking.\n\n{REFUSAL}",
                                "rejected": f"Thinking.\n\nSure, step {i}: ..."}) + "\n")
    started_here = not ray.is_initialized()
    init_ray(cfg)
    try:
        sft = train_sft(sft_data, model_path, tmp / "st-s", cfg)
        dpo = train_dpo(dpo_data, model_path, tmp / "st-s", tmp / "st-d", cfg)
    finally:
        if started_here:
            ray.shutdown()
    return tmp, sft, dpo


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def lora_b(path):
    return {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if "lora_B" in k}


def test_two_worker_sft_produces_a_trained_adapter(trained):
    tmp, out, _ = trained
    adapter = tmp / "st-s"
    assert all((adapter / f).is_file() for f in ADAPTER_FILES)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16
    b = lora_b(adapter)
    assert b and any(float(v.abs().sum()) > 0 for v in b.values())  # B starts at zero: it was trained
    assert out["metrics"]["loss"] > 0 and out["metrics"]["train_tokens_per_second"] > 0
    assert out["metrics"]["num_input_tokens_seen"] > 0


def test_two_worker_dpo_continues_the_sft_adapter(trained):
    tmp, _, out = trained
    sft, dpo = lora_b(tmp / "st-s"), lora_b(tmp / "st-d")
    # the same adapter (same keys and shapes, loadable by vLLM the same way), moved by DPO
    assert sft.keys() == dpo.keys() and all(sft[k].shape == dpo[k].shape for k in sft)
    assert any(not (sft[k] == dpo[k]).all() for k in sft)
    assert json.loads((tmp / "st-d" / "adapter_config.json").read_text())["r"] == 8
    m = out["metrics"]
    assert m["loss"] > 0 and "rewards/margins" in m and m["num_input_tokens_seen"] > 0


def test_a_worker_killed_mid_sft_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path, data_root):
    """Ray Train restarts the worker group after one of its workers is SIGKILLed mid-SFT, resumes from the last
    checkpoint (optimizer state included) and ends with the adapter a run without the fault trains on the same
    seed; the progress lines say what happened."""
    import os
    import signal
    import threading

    import psutil
    import ray
    import torch

    from pipelines.runtime import init_ray

    cfg = RunConfig.model_validate({
        "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "advbench.jsonl"}]},
        "sft_data": {"max_length": 256},
        "sft": {"num_workers": 2, "max_steps": 6, "per_device_batch_size": 1, "lora": {"r": 8, "alpha": 16},
                "learning_rate": 1e-3, "checkpoint_every_steps": 2, "max_failures": 1},
    })
    model_path = resolve_model(cfg.model.source)
    data = sft_examples(tmp_path / "sft.jsonl", model_path, answer=lambda i: REFUSAL if i % 2 else f"It is {i}.")
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
        clean = train_sft(data, model_path, tmp_path / "clean", cfg, name="clean")
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
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("clean", "faulted"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert faulted["metrics"]["step"] == clean["metrics"]["step"] == 6
