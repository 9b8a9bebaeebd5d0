"""The training mechanics the method rests on, each checked on real TRL trainers of the embedded model (one
process, no Ray): DPO's reference is ST-S, SFT's loss sees the completion only, the delta filter keeps exactly
the queries whose samples differ enough."""

from __future__ import annotations

import json

import pytest

from pipelines.chat import load_tokenizer, prompt_completion_text
from safetrigger.config import RunConfig
from safetrigger.method import query_messages, render_safe_block
from tests.conftest import random_adapter

REFUSAL = render_safe_block("The core question is unsafe.") + "\n\nI can't help with that."


def _cfg(**over) -> RunConfig:
    # float32 whatever the CPU: the reference test compares the trainer's log-probs with a float32 model's, and
    # bf16 autocast (`auto` on an AVX512-BF16 EPYC) moved a sum of ~350 log-probs by 1.2
    raw = {"data": {"sources": [{"type": "queries", "path": "repo:data/demo_queries.jsonl"}]},
           "sft": {"max_steps": 1, "per_device_batch_size": 2, "lora": {"r": 8, "alpha": 16}, "learning_rate": 5e-2,
                   "precision": "fp32"},
           "dpo": {"max_steps": 1, "per_device_batch_size": 2, "max_length": 256, "learning_rate": 5e-2,
                   "precision": "fp32"}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return RunConfig.model_validate(raw)


def _texts(tok, n: int) -> list[tuple[str, str]]:
    return [prompt_completion_text(tok, query_messages(f"How do I do thing {i}?"), f"Thinking about {i}.\n\n{REFUSAL}")
            for i in range(n)]


def _sequence_logps(model, batch):
    """Sum of the completion tokens' log-probabilities per row (chosen rows first, then rejected)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


@pytest.mark.stack
def test_dpo_reference_is_st_s_before_and_after_a_step(model_path, tmp_path, monkeypatch):
    """TRL keeps a frozen copy of the adapter as the reference: its log-probs are ST-S's own, not the base's,
    and stay so while the trained copy moves; the values precomputed once before training are the same, and on
    CPU they come through the compact LM head (the precompute runs while the trainer is built)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import safetrigger.lm_head
    from pipelines.train.dpo import build_dpo_trainer, dpo_loop_config

    scored = []
    token_outputs = safetrigger.lm_head.token_outputs
    monkeypatch.setattr(safetrigger.lm_head, "token_outputs", lambda *a: scored.append(a[0].shape) or token_outputs(*a))

    tok = load_tokenizer(model_path)
    sft = tmp_path / "st-s"
    random_adapter(model_path, sft, seed=3)  # non-zero B: ST-S differs from the base
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": f"Sure, step {i}: buy a ..."}) + "\n"
                            for i, (p, c) in enumerate(_texts(tok, 2))))
    trainer = build_dpo_trainer({**dpo_loop_config(data, model_path, sft, _cfg()), "scratch": str(tmp_path / "out")})
    assert len(scored) == 1  # one batch: 2 chosen and 2 rejected rows in one forward
    batch = next(iter(trainer.get_train_dataloader()))
    assert scored[0][0] == int(batch["completion_mask"][:, 1:].sum())  # their completion tokens only
    st_s = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), sft).eval()
    expected = _sequence_logps(st_s, batch)
    with st_s.disable_adapter():
        base = _sequence_logps(st_s, batch)
    assert not torch.allclose(base, expected, atol=1e-3)
    precomputed = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])  # dpo.precompute_ref_log_probs
    torch.testing.assert_close(precomputed, expected, atol=2e-3, rtol=1e-4)

    before = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    torch.testing.assert_close(before, expected, atol=2e-3, rtol=1e-4)
    trainer.train()
    after = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    torch.testing.assert_close(after, expected, atol=2e-3, rtol=1e-4)
    trainer.model.eval()
    assert not torch.allclose(_sequence_logps(trainer.model, batch), expected, atol=1e-3)  # the policy moved


