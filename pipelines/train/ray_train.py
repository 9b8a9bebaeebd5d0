"""What SFT and DPO share on Ray Train: the worker loop around a TRL trainer, the `TorchTrainer` launch, and
the export of the LoRA adapter from the final Ray Train checkpoint (the directory vLLM and `ray.serve.llm` load).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from services.adapters import ADAPTER_FILES


# How often Ray Train's controller polls its workers (its default: 2 s). The end of a fit waits for the next poll,
# and so does every reported checkpoint: on 2 cores a 2-step SFT fit took 26.1 s at 2 s and 23.1 s at 0.5 s (two
# fits of each, timed in one process). A missed poll only counts against Ray Train's 10-minute worker health
# timeout, so a busy worker is not lost by it.
CONTROLLER_POLL_S = "0.5"


def use_bf16(settings) -> bool:
    """auto: bf16 on GPUs and on CPUs with native bf16 matmuls (AMX / AVX512-BF16), else fp32."""
    from safetrigger.hardware import this_cpu, training_precision

    return training_precision(settings.precision, settings.use_gpu, this_cpu()).bf16


def attention_for(use_gpu: bool) -> str | None:
    """The attention kernel the trainers load the model with: transformers' default (SDPA) on GPUs, its eager
    matmul attention on CPU. On CPU, SDPA's flash-attention backward took 13% of an SFT step (torch profiler, 16
    micro-batches of the embedded SFT, 2.4 of 18.2 s) where its forward took 3%; the eager path's backward is
    the same bf16 matmuls as the rest. Plain TRL, 2 threads, AVX512-BF16 EPYC, interleaved: SFT 175.1 / 167.1 /
    170.9 tokens/s against 154.6 / 160.6 / 165.4 with SDPA (12 steps each), DPO 213.2 against 197.8 (6 steps,
    one pair) at 4.08 GB peak RSS against 3.64 (it keeps each layer's attention weights for the backward pass)."""
    return None if use_gpu else "eager"


def load_base_model(c: dict[str, Any]):
    """The base model both trainers adapt: float32 weights (bf16 comes from autocast), the attention for the device."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(c["model_path"], dtype=torch.float32,
                                                attn_implementation=attention_for(c["use_gpu"]))


def loop_config(settings, **extra: Any) -> dict[str, Any]:
    return {"lr": settings.learning_rate, "epochs": settings.epochs, "max_steps": settings.max_steps,
            "batch_size": settings.per_device_batch_size, "grad_accum": settings.gradient_accumulation_steps,
            "use_gpu": settings.use_gpu, "seed": settings.seed, "torch_threads": settings.torch_threads,
            "bf16": use_bf16(settings), "checkpoint_every_steps": settings.checkpoint_every_steps, **extra}


def _worker_loop(c: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the TRL trainer, report metrics and checkpoints to Ray Train."""
    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer

    module, fn = c["builder"].rsplit(":", 1)
    trainer = getattr(importlib.import_module(module), fn)(c)
    sync_trainable_only(trainer.model)
    trainer.add_callback(_report_when_saved())
    if c.get("progress_file") and ray.train.get_context().get_world_rank() == 0:
        trainer.add_callback(_progress_callback(c["progress_file"]))
    trainer = prepare_trainer(trainer)
    _say(c, f"workers allocate with {allocator_in_use()}")
    restored = ray.train.get_checkpoint()  # set when Ray Train restarted the group after a lost worker or node
    if restored is None:
        trainer.train()
        return
    with restored.as_directory() as d:
        _say(c, f"resuming from the checkpoint of step {_step_of(Path(d) / 'checkpoint')} after a lost worker")
        trainer.train(resume_from_checkpoint=str(Path(d) / "checkpoint"))


def _report_when_saved():
    """Ray's `RayTrainReportCallback`, whose ranks copy the checkpoint only once every rank has written its part.

    The HF trainer writes a checkpoint from rank 0 (the other ranks add their RNG state) and calls `on_save` on every
    rank with no barrier; Ray's callback then copies the newest `checkpoint-*` folder it finds, and Ray Train merges
    the ranks' copies into one directory. Rank 1, with nothing to write, got there first and copied the epoch before:
    the main job's DPO (2 workers, 2 epochs) registered a final checkpoint whose `trainer_state.json` said step 13 of
    26 beside rank 0's step-26 adapter. Which rank's file wins each name is not defined, so the published adapter
    or a resumed optimizer could be the earlier epoch's."""
    import torch.distributed as dist
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class ReportWhenSaved(RayTrainReportCallback):
        def on_save(self, args, state, control, **kwargs):
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            return super().on_save(args, state, control, **kwargs)

    return ReportWhenSaved()


def sync_trainable_only(model) -> None:
    """Leave the frozen weights and the buffers out of DDP's sync. DDP broadcasts every parameter and buffer from
    rank 0 when it wraps the model (and the buffers again before each forward), but every worker reads the frozen
    base (and, in DPO, the frozen reference adapter) from the same files, and the buffers (rotary frequencies) are
    computed the same everywhere: only the trainable adapter needs rank 0's copy. For an 8B model in bf16 that is
    16 GB less at start; measured here (2-worker SFT of SmolLM2-135M, 2-core AVX512-BF16 EPYC, 2 fits each) the
    wrap took 1.7-2.0 s with them, 0.65-0.8 s without."""
    model._ddp_params_and_buffers_to_ignore = frozen_names(model)


def frozen_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]


