"""The policy's Serve deployment class: `ray.serve.llm`'s `LLMServer` with four measured changes, plugged in
through `LLMConfig.server_cls` and `callback_config`, the library's own extension points.

1. Uniprocess executor on CPU. `ray.serve.llm` forces vLLM's multiprocess executor on CPU; with one engine
   worker that adds a worker process, and the engine core busy-polls the shared-memory queue to it (vLLM's 1 s
   busy loop after every read), which took 87% of one of this machine's two cores. Measured over HTTP, 32
   concurrent chat requests x 128 tokens: 120–175 tok/s multiprocess, 156–190 tok/s uniprocess. With tensor
   parallelism or on GPUs nothing changes.
2. No per-node download task for a model that is not in cloud storage (`LocalModelCallback`).
3. Hot LoRA adapters from a local/PVC registry (`services.adapters`). `ray.serve.llm` loads adapters only
   from s3/gs/azure (`LoraConfig.dynamic_lora_loading_path`). Here a request for `<model>:<name>` resolves the
   registry's CURRENT version on every request (one small file read) and runs on `<model>:<name>@v<N>`, loaded
   into vLLM under that versioned name, so re-publishing an adapter is picked up without a restart and never
   answered from stale weights.
4. No usage telemetry at engine start (`PolicyServer._start_engine`). `LLMServer` follows the engine's start with a
   usage report to Ray's telemetry actor, which the first replica on a cluster creates (a detached actor: a fresh
   worker process) and waits for: py-spy showed the replica blocked there ~4 s after "Started vLLM engine" while it
   started. Policy starts on a fresh local Ray, interleaved (2-core AVX512-BF16 EPYC): 26.1-31.5 s (mean 29.3)
   without, 31.2-34.9 s (33.3) with it. Nothing in this project reads that report.

Measured and left: forking the engine core instead of spawning it. vLLM forces `spawn` inside a Ray actor, so the
engine core imports vLLM again (`import vllm.v1.engine.core`: 7.8 s in a fresh process, 2.75 s of it torch). With
`vllm.v1.engine.utils.get_mp_context` returning a fork context, policy starts took 19.1-20.2 s (mean 19.6) against
23.3-29.2 s (26.3) spawned, the same greedy text (3 interleaved pairs, fresh local Ray). But after a SIGKILL of the
replica the forked core lived on (2.3 GB resident, still there 57 s later) where the spawned one was gone in 2 s
(why not found; it inherits the replica's open descriptors, Ray's sockets among them); it would also run the
finalizers of the replica's other threads' objects (Ray object refs among them) without those threads, and can only
be renamed through Ray's private `setproctitle`.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ray import serve
from ray.serve.llm import LLMServer

from . import adapters
from .private_apis import CallbackBase, DiskMultiplexConfig, VLLMEngine

ADAPTER_ROOT_ENV = "SAFE_TRIGGER_ADAPTER_ROOT"
log = logging.getLogger("ray.serve")


class AdapterLoadError(RuntimeError):
    """A published adapter this replica's engine could not load, and no earlier version of it to keep serving."""


class PolicyEngine(VLLMEngine):
    def _prepare_engine_config(self, callback_ctx):
        engine_args, frontend_args, vllm_config = super()._prepare_engine_config(callback_ctx)
        parallel = vllm_config.parallel_config
        if vllm_config.device_config.device_type == "cpu" and parallel.world_size == 1:
            parallel.distributed_executor_backend = "uni"
            engine_args.distributed_executor_backend = "uni"
        return engine_args, frontend_args, vllm_config


class LocalModelCallback(CallbackBase):
    """Before its engine starts, a replica runs a Ray task on each of its nodes to fetch the model from cloud
    storage; for any other source (a local directory, a hub id vLLM fetches itself) that task only creates torch's
    kernel cache directory and returns the name it was given. It still costs a fresh worker process with the
    replica's runtime env, which imports vLLM: 7.0 s of a 30.5 s policy start (2-core AVX512-BF16 EPYC, the
    replica's log). Used only where the model source is not a cloud URI (`build_llm_config`)."""

    async def on_before_node_init(self) -> None:
        import torch

        # what the task did (torch's home is the hub directory's parent)
        os.makedirs(os.path.join(os.path.dirname(torch.hub.get_dir()), "kernels"), exist_ok=True)
        self.ctx.run_init_node = False