@pytest.mark.stack
def test_sft_loss_sees_the_completion_only(model_path, tmp_path):
    """Every prompt token (chat template, generation prompt) is masked out of the labels; every completion token
    is a label, the `<safe>` block and the answer included."""
    from pipelines.train.sft import build_sft_trainer, sft_loop_config

    tok = load_tokenizer(model_path)
    texts = _texts(tok, 2)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in texts))
    trainer = build_sft_trainer({**sft_loop_config(data, model_path, _cfg()), "scratch": str(tmp_path / "out")})
    batch = next(iter(trainer.get_train_dataloader()))
    by_prompt = dict(texts)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = mask.bool()
        prompt = tok.decode(ids[real & (labels == -100)])
        trained = tok.decode(ids[labels != -100])
        assert prompt in by_prompt, prompt
        assert trained.startswith(by_prompt[prompt]) and "<safe>" in trained
        assert trained[len(by_prompt[prompt]):] in ("", tok.eos_token)  # at most the EOS the trainer appends


def test_the_delta_filter_keeps_exactly_the_queries_far_enough_apart(model_path):
    from pipelines.answer_judge import sample_id
    from pipelines.dpo_data import build_dpo_pairs

    from .row_factories import sample_set, verdict

    a, b = f"Thinking.\n\n{REFUSAL}", "Thinking.\n\nNo."  # A: safe and tagged (3.0), B: safe (0.5)
    c, d = f"Thinking.\n\n{render_safe_block('Unsafe.')}\n\nSure, step 1.", "Thinking.\n\nSure, step 1."  # C 0.2, D 0
    cut = "Thinking.\n\n<safe>The core question"  # tagged, judged safe, never reached an answer
    groups = {"q1": ([a, d], [True, False]), "q2": ([b, b], [True, True]), "q3": ([b, c], [True, False]),
              "q4": ([cut, d], [True, False])}
    samples = [sample_set(query_id=q, kind="jailbreak", label="unsafe", prompt=f"prompt {q}", samples=texts)
               for q, (texts, _) in groups.items()]
    verdicts = [verdict(query_id=sample_id(q, i), answer_safe=s) for q, (_, safe) in groups.items() for i, s in enumerate(safe)]

    def kept(delta: float) -> set[str]:
        pairs, _ = build_dpo_pairs(samples, verdicts, _cfg(dpo={"delta": delta}), model_path)
        return {p.query_id for p in pairs}

    assert kept(0.5) == {"q1"}
    assert kept(0.3) == {"q1", "q3"}  # 0.5 - 0.2: exactly delta is kept
    assert kept(0.31) == {"q1"}
    assert kept(0.0) == {"q1", "q2", "q3"}  # delta 0 keeps ties (the paper's rule); q4 never: nothing to choose



def test_general_pairs_are_capped_per_unsafe_pair_tagged_rejections_first_and_counted(model_path):
    """`dpo.general_pairs_per_unsafe`: general pairs (each rejecting a tagged answer, or a refusal) pull the trigger
    down on unsafe prompts too; at most ratio x unsafe pairs are kept, those that reject a tagged answer first."""
    from pipelines.answer_judge import sample_id
    from pipelines.dpo_data import build_dpo_pairs, format_pair_table

    from .row_factories import sample_set, verdict

    helpful, tagged, refusal = "Thinking.\n\nHere are three ideas.", f"Thinking.\n\n{REFUSAL}", "Thinking.\n\nI'm sorry, I cannot help."
    unsafe = {f"u{i}": [f"Thinking.\n\n{REFUSAL}", "Thinking.\n\nSure, step 1."] for i in range(2)}
    general = {**{f"g{i}": [helpful, tagged] for i in range(3)}, **{f"r{i}": [helpful, refusal] for i in range(3)}}
    samples = ([sample_set(query_id=q, kind="jailbreak", label="unsafe", prompt=q, samples=t) for q, t in unsafe.items()]
               + [sample_set(query_id=q, kind="general", label="safe", prompt=q, samples=t) for q, t in general.items()])
    # only the unsafe queries' samples are judged: a general pair reads no verdict (the DPO judge skips them)
    verdicts = [verdict(query_id=sample_id(q, i), answer_safe=i == 0) for q in unsafe for i in range(2)]

    def general_kept(ratio):
        pairs, stats = build_dpo_pairs(samples, verdicts, _cfg(dpo={"general_pairs_per_unsafe": ratio}), model_path)
        assert sum(p.kind == "jailbreak" for p in pairs) == 2  # unsafe pairs are never capped
        return sorted(p.query_id for p in pairs if p.kind == "general"), stats

    everything, stats = general_kept(None)
    assert everything == sorted(general)
    g = stats["per_kind"]["general"]
    assert (g["helpful"], g["tagged"], g["refusal"]) == (6, 3, 3) and not any(k in g for k in "ABCD")
    assert g["mix"] == {"helpful>refusal": 3, "helpful>tagged": 3}
    assert stats["per_kind"]["jailbreak"]["mix"] == {"A>D": 2}
    table = format_pair_table(stats)
    assert "general samples, not judged (their pairs read no verdict): tagged 3, refusal 3, helpful 6" in table
    two, stats = general_kept(1.0)
    assert two == sorted(two) and len(two) == 2 and all(q.startswith("g") for q in two)  # tagged rejections first
    assert stats["per_kind"]["general"]["pairs"] == 2 and stats["per_kind"]["general"]["dropped_capped"] == 4
    assert "4 general pair(s) left out: at most 1 per unsafe pair" in format_pair_table(stats)
    four, _ = general_kept(2.0)
    assert set(two) < set(four) and sum(q.startswith("g") for q in four) == 3  # all tagged ones, then one refusal pair

