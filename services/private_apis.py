"""Every private Ray / vLLM name this project touches, in one place, with the versions it was checked against.

`ray.serve.llm` has public extension points (`LLMConfig.server_cls`, `ingress_cls_config`) but the classes one
extends through them expose their hooks only as private members, and a few types have no public alias. Each touch
point below says why it is needed; `tests/test_private_apis.py` checks that each still exists on the installed
versions (so an upgrade fails there, by name, not in a stack test) and that no other module imports
`ray.llm._internal`.
"""

from __future__ import annotations

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

CHECKED_AGAINST = {"ray": "2.60.0", "vllm": "0.32.0"}

# (object path, attribute, used by, why)
TOUCH_POINTS: tuple[tuple[str, str, str, str], ...] = (
    ("ray.llm._internal.serve.core.configs.openai_api_models", "ModelCard", "policy_ingress",
     "the card type /v1/models returns; no public alias"),
    ("ray.llm._internal.serve.core.configs.openai_api_models", "ModelList", "policy_ingress",
     "the list type /v1/models returns; no public alias"),
    ("ray.llm._internal.serve.core.configs.llm_config", "DiskMultiplexConfig", "policy_server",
     "what LLMServer's engine loads a LoRA adapter from"),
    ("ray.llm._internal.serve.engines.vllm.vllm_engine", "VLLMEngine", "policy_server",
     "subclassed to pick vLLM's uniprocess executor on CPU"),
    ("ray.llm._internal.serve.engines.vllm.vllm_engine.VLLMEngine", "_prepare_engine_config", "policy_server",
     "the hook where the engine config is built (executor backend)"),
    ("ray.llm._internal.serve.engines.vllm.vllm_engine.VLLMEngine", "resolve_lora", "policy_server",
     "loads an adapter from a local path"),
    ("ray.llm._internal.serve.engines.vllm.vllm_engine.VLLMEngine", "_oai_models", "policy_server (instance attribute)",
     "vLLM's serving-models registry, to unload a replaced adapter version"),
    ("ray.serve.llm.LLMServer", "_run_request", "policy_server",
     "the one place every request passes: the adapter is resolved to its registry version there"),
    ("ray.serve.llm.LLMServer", "_maybe_resolve_lora_from_multiplex", "policy_server",
     "disabled: adapters come from the local registry, not cloud storage"),
    ("ray.serve.llm.LLMServer", "_start_engine", "policy_server",
     "starts the engine, then waits on Ray's usage-telemetry actor: overridden to start the engine alone"),
    ("ray.serve.llm.LLMServer", "_default_engine_cls", "policy_server", "how a server subclass names its engine"),
    ("ray.llm._internal.serve.core.ingress.ingress.OpenAiIngress", "_model_cards", "policy_ingress (instance attribute)",
     "the base model cards the adapter cards copy"),
    ("ray.llm._internal.serve.core.ingress.ingress.OpenAiIngress", "_default_serve_handles", "policy_ingress (instance attribute)",
     "asks one replica which adapter versions it holds"),
    ("ray.llm._internal.common.callbacks.base", "CallbackBase", "policy_server",
     "LLMConfig.callback_config's base class: its hook skips the per-node model-download task for local models"),
    ("ray.llm._internal.common.callbacks.base.CallbackCtx", "run_init_node", "policy_server",
     "the switch that skips that task"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_shrink", "vllm_cpu_lora",
     "the CPU LoRA ops our grouped matmuls replace (also bgmv_expand, bgmv_expand_slice)"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink", "vllm_cpu_lora", "the same ops where vLLM defines them"),
    ("vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU", "add_lora_logits", "vllm_cpu_lora",
     "the LM head's LoRA, skipped where the step's adapter has no LM-head weights"),
    ("vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA", "_apply_sync", "cpu_lora_merge",
     "a LoRA layer's base GEMM plus delta, run on a merged weight where the step takes one adapter"),
    ("vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA", "_get_quant_method", "cpu_lora_merge",
     "the base GEMM alone, for steps where no token takes an adapter"),
    ("vllm._custom_ops", "create_onednn_mm", "cpu_lora_merge",
     "prepacks a merged weight for oneDNN as vLLM-CPU does its base weights (also onednn_mm, _supports_onednn)"),
    ("vllm.v1.sample.ops.topk_topp_sampler.TopKTopPSampler", "forward_cpu", "vllm_cpu_sampler",
     "the CPU sampling step whose plain case our inverse-CDF draw replaces"),
    ("vllm.v1.sample.ops.topk_topp_sampler", "PROCESSED_LOGPROBS_MODES", "vllm_cpu_sampler",
     "the log-prob modes that need vLLM's own sampling code"),
)

__all__ = ["CHECKED_AGAINST", "TOUCH_POINTS", "CallbackBase", "DiskMultiplexConfig", "ModelCard", "ModelList",
           "VLLMEngine"]
