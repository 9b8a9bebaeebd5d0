"""Merged-weight LoRA for single-adapter steps (`services/cpu_lora_merge.py`) and the skipped all-zero LM-head
LoRA (`services/vllm_cpu_lora.add_lora_logits`), on vLLM's real CPU GEMM dispatch, punica wrapper and ops."""

from types import SimpleNamespace

import pytest
import torch

from services import cpu_lora_merge as merge
from services import vllm_cpu_lora as lora_ops
from tests.test_cpu_lora_ops import _wrapper

WIDTHS = (256, 64, 64)  # a q/k/v-like merged layer: slices of different widths
D_IN, RANK, SLOTS = 192, 16, 4


def _base_layer(dtype, seed=0):
    """A linear layer as vLLM-CPU leaves it after loading: weight prepacked for its GEMM, the weight itself gone."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(sum(WIDTHS), D_IN, generator=g) * 0.05).to(dtype)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    layer.params_dtype, layer.input_size_per_partition = dtype, D_IN
    layer.quant_method = UnquantizedLinearMethod()
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.numel() == 0
    return layer, weight


class _Reference:
    """A stand-in for vLLM's `BaseLinearLayerWithLoRA`: its `_apply_sync` is vLLM's own base GEMM plus vLLM's own
    punica wrapper loop over slices (with vLLM's per-token ops), what the merged path must reproduce."""

    calls = 0

    def _get_quant_method(self):
        return self.base_layer.quant_method

    def _apply_sync(self, x, bias=None):
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

        self.calls += 1

        assert punica_cpu.PunicaWrapperCPU.add_lora_linear is not lora_ops.add_lora_linear  # vLLM's, unpatched
        out = self.base_layer.quant_method.apply(self.base_layer, x, bias)
        punica_cpu.PunicaWrapperCPU.add_lora_linear(self.punica_wrapper, out, x, self.lora_a_stacked,
                                                    self.lora_b_stacked, 1.0, self.output_slices)
        return out


def _lora_layer(dtype, indices, seed=0):
    base, weight = _base_layer(dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    layer = _Reference()
    layer.base_layer, layer.tp_size, layer.output_slices = base, 1, WIDTHS
    layer.lora_a_stacked = tuple((torch.randn(SLOTS, 1, RANK, D_IN, generator=g) * 0.1).to(dtype) for _ in WIDTHS)
    layer.lora_b_stacked = tuple((torch.randn(SLOTS, 1, w, RANK, generator=g) * 0.1).to(dtype) for w in WIDTHS)
    layer.punica_wrapper = _wrapper(indices)
    return layer, weight


def _exact(layer, weight, x, slot):
    """The layer's output in float64 from its bf16/fp32 weights: base + B·A per slice, no rounding in between."""
    w = weight.double().clone()
    offset = 0
    for a, b, size in zip(layer.lora_a_stacked, layer.lora_b_stacked, WIDTHS):
        w[offset : offset + size] += b[slot, 0].double() @ a[slot, 0].double()
        offset += size
    return x.double() @ w.t()


@pytest.fixture
def installed():
    """`install` on a stand-in module, so vLLM's own class stays as it is for the rest of the session."""
    module = SimpleNamespace(BaseLinearLayerWithLoRA=type("Layer", (_Reference,), {}))
    merge.install(module)
    return module.BaseLinearLayerWithLoRA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_base_weight_reads_back_exactly_from_the_prepacked_gemm(dtype):
    layer, weight = _lora_layer(dtype, torch.full((8,), 1))
    got = merge.base_weight(layer)
    assert got.dtype == dtype and torch.equal(got, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merged_step_is_as_close_to_the_exact_output_as_the_unmerged_one(dtype, installed):
    """Merging rounds W + B·A once to the model's dtype (as PEFT's merge does); vLLM's unmerged path rounds the
    shrink, the expand and the sum. In bf16 the merged error must stay within the unmerged one's order."""
    n, slot = 24, 2
    layer, weight = _lora_layer(dtype, torch.full((n,), slot))
    x = (torch.randn(n, D_IN, generator=torch.Generator().manual_seed(5))).to(dtype)
    exact = _exact(layer, weight, x, slot)
    unmerged = _Reference._apply_sync(layer, x)
    layer.__class__ = installed
    merged = layer._apply_sync(x)
    assert slot in layer.__dict__["_st_merged"][1]  # the merged GEMM ran
    scale = exact.abs().max().item()
    err_merged = (merged.double() - exact).abs().max().item() / scale
    err_unmerged = (unmerged.double() - exact).abs().max().item() / scale
    if dtype == torch.float32:
        assert err_merged < 1e-5 and err_unmerged < 1e-5
    else:
        assert err_merged < 2 * err_unmerged + 2 ** -9 and err_merged < 2 ** -6
    assert (merged.double() - x.double() @ weight.double().t()).abs().max() > 10 * err_merged * scale  # LoRA counted


@pytest.mark.parametrize("indices", ["mixed", "none", "padded"])
def test_steps_without_exactly_one_adapter_keep_vllms_path(indices, installed):
    """Mixed steps take vLLM's path; steps where no token has an adapter take the base GEMM alone (vLLM's path
    would add an all-zero delta), with the same output."""
    n = 10
    idx = {"mixed": torch.tensor([0, 2, 1, -1, 2, 0, 1, 1, 2, 0]), "none": torch.full((n,), -1),
           "padded": torch.full((n - 2,), 1)}[indices]
    layer, layer_weight = _lora_layer(torch.float32, idx)
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(3))
    if indices == "padded":  # more rows than indices: vLLM's own ops refuse them, and so must the wrapped layer
        with pytest.raises(RuntimeError):
            _Reference._apply_sync(layer, x)
        layer.__class__ = installed
        with pytest.raises(RuntimeError):
            layer._apply_sync(x)
    else:
        # index -1 = no adapter; vLLM's own per-token op would read the last slot for it (our grouped ops, which the
        # engine runs, add nothing), so the base GEMM is the reference there
        want = _Reference._apply_sync(layer, x) if indices == "mixed" else x @ layer_weight.t()
        layer.__class__ = installed
        calls = layer.calls
        torch.testing.assert_close(layer._apply_sync(x), want, rtol=1e-5, atol=1e-5)
        assert layer.calls == calls + (indices == "mixed")
    assert "_st_merged" not in layer.__dict__


def test_a_reloaded_slot_is_merged_again(installed):
    """vLLM loads an adapter by copying into the stacked tensors in place: the merged copy must follow it."""
    n, slot = 6, 1
    layer, weight = _lora_layer(torch.float32, torch.full((n,), slot))
    layer.__class__ = installed
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(4))
    before = layer._apply_sync(x)
    for b in layer.lora_b_stacked:
        b[slot].mul_(-1.0)  # a new adapter in the same slot: B·A flips sign
    after = layer._apply_sync(x)
    base = x @ weight.t()
    torch.testing.assert_close(after - base, -(before - base), rtol=1e-4, atol=1e-4)


def test_no_more_than_the_cap_of_merged_copies_and_the_rest_still_correct(installed):
    n = 6
    layer, weight = _lora_layer(torch.float32, torch.full((n,), 0))
    layer.__class__ = installed
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(6))
    for slot in range(merge.MAX_MERGED_SLOTS + 1):
        layer.punica_wrapper = _wrapper(torch.full((n,), slot))
        want = _exact(layer, weight, x, slot)
        torch.testing.assert_close(layer._apply_sync(x).double(), want, rtol=1e-4, atol=1e-4)
    assert sorted(layer.__dict__["_st_merged"][1]) == list(range(merge.MAX_MERGED_SLOTS))


