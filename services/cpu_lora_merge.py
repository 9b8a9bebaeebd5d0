"""Steps where every token takes the same LoRA adapter run each LoRA layer as one GEMM on a merged weight
(W + B·A, built once per adapter slot), installed by the CPU LoRA plugin (`services/vllm_cpu_lora.py`).

vLLM-CPU computes a LoRA layer as the base GEMM (oneDNN, on a weight prepacked at load) plus a shrink and an expand
per slice in plain torch matmuls. Measured in-process on the embedded model (256 prompts x 128 tokens, bf16, 2-core
AVX512-BF16 EPYC): 662.9 tok/s without an adapter, 481.9 with one; py-spy put 26% of the model worker's time in the
LoRA matmuls against 39% in all base GEMMs, for about a sixth of their FLOPs. Merged, in a later pair of runs: 601.3
against 522.0 tok/s unmerged (`bench/generation.py --only vllm-lora vllm-lora-unmerged`). The main job's ST-S eval,
DPO sampling and ST-D eval each serve one adapter at a time, so their steps can use a merged weight instead, as
PEFT's `merge_and_unload` would, without a second engine. Steps that mix adapters (or mix an adapter with the base
model) keep vLLM's unmerged path, so every request still gets its own adapter.

The base weight is read back from the layer's own GEMM (vLLM keeps only its prepacked copy): the layer applied to
the identity matrix returns it exactly, since each output sums a single product. Merging adds one rounding of
W + B·A to the model's dtype, the rounding PEFT's merge makes; `tests/test_cpu_lora_merge.py` bounds it.
"""

from __future__ import annotations

import logging
import os

from .vllm_cpu_lora import slot_of, step_adapters

ENV_DISABLE = "SAFE_TRIGGER_UNMERGED_LORA"  # "1": keep the unmerged path (bench/generation.py, mode vllm-lora-unmerged)
# Merged copies kept per layer: each is another copy of the LoRA layers' weights (~200 MB for the embedded model in
# bf16). The main job serves one adapter per stage; a loaded adapter drops every copy (see `_versions`), so a third
# adapter used in single-adapter steps before the next load runs unmerged, never evicting one and rebuilding it
MAX_MERGED_SLOTS = 2

_log = logging.getLogger("vllm.safe_trigger")


def merging_enabled() -> bool:
    return os.environ.get(ENV_DISABLE) != "1"


def mergeable(layer) -> bool:
    """An unquantized layer on one device whose output is exactly its base GEMM plus the LoRA delta."""
    base = layer.base_layer
    method = getattr(base, "quant_method", None)
    return (getattr(layer, "tp_size", 1) == 1 and type(method).__name__ == "UnquantizedLinearMethod"
            and hasattr(base, "input_size_per_partition"))


def base_weight(layer):
    """The layer's base weight as (out, in), read back once through its own GEMM from the identity matrix."""
    import torch

    cached = layer.__dict__.get("_st_base_weight")
    if cached is None:
        base = layer.base_layer
        eye = torch.eye(base.input_size_per_partition, dtype=base.params_dtype)
        cached = base.quant_method.apply(base, eye, None).t().contiguous()
        layer.__dict__["_st_base_weight"] = cached
    return cached


def merged_weight(base, lora_a_stacked, lora_b_stacked, output_slices, slot: int):
    """base + B·A of adapter slot `slot`, slice by slice along the output rows, rounded once to base's dtype.
    vLLM has folded the adapter's scaling into B when it loaded it (`LoRALayerWeights.optimize`)."""
    import torch

    merged = base.to(torch.float32, copy=True)  # a float32 base's .float() is the cached base itself
    offset = 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
        merged[offset : offset + size] += slot_of(b, slot)[:size].float() @ slot_of(a, slot).float()
        offset += size
    return merged.to(base.dtype)


def _versions(layer) -> tuple:
    """Changes whenever vLLM writes any adapter slot of this layer (loading copies into the stacked tensors in
    place, which bumps their version counters)."""
    return tuple((t.data_ptr(), t._version) for t in (*layer.lora_a_stacked, *layer.lora_b_stacked))


def _linear_for(weight):
    """A GEMM on `weight` (out, in) the way vLLM-CPU runs its base layers: oneDNN on a prepacked copy where the
    build has it, torch's linear otherwise."""
    import torch
    from vllm import _custom_ops as ops

    if getattr(ops, "_supports_onednn", False):
        try:
            handler = ops.create_onednn_mm(weight.t(), 32)
            return lambda x, bias: ops.onednn_mm(handler, x, bias)
        except RuntimeError:
            pass
    return lambda x, bias: torch.nn.functional.linear(x, weight, bias)


def merged_linear(layer, slot: int):
    """The merged GEMM for adapter slot `slot` of this layer, built on first use after the slot was written; None
    where `MAX_MERGED_SLOTS` other slots already hold a merged copy."""
    versions = _versions(layer)
    cache = layer.__dict__.get("_st_merged")
    if cache is None or cache[0] != versions:
        cache = layer.__dict__["_st_merged"] = (versions, {})
    linears = cache[1]
    if slot not in linears:
        if len(linears) >= MAX_MERGED_SLOTS:
            return None
        weight = merged_weight(base_weight(layer), layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices,
                               slot)
        linears[slot] = _linear_for(weight)
    return linears[slot]


def install(lora_base_linear) -> None:
    """Wraps `BaseLinearLayerWithLoRA._apply_sync` (every unsharded LoRA linear layer's forward on CPU), where
    `step_adapters` tells which adapter slots the step's tokens take (-1: none). A step without any
    adapter (the base model's stages) runs the base GEMM alone: vLLM applied an all-zero delta there, 2.2% of the
    engine's time in the main job's self-judge (py-spy)."""
    cls = lora_base_linear.BaseLinearLayerWithLoRA
    upstream = cls._apply_sync
    if getattr(upstream, "_st_merged", False):
        return

    def _apply_sync(self, x, bias=None):
        wrapper = self.punica_wrapper
        rows = x.shape[0] if x.dim() == 2 else -1
        if rows != wrapper.token_lora_indices.shape[0]:
            return upstream(self, x, bias)
        slots = step_adapters(wrapper)
        if slots == (-1,):
            return self._get_quant_method().apply(self.base_layer, x, bias)
        linear = merged_linear(self, slots[0]) if len(slots) == 1 and mergeable(self) else None
        return upstream(self, x, bias) if linear is None else linear(x, bias)

    _apply_sync._st_merged = True
    cls._apply_sync = _apply_sync
    _log.info("safe-trigger: merged-weight LoRA for single-adapter steps installed (pid %d)", os.getpid())
