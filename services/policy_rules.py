"""What the policy's config decides without the engine stack: the cores its CPU engine computes on, and whether
its app may have an HTTP route. `services.policy` imports vLLM and Ray Serve (~10 s on 2 cores); the main job
prints the engine's threads before it reads its data, and `safe-trigger serve` refuses a routed policy before it
starts anything, so a bad data file or config is reported in about two seconds (`services.policy` keeps using
the engine's threads and the error from here)."""

from __future__ import annotations

import os

from safetrigger.config import RunConfig


def engine_threads(cfg: RunConfig, host_cpus: int | None = None) -> int:
    """The CPU engine's compute threads: `serving.engine_threads`, else the replica's CPUs, at most the host's
    logical CPUs (see the field's comment for the measurement)."""
    s = cfg.serving
    if s.engine_threads is not None:
        return s.engine_threads
    return max(1, min(int(s.cpus_per_replica), _host(host_cpus)))


def reserved_cpus(cfg: RunConfig, host_cpus: int | None = None) -> int | None:
    """VLLM_CPU_NUM_OF_RESERVED_CPU: 0 where the engine's threads take every logical CPU of the host (vLLM's
    auto-binding would otherwise bind them to all cores but one), else None: vLLM's own default."""
    host = _host(host_cpus)
    return 0 if engine_threads(cfg, host) >= host else None


CPU_KV_BLOCK_SIZE = 32  # see `ServingConfig.kv_block_size`


def kv_block_size(cfg: RunConfig) -> int | None:
    """The engine's KV-cache block size: `serving.kv_block_size`, else 32 on CPU, else None (vLLM's default)."""
    s = cfg.serving
    if s.kv_block_size is not None:
        return s.kv_block_size
    return CPU_KV_BLOCK_SIZE if s.accelerator == "cpu" else None


def _host(host_cpus: int | None) -> int:
    """This host's logical CPUs, unless a caller (a test) names them."""
    return host_cpus if host_cpus is not None else (os.cpu_count() or 1)


class PolicyServiceError(RuntimeError):
    pass


def refuse_public_route(cfg: RunConfig) -> None:
    """A shared deployment's policy app answers by handle only: on a route it would serve every caller of Serve's
    proxy without keys, limits or `<safe>` hiding."""
    if cfg.serving.route_prefix is not None:
        raise PolicyServiceError(
            f"serving.route_prefix is {cfg.serving.route_prefix!r}: behind the gateway the policy app must have no "
            "HTTP route (it would answer without keys, limits or <safe> hiding); remove it, the gateway reaches the "
            "policy by handle")
