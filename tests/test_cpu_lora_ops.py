"""Our grouped CPU LoRA ops against vLLM's own per-token ops, on random tensors with mixed adapters per batch."""

import pytest
import torch

import vllm.lora.ops.torch_ops.lora_ops as native
from services import vllm_cpu_lora as ours


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    n, d_in, rank, d_out, slots = 12, 48, 8, 40, 3
    return {
        "x": torch.randn(n, d_in, generator=g),
        "h": torch.randn(n, rank, generator=g),
        "a": torch.randn(slots, 1, rank, d_in, generator=g),
        "b": torch.randn(slots, 1, d_out, rank, generator=g),
        "idx": torch.tensor([0, 2, 2, 1, 0, 0, 1, 2, 0, 1, 1, 2]),
        "n": n, "rank": rank, "d_out": d_out,
    }


def test_shrink_matches_native(batch):
    want, got = torch.zeros(batch["n"], batch["rank"]), torch.zeros(batch["n"], batch["rank"])
    native.bgmv_shrink(batch["x"], batch["a"], want, batch["idx"], 0.5)
    ours.bgmv_shrink(batch["x"], batch["a"], got, batch["idx"], 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add", [True, False])
def test_expand_matches_native(batch, add):
    base = torch.randn(batch["n"], batch["d_out"])
    want, got = base.clone(), base.clone()
    native.bgmv_expand(batch["h"], batch["b"], want, batch["idx"], add)
    ours.bgmv_expand(batch["h"], batch["b"], got, batch["idx"], add)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expand_slice_matches_native(batch):
    base = torch.randn(batch["n"], batch["d_out"] + 10)
    want, got = base.clone(), base.clone()
    native.bgmv_expand_slice(batch["h"], batch["b"], want, batch["idx"], 5, batch["d_out"], True)
    ours.bgmv_expand_slice(batch["h"], batch["b"], got, batch["idx"], 5, batch["d_out"], True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_single_adapter_fast_path_and_no_adapter_rows(batch):
    same = torch.full((batch["n"],), 1)
    want, got = torch.zeros(batch["n"], batch["rank"]), torch.zeros(batch["n"], batch["rank"])
    native.bgmv_shrink(batch["x"], batch["a"], want, same, 1.0)
    ours.bgmv_shrink(batch["x"], batch["a"], got, same, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # -1 = this token's request names no adapter: its LoRA delta is zero, the others' are untouched
    mixed = batch["idx"].clone()
    mixed[::2] = -1
    base = torch.randn(batch["n"], batch["d_out"])
    out = base.clone()
    ours.bgmv_expand(batch["h"], batch["b"], out, mixed, True)
    assert torch.equal(out[::2], base[::2])
    assert not torch.allclose(out[1::2], base[1::2])


@pytest.mark.parametrize("requests", [1, 7])
def test_prompt_logprob_rows_take_the_batchs_one_adapter(batch, requests):
    """Prompt log-probs compute logits for every prompt position while the sampler indices hold one entry per
    request: 46 rows against 7 indices crashed the engine for every tenant (issue 17, finding 0). With one adapter in
    the batch every row takes it, as vLLM's op computes when given one index per row."""
    g = torch.Generator().manual_seed(1)
    rows = 46
    x, h = torch.randn(rows, 48, generator=g), torch.randn(rows, batch["rank"], generator=g)
    idx, per_row = torch.full((requests,), 2), torch.full((rows,), 2)
    want, got = torch.zeros(rows, batch["rank"]), torch.zeros(rows, batch["rank"])
    native.bgmv_shrink(x, batch["a"], want, per_row, 0.5)
    ours.bgmv_shrink(x, batch["a"], got, idx, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = torch.randn(rows, batch["d_out"], generator=g)
    want, got = base.clone(), base.clone()
    native.bgmv_expand(h, batch["b"], want, per_row, True)
    ours.bgmv_expand(h, batch["b"], got, idx, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if requests > 1:
        with pytest.raises(RuntimeError):  # vLLM's own op, given what the engine gives it
            native.bgmv_shrink(x, batch["a"], torch.zeros(rows, batch["rank"]), idx, 0.5)


def test_prompt_logprob_rows_of_a_mixed_batch_get_base_logits_not_a_crash(batch):
    rows = 46
    x, h = torch.randn(rows, 48), torch.randn(rows, batch["rank"])
    idx = torch.tensor([0, 1, 2, 0, -1, 1, 2])
    shrunk = torch.full((rows, batch["rank"]), 7.0)
    ours.bgmv_shrink(x, batch["a"], shrunk, idx, 1.0)
    assert torch.equal(shrunk, torch.zeros(rows, batch["rank"]))
    base = torch.randn(rows, batch["d_out"])
    out = base.clone()
    ours.bgmv_expand(h, batch["b"], out, idx, True)
    assert torch.equal(out, base)


@pytest.mark.parametrize("mixed", [False, True])
def test_bf16_adapters_fill_the_float32_buffer_close_to_the_native_op(batch, mixed):
    """vLLM's shrink buffer is float32 while the served model's adapter weights are bf16: ours multiplies in bf16
    (the speed: bench/generation.py, vllm-lora) and fills the float32 buffer within bf16's error of the native op,
    which multiplies in float32."""
    a = batch["a"].to(torch.bfloat16)
    x = batch["x"].to(torch.bfloat16)
    idx = batch["idx"] if mixed else torch.zeros_like(batch["idx"])
    got, want = torch.zeros(batch["n"], batch["rank"]), torch.zeros(batch["n"], batch["rank"])
    ours.bgmv_shrink(x, a, got, idx, 0.5)
    native.bgmv_shrink(x, a, want, idx, 0.5)
    assert got.dtype == torch.float32 and got.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
    if not mixed:  # one adapter: exactly the bf16 product, which a float32 one is not
        in_bf16 = 0.5 * (x @ a[0, 0].transpose(0, 1)).float()
        torch.testing.assert_close(got, in_bf16, rtol=0, atol=0)
        assert not torch.equal(got, 0.5 * (x.float() @ a[0, 0].float().transpose(0, 1)))


def _wrapper(indices):
    """vLLM's CPU punica wrapper with one step's token indices written as vLLM writes them (in place)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    w = PunicaWrapperCPU(64, 8, "cpu")
    w._token_lora_indices[: indices.shape[0]].copy_(indices)
    w.indices_len = [indices.shape[0]] * 4
    w.is_prefill = False
    return w


def _merged_layer(dtype):
    """A q/k/v-like merged layer: three slices of different widths, three adapter slots."""
    g = torch.Generator().manual_seed(1)
    n, d_in, rank, slots, widths = 10, 48, 8, 3, (40, 16, 16)
    a = tuple(torch.randn(slots, 1, rank, d_in, generator=g).to(dtype) for _ in widths)
    b = tuple(torch.randn(slots, 1, w, rank, generator=g).to(dtype) for w in widths)
    return torch.randn(n, d_in, generator=g).to(dtype), a, b, widths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("indices", ["one", "mixed", "none"])
def test_fused_lora_linear_equals_vllms_loop_over_slices(dtype, indices):
    """The fused `add_lora_linear` (one shrink for all slices, stacked A cached per slot) gives the output of vLLM's
    own wrapper with vLLM's own per-token ops: for a step on one adapter (the fused path), several, or none."""
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    x, a, b, widths = _merged_layer(dtype)
    n = x.shape[0]
    idx = {"one": torch.full((n,), 2), "mixed": torch.tensor([0, 2, 1, -1, 2, 0, 1, 1, 2, 0]),
           "none": torch.full((n,), -1)}[indices]
    base = torch.randn(n, sum(widths)).to(dtype)
    want, got = base.clone(), base.clone()
    upstream = punica_cpu.PunicaWrapperCPU.add_lora_linear
    assert upstream is not ours.add_lora_linear  # the reference is vLLM's own method and ops
    upstream(_wrapper(idx), want, x, a, b, 0.5, widths)
    ours._upstream_add_lora_linear = upstream
    fused = _wrapper(idx)
    ours.add_lora_linear(fused, got, x, a, b, 0.5, widths)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 0.25}
    torch.testing.assert_close(got, want, **tol)
    assert (fused._st_groups[1] == (2,)) == (indices == "one")  # the fused path ran only where one adapter takes all
    if indices == "one":
        assert not torch.allclose(got, base)


def test_fused_lora_linear_sees_a_reloaded_adapter():
    """Loading an adapter into a slot writes the stacked tensors in place: the cached stacked A must follow."""
    x, a, b, widths = _merged_layer(torch.float32)
    idx = torch.full((x.shape[0],), 1)
    w = _wrapper(idx)
    first = torch.zeros(x.shape[0], sum(widths))
    ours.add_lora_linear(w, first, x, a, b, 1.0, widths)
    for t in a:
        t[1].mul_(-1.0)
    again = torch.zeros_like(first)
    ours.add_lora_linear(w, again, x, a, b, 1.0, widths)
    torch.testing.assert_close(again, -first)
