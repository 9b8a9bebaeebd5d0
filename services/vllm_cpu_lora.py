"""Grouped LoRA matmuls for vLLM's CPU (PyTorch-native) punica ops, loaded as a vLLM general plugin.

vLLM-CPU applies LoRA by gathering a copy of the adapter weights for every token
(`weights[token_indices]` -> tokens x out x rank) and contracting per token. A batch rarely uses more than one
or two adapters, so we multiply each group of tokens that share an adapter by that adapter's matrix once.
Measured on the embedded model (32 sequences x 128 tokens, 2 cores): base 113.8 tok/s, with a LoRA adapter
23.5 tok/s before; `bench/generation.py` prints ours and vLLM's side by side (modes vllm-lora, vllm-lora-native).
Tokens with index -1 (no adapter) get no LoRA delta, which is what the index means; the upstream gather would read
the last adapter slot for them.
"""

from __future__ import annotations

import logging
import os

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


def register() -> None:
    """vLLM general plugin entry point: runs in every vLLM process (API server and engine core)."""
    if os.environ.get(ENV_DISABLE) == "1":
        return
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        import vllm.lora.ops.torch_ops.lora_ops as ops
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    except ImportError:
        return
    if punica_cpu.bgmv_shrink is bgmv_shrink:
        return
    for module in (ops, punica_cpu):
        module.bgmv_shrink = bgmv_shrink
        module.bgmv_expand = bgmv_expand
        module.bgmv_expand_slice = bgmv_expand_slice
    # a "vllm." logger: vLLM configures those in every process it starts, the engine core included
    _log.info("safe-trigger: grouped CPU LoRA ops installed (pid %d)", os.getpid())
