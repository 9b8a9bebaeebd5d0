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
