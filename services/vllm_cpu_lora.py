"""Grouped LoRA matmuls for vLLM's CPU (PyTorch-native) punica ops, loaded as a vLLM general plugin.

vLLM-CPU applies LoRA by gathering a copy of the adapter weights for every token
(`weights[token_indices]` -> tokens x out x rank) and contracting per token. A batch rarely uses more than one
or two adapters, so we multiply each group of tokens that share an adapter by that adapter's matrix once.
Measured on the embedded model (32 sequences x 128 tokens, 2 cores): base 113.8 tok/s, with a LoRA adapter
23.5 tok/s before; `bench/generation.py` prints ours and vLLM's side by side (modes vllm-lora, vllm-lora-native).
Tokens with index -1 (no adapter) get no LoRA delta, which is what the index means; the upstream gather would read
the last adapter slot for them.

Where every token of a step takes one adapter (a stage sampling from ST-S, the gateway serving one model),
`add_lora_linear` runs fused: one shrink for all slices of a merged layer (q/k/v, gate/up) against their
A matrices stacked once per loaded adapter, then one expand per slice, with no per-call index work. Measured
(`bench/generation.py --only vllm-lora`-like, 96 eval prompts x 128 tokens, in-process, 2 cores, bf16): the
unfused ops spent 10.5 s of a 41 s run in 178 shrinks and 150 expands per decode step.
"""

from __future__ import annotations

import logging
import os

from .engine_plugins import modules_to_patch

ENV_DISABLE = "SAFE_TRIGGER_NATIVE_LORA_OPS"  # "1": keep vLLM's own per-token ops (for side-by-side benches)


_log = logging.getLogger("vllm.safe_trigger")
_warned: set[str] = set()


def _per_row(indices, rows: int):
    """The adapter index of each of `rows` input rows. The logits of prompt log-probs (and echo) are computed for
    every prompt position of a request while the sampler indices hold one entry per request, so rows and indices
    disagree there (vLLM's own per-token op fails the same way: an engine crash for every tenant, issue 17). With
    one adapter in the batch every row takes it; with several, which request a row belongs to is not known here, so
    those rows get no LoRA delta (the base model's logits) and a warning, never a crash."""
    import torch

    if indices.shape[0] >= rows:
        return indices[:rows]
    groups = torch.unique(indices).tolist()
    if len(groups) == 1:
        return indices.new_full((rows,), groups[0])
    if "mixed" not in _warned:
        _warned.add("mixed")
        _log.warning("safe-trigger: %d logits rows for %d requests with different adapters (prompt log-probs in a "
                     "mixed batch): those rows get the base model's logits", rows, indices.shape[0])
    return indices.new_full((rows,), -1)