def _step_of(checkpoint: Path) -> int:
    import json

    state = checkpoint / "trainer_state.json"
    return json.loads(state.read_text()).get("global_step", 0) if state.is_file() else 0


def _say(c: dict[str, Any], message: str) -> None:
    """A line the driver shows among the progress lines (rank 0 only)."""
    import json

    import ray.train

    if c.get("progress_file") and ray.train.get_context().get_world_rank() == 0:
        with open(c["progress_file"], "a") as f:
            f.write(json.dumps({"event": message}) + "\n")


def _progress_callback(path: str):
    """Rank 0 appends one JSON line per logged step; the driver shows them (worker stdout is not forwarded).
    The trainer gathers `num_input_tokens_seen` over all workers, so the rate is the whole run's."""
    import json
    import time

    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "max_steps": state.max_steps, "loss": logs["loss"],
                                        "elapsed": time.monotonic() - self.t0,
                                        "tokens": state.num_input_tokens_seen, "logs": numbers}) + "\n")

    return Progress()


def _follow(path: Path, stop, emit, label: str, on_step=None) -> None:
    """Driver side: turn the rank-0 progress lines into `[label] step i/n, loss, tokens/s, ETA` lines, and hand
    each step's logged numbers to `on_step` (experiment tracking)."""
    import json

    seen = 0
    while True:
        finished = stop.wait(2.0)
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines[seen:]:
            p = json.loads(line)
            if "event" in p:
                emit(f"[{label}] {p['event']}")
                continue
            rate = p["elapsed"] / p["step"] if p["step"] else 0.0
            eta = rate * (p["max_steps"] - p["step"])
            tok_s = p["tokens"] / p["elapsed"] if p["elapsed"] else 0.0
            emit(f"[{label}] step {p['step']}/{p['max_steps']}, loss {p['loss']:.3f}, {tok_s:.0f} tokens/s "
                 f"(all workers), ETA {eta:.0f}s")
            if on_step is not None:
                on_step(p["step"], {**p.get("logs", {}), "tokens_per_s": tok_s})
        seen = len(lines)
        if finished:
            return


