"""The LM head of LoRA training on CPU (SFT, DPO, the think model's build): the labelled positions only, in one
autocast matmul.

TRL's trainers patch the model's forward with a fused LM head (`trl.trainer.utils.add_fused_lm_head`): with
`fused_lm_head=True` it returns per-token log-probabilities (`FusedCausalLMOutput`) without materialising the
`[tokens, vocabulary]` logits. Its CUDA path (Triton) scores only the labelled positions; elsewhere it scores every
position, prompt included, recomputes each vocabulary tile in the backward pass and accumulates the hidden
states' gradient in float32 GEMMs. With SmolLM2-135M (49k vocabulary) on the AVX512-BF16 EPYC that head took 31%
of an SFT micro-batch (torch profiler, 12 micro-batches: 4.5 s forward, 10.3 s backward of 48.3 s).

On CPU, where a training sequence is at most a few thousand tokens, the logits of the labelled positions fit
(768 completion tokens x 49k x 4 bytes: 150 MB): `compact_lm_head` computes them with the model's own LM head
under the trainer's autocast, takes an fp32 log-softmax and lets autograd do the rest, filling the same output
fields. Models whose head scales or soft-caps its logits keep TRL's head.
"""

from __future__ import annotations

import contextlib
import types

import torch

# text-config fields under which a model's logits are not plain `hidden @ W.T` (TRL's head reads the same ones),
# and the MoE router loss TRL's head adds
_NOT_PLAIN = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
              "output_router_logits")
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def plain_head(model) -> bool:
    """Whether the model's logits are its LM head's output as is (no soft-cap, scale or router loss)."""
    text_config = model.config.get_text_config()
    return not any(getattr(text_config, field, None) for field in _NOT_PLAIN)


def token_outputs(logits: torch.Tensor, targets: torch.Tensor, wanted: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The per-token fields of `FusedCausalLMOutput` named in `wanted`, for `[M, V]` logits and `[M]` targets: the
    target's log-probability (differentiable), the entropy, `log(sum p^2)`, the mean logit and whether the target is
    the first argmax. Unlike TRL's head, the entropy carries no gradient: SFT and DPO log it and never differentiate
    it, and its graph would hold one more `[M, V]` float32 tensor through the backward pass."""
    z = logits.float()
    log_p = torch.log_softmax(z, dim=-1)
    out = {"log_probs": log_p.gather(-1, targets[:, None]).squeeze(-1)}
    with torch.no_grad():
        if "entropy" in wanted:
            out["entropy"] = -(log_p.exp() * log_p).sum(-1)
        if "log_sum_sq_probs" in wanted:
            out["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, dim=-1)
        if "mean_logits" in wanted:
            out["mean_logits"] = z.mean(-1)
        if "is_top1" in wanted:
            out["is_top1"] = z.argmax(-1) == targets
    return out


def compact_lm_head(model, outputs: tuple[str, ...] = FIELDS) -> bool:
    """Give `model` (the transformers model, under any PEFT wrapper) the compact head for `fused_lm_head=True`
    calls, computing the `outputs` fields (the others are None, as TRL's); other calls go to the forward it had.
    Returns False, changing nothing, for a model whose head is not plain (`plain_head`)."""
    from trl.trainer.utils import FusedCausalLMOutput

    if not plain_head(model):
        return False
    previous = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        head = self.get_output_embeddings()
        per_token = token_outputs(head(hidden[mask]), labels[mask], outputs)
        fields = {name: per_token[name].new_zeros(mask.shape).masked_scatter(mask, per_token[name])
                  if name in per_token else None for name in FIELDS}
        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / n, label_mask=mask, **fields)

    model.forward = types.MethodType(forward, model)
    return True


@contextlib.contextmanager
def compact_heads_in(trainer_module):
    """While a TRL trainer of `trainer_module` (e.g. `trl.trainer.dpo_trainer`) is built, the head its `__init__`
    adds (`add_fused_lm_head`) is the compact one, computing the fields the trainer asks for; a temperature other
    than 1, a float32 head or a model whose logits are not plain keep TRL's. Installed after the trainer is built,
    the compact head missed the reference log-probs `DPOTrainer` precomputes inside `__init__`."""
    trl_head = getattr(trainer_module, "add_fused_lm_head", None)
    if trl_head is None:
        raise RuntimeError(f"{trainer_module.__name__} has no add_fused_lm_head: TRL changed how its trainers add "
                           "their LM head (safetrigger/lm_head.py)")

    def head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        if temperature != 1.0 or cast_lm_head_to_fp32 or not compact_lm_head(model, tuple(outputs)):
            trl_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)

    trainer_module.add_fused_lm_head = head
    try:
        yield
    finally:
        trainer_module.add_fused_lm_head = trl_head
