"""The policy's Serve deployment class: `ray.serve.llm`'s `LLMServer` with one measured change.

`ray.serve.llm` forces vLLM's multiprocess executor on CPU. With one engine worker that adds a worker process
next to the engine core, and the core busy-polls the shared-memory queue between them (vLLM's 1 s busy loop
after every read), stealing one of this machine's two cores from the matrix work. Measured through Serve,
32 concurrent chat requests x 128 tokens: 120–175 tok/s with the multiprocess executor, see the closing note
of the spine issue for the uniprocess figure. With tensor parallelism (several workers) or on GPUs nothing
changes. The class is plugged in through `LLMConfig.server_cls`, the library's own extension point.
"""

from __future__ import annotations

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm import LLMServer


class PolicyEngine(VLLMEngine):
    def _prepare_engine_config(self, callback_ctx):
        engine_args, frontend_args, vllm_config = super()._prepare_engine_config(callback_ctx)
        parallel = vllm_config.parallel_config
        if vllm_config.device_config.device_type == "cpu" and parallel.world_size == 1:
            parallel.distributed_executor_backend = "uni"
            engine_args.distributed_executor_backend = "uni"
        return engine_args, frontend_args, vllm_config


class PolicyServer(LLMServer):
    _default_engine_cls = PolicyEngine
