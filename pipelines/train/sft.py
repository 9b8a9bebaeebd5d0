"""SFT on Ray Train: `TorchTrainer` workers each run TRL's `SFTTrainer` with a PEFT LoRA adapter (ST-S).

Loss on the completion only (prompt-completion text records, see `pipelines/sft_data.py`); gloo on CPU, NCCL
on GPUs, both set up by Ray Train.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from safetrigger.lm_head import compact_heads_in

from .frozen_bf16 import store_frozen_bases_in_bf16
from .lora_dropout import use_word_mask_dropout
from .ray_train import fit, hf_args, load_base_model, loop_config


def build_sft_trainer(c: dict[str, Any]):
    """The TRL trainer of one worker (or of a plain single-process run, as `bench/training.py` does)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer import sft_trainer

    torch.set_num_threads(c["torch_threads"])
    ds = datasets.load_dataset("json", data_files=c["data"], split="train").select_columns(["prompt", "completion"])
    tok = AutoTokenizer.from_pretrained(c["model_path"])
    model = load_base_model(c)
    args = SFTConfig(max_length=c["max_length"], completion_only_loss=True, packing=False, **hf_args(c),
                     train_sampling_strategy="group_by_length" if c.get("length_grouped") else "random")
    lora = c["lora"]
    with contextlib.nullcontext() if c["use_gpu"] else compact_heads_in(sft_trainer):
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok,
            peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                   target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
        )
    if not c["use_gpu"]:
        use_word_mask_dropout(trainer.model)
        if c["bf16"]:
            store_frozen_bases_in_bf16(trainer.model)
    return trainer


def sft_loop_config(data_path: str | Path, model_path: str, cfg) -> dict[str, Any]:
    return loop_config(cfg.sft, data=str(Path(data_path).resolve()), model_path=model_path,
                       max_length=cfg.sft_data.max_length, lora=cfg.sft.lora.model_dump(), length_grouped=cfg.sft.length_grouped)


def train_sft(data_path: str | Path, model_path: str, out_dir: str | Path, cfg, name: str = "sft", emit=None,
              on_step=None) -> dict[str, Any]:
    """Run SFT; returns the final metrics and the adapter directory. `cfg` is the whole RunConfig."""
    return fit(f"{__name__}:build_sft_trainer", sft_loop_config(data_path, model_path, cfg), cfg.sft, out_dir, name,
               emit=emit, label="st-s", on_step=on_step)