def _grouped_matmul(inputs, weights, indices, dtype, rows: int | None = None):
    """`rows`: how many rows the caller's output has (the inputs may carry padding past them). The product is
    computed in the adapter weights' own dtype and returned in `dtype`: vLLM's shrink buffer is float32, and casting
    bf16 weights and activations up to it made every LoRA matmul a float32 one, 35% of the engine's time while
    it sampled from ST-S (py-spy, 2 cores); training computed these products in bf16 (autocast) too."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(weights.dtype)
    n = indices.shape[0] if rows is None or rows <= indices.shape[0] else rows
    indices = _per_row(indices, n)
    x = x[:n]
    groups = torch.unique(indices).tolist()
    if len(groups) == 1 and groups[0] >= 0:
        return (x @ weights[groups[0]].transpose(0, 1)).to(dtype)
    out = x.new_zeros(n, weights.shape[1])
    for g in groups:
        if g < 0:
            continue
        rows = (indices == g).nonzero(as_tuple=True)[0]
        out.index_copy_(0, rows, x.index_select(0, rows) @ weights[g].transpose(0, 1))
    return out.to(dtype)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    out = _grouped_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype,
                          min(inputs.shape[0], output_tensor.shape[0]))
    output_tensor[:, : out.shape[1]] = scaling * out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    out = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype,
                          min(inputs.shape[0], output_tensor.shape[0]))
    limit = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(out.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += out[:limit, :common]
    else:
        output_tensor[:, :common] = out[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                      add_inputs=True):
    out = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype,
                          min(inputs.shape[0], output_tensor.shape[0]))
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += out
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = out


def step_adapters(wrapper) -> tuple[int, ...]:
    """The adapter slots the tokens of this step take (-1: none), computed once per step: vLLM writes the step's
    indices in place into one buffer, which bumps its version."""
    import torch

    idx = wrapper.token_lora_indices
    key = (idx.data_ptr(), idx._version, idx.shape[0])
    cached = getattr(wrapper, "_st_groups", None)
    if cached is None or cached[0] != key:
        cached = wrapper._st_groups = (key, tuple(torch.unique(idx).tolist()))
    return cached[1]


def _single_adapter(wrapper) -> int | None:
    """The adapter slot every token of this step takes, else None (no adapter, or several)."""
    groups = step_adapters(wrapper)
    return groups[0] if len(groups) == 1 and groups[0] >= 0 else None


def slot_of(weights, g: int):
    """Adapter slot g of a stacked LoRA tensor (vLLM stacks them as slots x 1 x rows x cols, or slots x rows x cols)."""
    return weights[g, 0] if weights.dim() == 4 else weights[g]


def _stacked_a(wrapper, lora_a_stacked, g: int):
    """Slot g's A matrices of all slices as one (slices x rank, in) matrix, kept until vLLM writes the slot again
    (loading an adapter copies into the stacked tensors in place, which bumps their versions)."""
    import torch

    if len(lora_a_stacked) == 1:
        return slot_of(lora_a_stacked[0], g)
    key = (tuple(a.data_ptr() for a in lora_a_stacked), g)
    versions = tuple(a._version for a in lora_a_stacked)
    cache = wrapper.__dict__.setdefault("_st_stacked_a", {})
    hit = cache.get(key)
    if hit is None or hit[0] != versions:
        hit = cache[key] = (versions, torch.cat([slot_of(a, g) for a in lora_a_stacked], 0))
    return hit[1]


_upstream_add_lora_linear = None


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    """`PunicaWrapperCPU.add_lora_linear`, fused where the whole step takes one adapter (see the module doc);
    vLLM's own loop over slices otherwise."""
    x2 = x.view(-1, x.shape[-1])
    g = None if buffer is not None else _single_adapter(self)
    if g is None or x2.shape[0] != self.token_lora_indices.shape[0]:
        return _upstream_add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                         buffer=buffer, **kwargs)
    a = _stacked_a(self, lora_a_stacked, g)
    h = x2.to(a.dtype) @ a.transpose(0, 1)
    if scale != 1.0:
        h = h * scale
    rank = lora_a_stacked[0].shape[-2]
    y2 = y.view(-1, y.shape[-1])
    offset = 0
    for i, (b, size) in enumerate(zip(lora_b_stacked, output_slices)):
        y2[:, offset : offset + size] += (h[:, i * rank : (i + 1) * rank] @ slot_of(b, g).transpose(0, 1)).to(y2.dtype)
        offset += size


_upstream_add_lora_logits = None


def _empty_slot(wrapper, weights, g: int) -> bool:
    """Whether adapter slot g of `weights` is all zeros, cached until vLLM writes the stacked tensor again."""
    key = (weights.data_ptr(), weights._version, g)
    cached = wrapper.__dict__.get("_st_empty_slot")
    if cached is None or cached[0] != key:
        cached = wrapper.__dict__["_st_empty_slot"] = (key, not bool(slot_of(weights, g).any()))
    return cached[1]


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs):
    """`PunicaWrapperCPU.add_lora_logits`, skipped where the step's one adapter has no LM-head weights: vLLM wraps
    the LM head for every adapter and multiplies by an all-zero slot where the adapter does not train it (PEFT's
    "all-linear" leaves it out), 3.2% of the model worker's time in py-spy (256 sequences decoding, bf16)."""
    import torch

    groups = torch.unique(self.sampler_indices).tolist()
    if len(groups) == 1 and (groups[0] < 0 or _empty_slot(self, lora_b_stacked, groups[0])):
        return None
    return _upstream_add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)


def register() -> None:
    """vLLM general plugin entry point: runs in every vLLM process (API server and engine core)."""
    modules = modules_to_patch(ENV_DISABLE, "vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.punica_wrapper.punica_cpu",
                               "vllm.lora.layers.base_linear")
    if modules is None:
        return
    ops, punica_cpu, base_linear = modules
    if punica_cpu.bgmv_shrink is bgmv_shrink:
        return
    global _upstream_add_lora_linear, _upstream_add_lora_logits
    _upstream_add_lora_linear = punica_cpu.PunicaWrapperCPU.add_lora_linear
    punica_cpu.PunicaWrapperCPU.add_lora_linear = add_lora_linear
    _upstream_add_lora_logits = punica_cpu.PunicaWrapperCPU.add_lora_logits
    punica_cpu.PunicaWrapperCPU.add_lora_logits = add_lora_logits
    from . import cpu_lora_merge  # here, not at the top: it builds on this module's helpers

    if cpu_lora_merge.merging_enabled():
        cpu_lora_merge.install(base_linear)
    for module in (ops, punica_cpu):
        module.bgmv_shrink = bgmv_shrink
        module.bgmv_expand = bgmv_expand
        module.bgmv_expand_slice = bgmv_expand_slice
    # a "vllm." logger: vLLM configures those in every process it starts, the engine core included
    _log.info("safe-trigger: grouped CPU LoRA ops installed (pid %d)", os.getpid())