class PolicyServer(LLMServer):
    _default_engine_cls = PolicyEngine

    async def _start_engine(self) -> None:
        """`LLMServer._start_engine` without its usage report to Ray's telemetry actor (module docstring, 4)."""
        if self.engine is None:
            raise ValueError("Engine is not set")
        await self.engine.start()

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        return None  # adapters are resolved in _run_request, where the request can be pointed at the version

    async def _run_request(self, request, *, engine_method, batch_output_stream=False, raw_request_info=None):
        # Through the HTTP ingress the adapter arrives as the multiplexed model id; through a deployment handle
        # (Ray Data batch stages) only as the request's model name.
        requested = serve.get_multiplexed_model_id() or (request.model if ":" in (request.model or "") else "")
        if requested:
            request.model = await self._ensure_adapter(requested)
        return await super()._run_request(request, engine_method=engine_method,
                                          batch_output_stream=batch_output_stream, raw_request_info=raw_request_info)

    async def _ensure_adapter(self, requested: str) -> str:
        root = os.environ.get(ADAPTER_ROOT_ENV)
        if not root:
            raise ValueError(f"adapter {requested!r} requested but no adapter registry is configured")
        ref = requested.split(":", 1)[1]
        pinned_request = "@v" in ref
        if pinned_request:  # pinned, e.g. the promoted version while a newer one is CURRENT
            ref, pinned = ref.rsplit("@v", 1)
            requested = requested.rsplit("@v", 1)[0]
            version, path = adapters.version(*adapters.locate(root, ref), int(pinned))
        else:  # `<name>`, or `<job>/<name>` from a job's own registry (jobs reach it by handle only)
            version, path = adapters.current(*adapters.locate(root, ref))
        versioned = f"{requested}@v{version}"
        if not hasattr(self, "_adapter_lock"):
            self._adapter_lock, self._loaded, self._failed = asyncio.Lock(), {}, {}
        async with self._adapter_lock:
            old = self._loaded.get(requested)
            if old == versioned:
                return versioned
            if versioned not in self._failed:
                try:
                    await self.engine.resolve_lora(
                        DiskMultiplexConfig(model_id=versioned, max_total_tokens=None, local_path=str(path),
                                            lora_assigned_int_id=0))
                except Exception as e:  # noqa: BLE001 - any load failure: the engine itself lives on
                    self._failed[versioned] = f"{type(e).__name__}: {e}"[:500]
                    log.error("adapter %s could not be loaded: %s", versioned, self._failed[versioned])
                else:
                    self._loaded[requested] = versioned
                    if old:
                        await self._unload(old)
                    return versioned
            # The publish check passed but this engine cannot take the files (e.g. a rank above its
            # max_lora_rank): keep answering with the version it holds, unless this one was pinned.
            if old and not pinned_request:
                return old
            raise AdapterLoadError(f"adapter {versioned} could not be loaded by this replica "
                                   f"({self._failed[versioned]})" + (f"; it serves {old}" if old else ""))

    async def _unload(self, lora_name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        models = self.engine._oai_models
        previous = models.lora_requests.get(lora_name)
        await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=lora_name))
        if previous is not None:
            await models.engine_client.remove_lora(previous.lora_int_id)

    async def adapter_state(self) -> dict[str, dict[str, str]]:
        """`loaded`: `<model>:<name>` -> the versioned name this replica serves it with; `failed`: versioned names
        it could not load -> why (they are not tried again). One call for the model list and readiness."""
        return {"loaded": dict(getattr(self, "_loaded", {})), "failed": dict(getattr(self, "_failed", {}))}
