"""SFT on Ray Train with real TRL steps on the embedded model: two gloo workers, a LoRA adapter out."""

import json

import pytest
from safetensors.torch import load_file

from pipelines.train.sft import ADAPTER_FILES, train_sft
from safetrigger.config import RunConfig
from safetrigger.method import render_safe_block
from safetrigger.model_cache import resolve_model

pytestmark = pytest.mark.stack


def test_two_worker_sft_produces_a_trained_adapter(tmp_path, data_root):
    import ray

    from pipelines.run import init_ray

    cfg = RunConfig.model_validate({
        "data": {"root": str(data_root), "sources": [{"type": "advbench", "path": "advbench.jsonl"}]},
        "sft_data": {"max_length": 256},
        "sft": {"num_workers": 2, "max_steps": 2, "per_device_batch_size": 2, "lora": {"r": 8, "alpha": 16},
                "learning_rate": 1e-3},
    })
    data = tmp_path / "sft.jsonl"
    with data.open("w") as f:
        for i in range(8):
            unsafe = i % 2 == 0
            answer = (render_safe_block("The core question is unsafe.") + "\n\nI can't help with that.") if unsafe else f"It is {i}."
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"question {i}"}],
                                "completion": [{"role": "assistant", "content": f"Thinking.\n\n{answer}"}]}) + "\n")
    started_here = not ray.is_initialized()
    init_ray(cfg)
    try:
        out = train_sft(data, resolve_model(cfg.model.source), tmp_path / "adapters" / "st-s", cfg)
    finally:
        if started_here:
            ray.shutdown()
    adapter = tmp_path / "adapters" / "st-s"
    assert all((adapter / f).is_file() for f in ADAPTER_FILES)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)  # B starts at zero: it was trained
    assert out["metrics"]["loss"] > 0 and out["metrics"]["train_tokens_per_second"] > 0
    assert out["metrics"]["num_input_tokens_seen"] > 0
