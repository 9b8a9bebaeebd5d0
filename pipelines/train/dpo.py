"""DPO on Ray Train: `TorchTrainer` workers each run TRL's `DPOTrainer` on the SFT adapter (ST-S -> ST-D).

The policy is the base model with the SFT adapter, trainable. The reference is the SFT model itself, as DPO
defines it: TRL keeps a frozen copy of the adapter beside the trainable one and computes reference
log-probabilities through it, so the base weights are held once (no second model).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from safetrigger.lm_head import compact_heads_in

from .frozen_bf16 import store_frozen_bases_in_bf16
from .ray_train import fit, hf_args, load_base_model, loop_config


def build_dpo_trainer(c: dict[str, Any]):
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer import dpo_trainer

    torch.set_num_threads(c["torch_threads"])
    ds = datasets.load_dataset("json", data_files=c["data"], split="train").select_columns(["prompt", "chosen", "rejected"])
    tok = AutoTokenizer.from_pretrained(c["model_path"])
    base = load_base_model(c)
    model = PeftModel.from_pretrained(base, c["sft_adapter"], is_trainable=True)
    args = DPOConfig(max_length=c["max_length"], beta=c["beta"], loss_type=[c["loss_type"]],
                     precompute_ref_log_probs=c["precompute_ref"] and _workers_share_a_disk(), **hf_args(c))
    # on CPU the compact head from the start: DPOTrainer precomputes the reference log-probs in its __init__, which
    # took 48.4-52.1 s through TRL's CPU head and 39.0-46.4 s through this one (44 pairs, 2 threads, AVX512-BF16
    # EPYC, 3-4 runs each; 5.0 s without the precompute). The reference is the same model with the adapter
    # disabled, so one head serves both.
    with contextlib.nullcontext() if c["use_gpu"] else compact_heads_in(dpo_trainer):
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    if c["bf16"] and not c["use_gpu"]:
        # after __init__: the "ref" adapter TRL adds there (a copy of the SFT adapter) stays float32 like the policy's
        store_frozen_bases_in_bf16(trainer.model)
    return trainer


def _workers_share_a_disk() -> bool:
    """TRL hands the precomputed reference log-probs from rank 0 to the other ranks through a cache file on local
    disk: true for a plain run and for Ray Train workers all on one node."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_local_world_size() == ctx.get_world_size()
    except RuntimeError:  # not inside a Ray Train worker: one process
        return True


def dpo_loop_config(data_path: str | Path, model_path: str, sft_adapter: str | Path, cfg) -> dict[str, Any]:
    d = cfg.dpo
    return loop_config(d, data=str(Path(data_path).resolve()), model_path=model_path,
                       sft_adapter=str(Path(sft_adapter).resolve()), max_length=d.max_length, beta=d.beta,
                       loss_type=d.loss_type, precompute_ref=d.precompute_ref_log_probs)


def train_dpo(data_path, model_path: str, sft_adapter, out_dir, cfg, name: str = "dpo", emit=None,
              on_step=None) -> dict[str, Any]:
    return fit(f"{__name__}:build_dpo_trainer", dpo_loop_config(data_path, model_path, sft_adapter, cfg), cfg.dpo,
               out_dir, name, emit=emit, label="st-d", on_step=on_step)