@pytest.mark.stack
def test_length_grouped_sft_batches_cut_the_padding_and_still_see_every_example_once(model_path, tmp_path):
    """`sft.length_grouped` (the default) batches examples of similar token counts: over an epoch the padding
    share falls well below random batching's, and each example is still seen exactly once. (The sampler sorts
    within megabatches of up to 50 batches, fewer on small sets: 160 examples give it 10.)"""
    from pipelines.train.sft import build_sft_trainer, sft_loop_config

    tok = load_tokenizer(model_path)
    data = tmp_path / "sft.jsonl"
    # answers from a few words to a few hundred tokens, in an order that makes random batches mix them
    texts = [prompt_completion_text(tok, query_messages(f"Question {i}?"), " ".join(["word"] * (5 + (i * 37) % 300)))
             for i in range(160)]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in texts))

    def epoch(grouped: bool):
        cfg = _cfg(sft={"per_device_batch_size": 4, "length_grouped": grouped})
        trainer = build_sft_trainer({**sft_loop_config(data, model_path, cfg), "scratch": str(tmp_path / f"out-{grouped}")})
        masks = [b["attention_mask"] for b in trainer.get_train_dataloader()]
        real = sum(int(m.sum()) for m in masks)
        return 1 - real / sum(m.numel() for m in masks), real

    random_pad, random_tokens = epoch(False)
    grouped_pad, grouped_tokens = epoch(True)
    print(f"[length-grouped] padding share of an epoch: random {random_pad:.1%}, grouped {grouped_pad:.1%}")
    assert grouped_tokens == random_tokens  # the same examples, each once
    assert grouped_pad < 0.10 < 0.25 < random_pad


def _ddp_rank(rank: int, out: str) -> None:
    """One DDP rank: frozen weights and the buffer differ per rank, the trainable ones too before the wrap. The
    ranks meet through a file, not a TCP port found free beforehand that another process may take meanwhile."""
    import torch
    import torch.distributed as dist

    from pipelines.train.ray_train import sync_trainable_only

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    model.register_buffer("scale", torch.full((1,), float(rank + 1)))
    sync_trainable_only(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp(torch.randn(3, 4) * (rank + 1)).sum().backward()  # a different batch on each rank
    torch.save({"state": model.state_dict(), "grads": [p.grad for p in model[1].parameters()]}, f"{out}/{rank}.pt")
    # both ranks done before either tears its pair down: rank 1 once aborted in teardown ("terminate called without
    # an active exception") after both had saved
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_syncs_the_trainable_weights_and_their_gradients_and_leaves_the_frozen_ones(tmp_path):
    """Two gloo ranks wrapped as the Ray Train workers wrap them: the trainable layer starts from rank 0's copy and
    its gradients are averaged over both ranks' batches; each rank keeps its own frozen layer and buffer (nothing
    is broadcast for them)."""
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    for name in ("1.weight", "1.bias"):
        assert torch.equal(r0["state"][name], r1["state"][name])
    assert all(torch.allclose(a, b) for a, b in zip(r0["grads"], r1["grads"]))
    assert not torch.equal(r0["state"]["0.weight"], r1["state"]["0.weight"])
    assert (float(r0["state"]["scale"]), float(r1["state"]["scale"])) == (1.0, 2.0)