def fit(builder: str, loop_cfg: dict[str, Any], settings, out_dir: str | Path, name: str, emit=None,
        label: str = "train", on_step=None) -> dict[str, Any]:
    """Train with `settings.num_workers` workers; `builder` ("module:function") makes the TRL trainer from the
    loop config. Returns the final metrics and the adapter directory, written atomically. With `emit`, progress
    lines (step, loss, tokens/s, ETA) are shown while it trains."""
    import threading

    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # the driver's value is what Ray Train hands its controller (an operator's own setting wins)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)
    out_dir = Path(out_dir).resolve()
    scratch = tempfile.mkdtemp(prefix=f"{name}-")
    progress = out_dir.parent / f".{out_dir.name}.progress"
    progress.unlink(missing_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={**loop_cfg, "builder": builder, "scratch": scratch,
                           "progress_file": str(progress) if emit else None},
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker={"CPU": settings.cpus_per_worker},
                                     placement_strategy=settings.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=TrainRunConfig(name=name, storage_path=str(out_dir.parent / "ray-train"),
                                  failure_config=FailureConfig(max_failures=settings.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2),
                                  worker_runtime_env={"env_vars": worker_env(settings)}),
    )
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(progress, stop, emit, label, on_step), daemon=True) if emit else None
    if follower:
        follower.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if follower:
            follower.join()
        progress.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)  # HF's own checkpoints; Ray Train keeps its copy
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        export_adapter(Path(ckpt) / "checkpoint", out_dir)
    return {"adapter": str(out_dir), "metrics": dict(result.metrics or {})}


def worker_env(settings) -> dict[str, str]:
    """Environment variables of the Ray Train workers: the allocator (`TrainSettings.allocator`).

    Measured and left: a `worker_process_setup_hook` beside them that imports torch, transformers, TRL and PEFT
    when a worker's process starts, at once or in a thread. A 2-step one-worker fit took 16.7-19.1 s with it and
    17.0-19.8 s without (3 and 5 fits, interleaved, one local Ray, 2-core AVX512-BF16 EPYC): the start is a chain
    of process starts and imports on two busy cores, with no idle wait for the imports to fill."""
    from safetrigger.hardware import tcmalloc_library, with_preload

    if settings.allocator != "tcmalloc":
        return {}
    return with_preload({}, tcmalloc_library(), os.environ.get("LD_PRELOAD"))


def allocator_in_use(maps: str = "/proc/self/maps") -> str:
    """What this process allocates with, as its mapped libraries say (LD_PRELOAD fails quietly where the library
    is missing on a node)."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "an unknown allocator"
    return "tcmalloc" if "libtcmalloc" in text else "the system malloc"


def export_adapter(src: Path, out_dir: Path) -> None:
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {src} lacks {missing}")
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir.parent))
    for f in ADAPTER_FILES:
        shutil.copy2(src / f, tmp / f)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _saving(c: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints: every `checkpoint_every_steps` with the optimizer and scheduler state (a restarted worker group
    resumes from them); otherwise the model only, once at the end."""
    every = c.get("checkpoint_every_steps")
    if every:
        return {"save_strategy": "steps", "save_steps": every, "save_only_model": False}
    return {"save_strategy": "steps" if c["max_steps"] > 0 else "epoch", "save_steps": max(1, c["max_steps"]),
            "save_only_model": True}


def hf_args(c: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments both TRL configs take, from the loop config."""
    return dict(
        output_dir=c["scratch"], per_device_train_batch_size=c["batch_size"], gradient_accumulation_steps=c["grad_accum"],
        learning_rate=c["lr"], num_train_epochs=c["epochs"], max_steps=c["max_steps"], logging_steps=1,
        **_saving(c), report_to="none", use_cpu=not c["use_gpu"], seed=c["seed"], bf16=c["bf16"],
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False,
        # the trainer then logs num_input_tokens_seen and, at the end, train_tokens_per_second
        include_num_input_tokens_seen="non_padding",
        # TRL turns activation recomputation on by default: on GPUs it is what lets an 8B model's long
        # sequences fit; on CPU it costs a third more compute, and the embedded configs bound memory with
        # micro-batches of one or two sequences instead (a worker at 4 x 768 tokens held 7.6 GB, at 1 x 768 3.8)
        gradient_checkpointing=c["use_gpu"],
    )
