"""vLLM's C++ RMSNorm kernels as the CPU engine's RMSNorm provider (`services/vllm_cpu_norm.py`): the same numbers as
vLLM's PyTorch-native implementation, the native one kept for what the kernels do not take, and the replicas asking
for it first."""

import pytest
import torch

from services import vllm_cpu_norm
from vllm import ir


@pytest.fixture(scope="module")
def provider():
    vllm_cpu_norm.register()
    impls = ir.ops.rms_norm.impls[vllm_cpu_norm.PROVIDER], ir.ops.fused_add_rms_norm.impls[vllm_cpu_norm.PROVIDER]
    assert all(i.supported for i in impls), "vLLM's CPU kernels are missing from this wheel"
    return impls


def _inputs(rows=37, hidden=576, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, hidden, generator=g).to(dtype), torch.randn(rows, hidden, generator=g).to(dtype),
            (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_equals_vllms_native_one(provider, dtype):
    x, _, w = _inputs(dtype=dtype)
    want = ir.ops.rms_norm.impls["native"].impl_fn(x, w, 1e-5)
    got = provider[0].impl_fn(x.clone(), w, 1e-5)
    torch.testing.assert_close(got, want, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_add_rms_norm_equals_vllms_native_one_and_writes_in_place(provider, dtype):
    x, r, w = _inputs(dtype=dtype)
    want_out, want_sum = ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x, r, w, 1e-5)
    xi, ri = x.clone(), r.clone()
    got_out, got_sum = provider[1].impl_fn(xi, ri, w, 1e-5)
    torch.testing.assert_close(got_out, want_out, **_tolerance(dtype))
    torch.testing.assert_close(got_sum, want_sum, **_tolerance(dtype))
    assert got_out.data_ptr() == xi.data_ptr() and got_sum.data_ptr() == ri.data_ptr()  # as the op declares


def test_what_the_kernels_do_not_take_falls_back_to_native(provider):
    x, r, w = _inputs()
    rms, fused = provider
    assert rms.supports_args(x, w, 1e-5) and fused.supports_args(x, r, w, 1e-5)
    assert not rms.supports_args(x, w, 1e-5, 288)  # variance over a prefix
    assert not rms.supports_args(x, w.float(), 1e-5)  # a weight of another dtype
    assert not rms.supports_args(x.t(), w[:37], 1e-5)  # not contiguous
    assert not rms.supports_args(x.view(1, 37, 576), w, 1e-5)  # not 2-D


def test_the_cpu_replicas_ask_for_the_kernels_first_and_gpu_replicas_do_not():
    from services.policy import build_llm_config
    from safetrigger.config import load_config

    from .conftest import REPO

    cpu = build_llm_config(load_config(REPO / "configs" / "embedded.yaml")).engine_kwargs
    assert cpu["ir_op_priority"] == {op: ["cpu_c"] for op in ("rms_norm", "fused_add_rms_norm")}
    gpu = build_llm_config(load_config(REPO / "configs" / "qwen3-8b.yaml"), model_path="/models/qwen3").engine_kwargs
    assert "ir_op_priority" not in gpu


def _tolerance(dtype):
    # one bf16 rounding apart: the kernel and the native code round the float32 result at different steps
    return {"rtol": 1.6e-2, "atol": 1.6e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
