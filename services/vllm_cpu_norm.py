"""vLLM's own C++ RMSNorm kernels as the CPU engine's RMSNorm, loaded as a vLLM general plugin.

vLLM 0.32 routes RMSNorm through its IR ops, whose CPU platform default is the PyTorch-native implementation (about
eight tensor ops, float32 copies of the activations included); its C++ kernels (`torch.ops._C.rms_norm`,
`fused_add_rms_norm`, built into the CPU wheel) are registered as the `vllm_c` provider for GPUs only. py-spy on
the embedded engine's model worker (256 sequences decoding, bf16, 2-core AVX512-BF16 EPYC) found the native
`fused_add_rms_norm` in 10.5% of its samples. We register those kernels as the `cpu_c` provider, and the replicas
ask for it first (`services.policy.build_llm_config`: `ir_op_priority`), native behind it for what they do not take.
Measured in-process (`bench/generation.py --only vllm`, bf16, same machine, interleaved): 256 prompts x 128 new
tokens 587.8 and 551.1 tok/s against 545.3 and 524.8 native; 512 prompts x 1 token (prefill, as a judge) 17.3 and
16.5 s against 18.0 and 19.0.
"""

# no `from __future__ import annotations`: vLLM infers each provider's op schema from its evaluated annotations
import logging

PROVIDER = "cpu_c"
OPS = ("rms_norm", "fused_add_rms_norm")

_log = logging.getLogger("vllm.safe_trigger")


def _kernels_present() -> bool:
    import torch

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    current_platform.import_kernels()
    return all(hasattr(torch.ops._C, op) for op in OPS)


def _plain(x, weight, epsilon: float, variance_size=None) -> bool:
    """What the C kernels are given: no variance over a prefix, a weight of the input's dtype, a contiguous 2-D
    input (the layout tests/test_cpu_norm.py checks them on; anything else stays with the native code)."""
    return (variance_size is None and weight is not None and weight.dtype == x.dtype and x.dim() == 2
            and x.is_contiguous())


def _plain_add(x, x_residual, weight, epsilon: float, variance_size=None) -> bool:
    return _plain(x, weight, epsilon, variance_size) and x_residual.is_contiguous() and x_residual.shape == x.shape


def register() -> None:
    """vLLM general plugin entry point: runs in every vLLM process. The provider is registered (as unsupported
    where the kernels are missing) so that a priority naming it is valid in every process."""
    try:
        from vllm import ir
    except ImportError:
        return
    if PROVIDER in ir.ops.rms_norm.impls:
        return
    import torch
    from torch import Tensor

    present = _kernels_present()

    @ir.ops.rms_norm.register_impl(PROVIDER, supports_args=_plain, supported=present)
    def rms_norm(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> Tensor:
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, weight, epsilon)
        return out

    @ir.ops.fused_add_rms_norm.register_impl(PROVIDER, supports_args=_plain_add, supported=present, inplace=True)
    def fused_add_rms_norm(x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float,
                           variance_size: int | None = None) -> tuple[Tensor, Tensor]:
        # in place, as the kernel writes: x becomes the normalized sum, x_residual the sum
        torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
        return x, x_residual

    if present:
        _log.info("safe-trigger: vLLM's C++ RMSNorm kernels registered as IR provider %r", PROVIDER)
