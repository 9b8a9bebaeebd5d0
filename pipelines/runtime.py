"""What a process of the main job sets up once: thread counts, the Ray connection, the adapter registry's place,
and the precision the engines run in (chosen from this CPU's instructions, see `safetrigger/hardware.py`)."""

from __future__ import annotations

import os
from typing import Any

from safetrigger.config import RunConfig, with_adapter_root  # noqa: F401  (re-exported: the job's set-up in one place)


def set_threads(n: int) -> None:
    # 2 cores: every extra OpenMP/BLAS thread in the driver competes with the engine and slows both.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    common = {"namespace": cfg.ray.namespace, "log_to_driver": os.environ.get("SAFE_TRIGGER_RAY_LOGS", "0") == "1"}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **common)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard, dashboard_port=cfg.ray.dashboard_port,
                 dashboard_host="127.0.0.1", **common)


def precision_report(cfg: RunConfig) -> dict[str, Any]:
    """The CPU this run computes on and the precision each engine gets from it (printed and kept in the summary:
    a number measured here means little without them)."""
    from safetrigger.hardware import choose_dtype, this_cpu, training_precision

    from services.policy_rules import engine_threads

    cpu = this_cpu()
    threads = engine_threads(cfg) if cfg.serving.accelerator == "cpu" else None
    return {"cpu": {"model": cpu.model, "logical_cpus": cpu.logical_cpus, "simd": cpu.simd(), "native_bf16": cpu.native_bf16},
            "serving": {**choose_dtype(cfg.model.dtype, cfg.serving.accelerator, cpu).to_dict(), "engine_threads": threads},
            "sft": training_precision(cfg.sft.precision, cfg.sft.use_gpu, cpu).to_dict(),
            "dpo": training_precision(cfg.dpo.precision, cfg.dpo.use_gpu, cpu).to_dict()}


def emit_precision(report: dict[str, Any], emit) -> None:
    c = report["cpu"]
    emit(f"[cpu] {c['model']}: {c['logical_cpus']} logical CPUs, {' '.join(c['simd']) or 'no AVX'}, "
         f"{'native' if c['native_bf16'] else 'no native'} bf16 -> serving {report['serving']['dtype']} "
         f"({report['serving']['reason']}"
         + (f"; {report['serving']['engine_threads']} engine thread(s)" if report["serving"].get("engine_threads") else "")
         + f"), SFT {report['sft']['dtype']}, DPO {report['dpo']['dtype']}")
    for what in ("serving", "sft", "dpo"):
        if report[what]["warning"]:
            emit(f"[cpu] WARNING ({what}): {report[what]['warning']}")


def with_serving_dtype(cfg: RunConfig, dtype: str) -> RunConfig:
    """`auto` replaced by the dtype it chose here, so stage keys name what the engine really ran in (an AMX and an
    AVX2 machine answer differently) and every replica gets the same choice as the driver."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})})
