"""The compact LM head of CPU training computes what TRL's fused head computes: the same per-token fields and loss,
and the same gradients, on a padded batch of the embedded model with prompts masked out; calls without
`fused_lm_head` and models whose logits are scaled or capped are left to the forward they had."""

from __future__ import annotations

import pytest
import torch

from safetrigger.lm_head import FIELDS, compact_heads_in, compact_lm_head


def _model(model_path, head: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    add_fused_lm_head(peft.get_base_model(), outputs=FIELDS)  # as TRL's trainers do
    if head == "compact":
        assert compact_lm_head(peft.get_base_model(), FIELDS)
    return peft


def _batch():
    """Two rows of different lengths: prompts masked, the shorter row right-padded (labels -100 past its end)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (2, 48), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 40:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, :17] = -100
    labels[1, :29] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _run(model, batch, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch, fused_lm_head=True)
    model.zero_grad()
    out.loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return out, grad


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_compact_head_gives_trls_fields_loss_and_gradients(model_path):
    batch = _batch()
    trl_out, trl_grad = _run(_model(model_path, "trl"), batch, bf16=False)
    out, grad = _run(_model(model_path, "compact"), batch, bf16=False)
    torch.testing.assert_close(out.loss, trl_out.loss, atol=1e-5, rtol=1e-5)
    for field in FIELDS:
        torch.testing.assert_close(getattr(out, field), getattr(trl_out, field), atol=1e-4, rtol=1e-4, msg=field)
    assert torch.equal(out.label_mask, trl_out.label_mask)
    assert int(out.label_mask.sum()) == (48 - 17) + (40 - 29)  # the labelled tokens: completions, not padding
    assert (out.log_probs[~out.label_mask] == 0).all()
    assert _rel(grad, trl_grad) < 1e-4


def test_under_bf16_autocast_its_gradients_are_as_close_to_float32_as_trls(model_path):
    batch = _batch()
    exact = _run(_model(model_path, "trl"), batch, bf16=False)[1]
    trl_grad = _run(_model(model_path, "trl"), batch, bf16=True)[1]
    out, grad = _run(_model(model_path, "compact"), batch, bf16=True)
    assert _rel(grad, exact) < 1.1 * _rel(trl_grad, exact) + 1e-3
    assert _rel(grad, trl_grad) < 0.05


def test_plain_calls_and_non_plain_heads_keep_their_forward(model_path):
    model = _model(model_path, "compact")
    batch = _batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 48, model.config.vocab_size)  # the model's own forward: full logits, no fused fields

    capped = _model(model_path, "trl").get_base_model()
    capped.config.final_logit_softcapping = 30.0
    before = capped.forward
    assert not compact_lm_head(capped, FIELDS)
    assert capped.forward == before


@pytest.mark.parametrize("wanted", [("log_probs",), ("log_probs", "entropy", "is_top1")])  # TRL's default; SFTTrainer's
def test_fields_not_asked_for_are_none(model_path, wanted):
    model = _model(model_path, "trl")
    compact_lm_head(model.get_base_model(), wanted)
    with torch.no_grad():
        out = model(**_batch(), fused_lm_head=True)
    assert {f for f in FIELDS if getattr(out, f) is not None} == set(wanted)


def test_the_head_a_trainer_adds_while_built_is_the_compact_one_unless_trl_must_keep_it(model_path):
    """Inside `compact_heads_in`, the trainer module's `add_fused_lm_head` installs the compact head with the
    fields asked for; a temperature, a float32 head or a capped model go to TRL's; on leaving, TRL's is back."""
    import types

    trl_calls = []
    module = types.SimpleNamespace(__name__="a_trainer", add_fused_lm_head=lambda model, **kw: trl_calls.append(kw))
    trl_head = module.add_fused_lm_head
    plain, capped = (_model(model_path, "trl").get_base_model() for _ in range(2))
    capped.config.final_logit_softcapping = 30.0
    with compact_heads_in(module):
        module.add_fused_lm_head(plain, outputs=("log_probs", "is_top1"))
        assert trl_calls == []
        module.add_fused_lm_head(plain, temperature=0.7)
        module.add_fused_lm_head(plain, cast_lm_head_to_fp32=True)
        module.add_fused_lm_head(capped, outputs=FIELDS)
    assert [c.get("temperature") for c in trl_calls] == [0.7, 1.0, 1.0] and trl_calls[2]["outputs"] == FIELDS
    assert module.add_fused_lm_head is trl_head
    with torch.no_grad():
        out = plain(**_batch(), fused_lm_head=True)
    assert {f for f in FIELDS if getattr(out, f) is not None} == {"log_probs", "is_top1"}
    with pytest.raises(RuntimeError, match="TRL changed"), compact_heads_in(types.SimpleNamespace(__name__="other")):
        pass