def _logits_wrapper(sampler_indices):
    w = _wrapper(torch.full((sampler_indices.shape[0],), 0))
    w._sampler_indices[: sampler_indices.shape[0]].copy_(sampler_indices)
    return w


@pytest.mark.parametrize("case", ["empty_slot", "trained_slot", "mixed", "no_adapter"])
def test_lm_head_lora_is_skipped_only_where_it_adds_nothing(case, monkeypatch):
    """PEFT's "all-linear" adapters leave the LM head out, so their slot of vLLM's LM-head LoRA is all zeros."""
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    n, hidden, vocab = 5, 32, 300
    g = torch.Generator().manual_seed(7)
    a = torch.randn(SLOTS, 1, RANK, hidden, generator=g)
    b = torch.randn(SLOTS, 1, vocab, RANK, generator=g)
    b[1].zero_()
    a[1].zero_()
    idx = {"empty_slot": torch.full((n,), 1), "trained_slot": torch.full((n,), 2),
           "mixed": torch.tensor([1, 2, 1, 1, 2]), "no_adapter": torch.full((n,), -1)}[case]
    x, base = torch.randn(n, hidden, generator=g), torch.randn(n, vocab, generator=g)
    want, got = base.clone(), base.clone()
    if case != "no_adapter":  # vLLM's per-token op reads the last slot for index -1; no adapter adds nothing
        punica_cpu.PunicaWrapperCPU.add_lora_logits(_logits_wrapper(idx), want, x, a, b, 1.0)
    vllms = punica_cpu.PunicaWrapperCPU.add_lora_logits
    assert vllms is not lora_ops.add_lora_logits
    calls = []
    monkeypatch.setattr(lora_ops, "_upstream_add_lora_logits",
                        lambda *args, **kw: calls.append(1) or vllms(*args, **kw))
    lora_ops.add_lora_logits(_logits_wrapper(idx), got, x, a, b, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert bool(calls) == (case in ("trained_slot", "mixed"))
