"""SFT on Ray Train: `TorchTrainer` workers each run TRL's `SFTTrainer` with a PEFT LoRA adapter.

Loss on the assistant completion only (TRL's prompt-completion format); gloo on CPU, NCCL on GPUs, both set up
by Ray Train. The adapter comes back through a Ray Train checkpoint and is written as the directory vLLM and
`ray.serve.llm` load (`adapter_config.json` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from services.adapters import ADAPTER_FILES


def _train_loop(c: dict[str, Any]) -> None:
    import datasets
    import ray.train
    import torch
    from peft import LoraConfig
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(c["torch_threads"])
    ds = datasets.load_dataset("json", data_files=c["data"], split="train")
    ds = ds.select_columns(["prompt", "completion"])
    tok = AutoTokenizer.from_pretrained(c["model_path"])
    model = AutoModelForCausalLM.from_pretrained(c["model_path"], dtype=torch.float32)
    args = SFTConfig(
        output_dir=c["scratch"], max_length=c["max_length"], completion_only_loss=True, packing=False,
        per_device_train_batch_size=c["batch_size"], gradient_accumulation_steps=c["grad_accum"],
        learning_rate=c["lr"], num_train_epochs=c["epochs"], max_steps=c["max_steps"], logging_steps=1,
        save_strategy="steps" if c["max_steps"] > 0 else "epoch", save_steps=max(1, c["max_steps"]),
        save_only_model=True, report_to="none", use_cpu=not c["use_gpu"], seed=c["seed"],
        dataloader_num_workers=0, bf16=False, disable_tqdm=True, ddp_find_unused_parameters=False,
        # the trainer then logs num_input_tokens_seen and, at the end, train_tokens_per_second
        include_num_input_tokens_seen="non_padding",
    )
    lora = c["lora"]
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok,
        peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
    )

    trainer.add_callback(RayTrainReportCallback())
    prepare_trainer(trainer).train()


def train_sft(data_path: str | Path, model_path: str, out_dir: str | Path, cfg, name: str = "sft") -> dict[str, Any]:
    """Run SFT; returns the final metrics and the adapter directory. `cfg` is the whole RunConfig."""
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.sft
    out_dir = Path(out_dir).resolve()
    storage = out_dir.parent / "ray-train"
    loop_cfg = {
        "data": str(Path(data_path).resolve()), "model_path": model_path, "scratch": tempfile.mkdtemp(prefix="sft-"),
        "max_length": cfg.sft_data.max_length, "batch_size": s.per_device_batch_size,
        "grad_accum": s.gradient_accumulation_steps, "lr": s.learning_rate, "epochs": s.epochs,
        "max_steps": s.max_steps, "use_gpu": s.use_gpu, "seed": s.seed, "torch_threads": s.torch_threads,
        "lora": s.lora.model_dump(),
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=TrainRunConfig(name=name, storage_path=str(storage)),
    )
    try:
        result = trainer.fit()
    finally:
        shutil.rmtree(loop_cfg["scratch"], ignore_errors=True)  # HF's own checkpoints; Ray Train keeps its copy
    if result.checkpoint is None:
        raise RuntimeError(f"SFT run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        src = Path(ckpt) / "checkpoint"
        missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {src} lacks {missing}")
        tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir.parent))
        for f in ADAPTER_FILES:
            shutil.copy2(src / f, tmp / f)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    return {"adapter": str(out_dir), "metrics": dict(result.metrics or {})}
