"""The cheaper LoRA dropout keeps nn.Dropout's semantics: rate, scale, gradient, eval identity, and the swap into
a real PEFT model leaves the saved adapter unchanged."""

import math

import pytest
import torch
from torch import nn

from pipelines.train.lora_dropout import WordMaskDropout, use_word_mask_dropout


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_drop_rate_matches_p_in_every_lane(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000, 4)  # column j always comes from lane j of a 64-bit word
    y = WordMaskDropout(p).train()(x)
    dropped = (y == 0).float()
    bound = 6 * math.sqrt(p * (1 - p) / x.shape[0])
    for lane in range(4):
        assert abs(dropped[:, lane].mean().item() - p) < bound
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))


def test_masks_differ_between_calls_and_gradient_is_the_mask():
    d = WordMaskDropout(0.5).train()
    x = torch.randn(64, 33, requires_grad=True)  # numel not a multiple of 4
    y = d(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * 2.0)
    assert not torch.equal(d(x) != 0, y != 0)


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(5, 7)
    assert WordMaskDropout(0.05).eval()(x) is x
    assert WordMaskDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        WordMaskDropout(1.0)


def test_swap_replaces_every_lora_dropout_and_keeps_the_adapter_weights():
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=["0", "2"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_word_mask_dropout(model) == 2
    layers = [m for m in model.modules() if isinstance(m, WordMaskDropout)]
    assert len(layers) == 2 and all(m.p == 0.05 for m in layers)
    assert not any(type(m) is nn.Dropout for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert use_word_mask_dropout(model) == 0  # idempotent
