"""Frozen LoRA bases stored in bf16 change no bit of CPU bf16-autocast training: the same loss and the same adapter
gradients as the float32 bases autocast casts at every use; only the adapted base layers are cast, the adapter,
embeddings and norms stay float32; the SFT and DPO builders do it exactly when they train under CPU bf16."""

from __future__ import annotations

import pytest
import torch

from pipelines.train.frozen_bf16 import frozen_lora_bases, store_frozen_bases_in_bf16

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():  # the shipped weights are bf16 values, which any cast keeps: move them off that grid
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-3 * p.abs().mean().item())
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))


def _loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_bases_give_the_same_loss_and_gradients_under_autocast(model_path):
    ids = torch.randint(0, 49000, (1, 24), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(_model(model_path), ids)
    cast = _model(model_path)
    layers = cast.config.num_hidden_layers
    assert store_frozen_bases_in_bf16(cast) == layers * len(TARGETS)
    cast_loss, cast_grads = _loss_and_grads(cast, ids)
    assert torch.equal(cast_loss, loss)
    assert cast_grads.keys() == grads.keys() and len(grads) == 2 * layers * len(TARGETS)
    assert all(torch.equal(cast_grads[n], grads[n]) for n in grads)


def test_only_the_frozen_adapted_bases_are_cast(model_path):
    model = _model(model_path)
    store_frozen_bases_in_bf16(model)
    bases = {id(b.weight) for b in frozen_lora_bases(model)}
    for name, p in model.named_parameters():
        expected = torch.bfloat16 if id(p) in bases else torch.float32
        assert p.dtype == expected, name
    assert all(not p.requires_grad for p in model.parameters() if p.dtype == torch.bfloat16)
    assert any("lora_A" in n for n, p in model.named_parameters() if p.dtype == torch.float32 and p.requires_grad)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_sft_builder_casts_exactly_under_cpu_bf16(model_path, tmp_path, bf16):
    from pipelines.train.sft import build_sft_trainer, sft_loop_config
    from tests.conftest import sft_examples
    from tests.test_train_mechanics import _cfg

    data = sft_examples(tmp_path / "sft.jsonl", model_path, n=4)
    c = sft_loop_config(data, model_path, _cfg(sft={"precision": "bf16" if bf16 else "fp32"}))
    trainer = build_sft_trainer({**c, "scratch": str(tmp_path / "scratch")})
    assert c["bf16"] == bf16
    assert trainer.model.config._attn_implementation == "eager"  # on CPU (pipelines/train/ray_train.attention_for)
    dtypes = {b.weight.dtype for b in frozen_lora_bases(trainer.model)}
    assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)


def test_the_dpo_builder_casts_after_trls_reference_copy_and_trains(model_path, tmp_path):
    """Under CPU bf16 the DPO trainer's base layers are bf16 while both adapters (the trained one and the "ref"
    copy TRL adds while it is built) stay float32, and a step trains through them."""
    import json

    from pipelines.chat import load_tokenizer
    from pipelines.train.dpo import build_dpo_trainer, dpo_loop_config
    from tests.conftest import random_adapter
    from tests.test_train_mechanics import _cfg, _texts

    sft = random_adapter(model_path, tmp_path / "st-s", seed=3)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": f"Sure, step {i}: buy a ..."}) + "\n"
                            for i, (p, c) in enumerate(_texts(load_tokenizer(model_path), 2))))
    c = dpo_loop_config(data, model_path, sft, _cfg(dpo={"precision": "bf16"}))
    trainer = build_dpo_trainer({**c, "scratch": str(tmp_path / "out")})
    assert c["bf16"] and {b.weight.dtype for b in frozen_lora_bases(trainer.model)} == {torch.bfloat16}
    assert trainer.model.config._attn_implementation == "eager"
    adapters = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert any(".ref." in n for n in adapters) and all(p.dtype == torch.float32 for p in adapters.values())
    before = {n: p.detach().clone() for n, p in adapters.items() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
