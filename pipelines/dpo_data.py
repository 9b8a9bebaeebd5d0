"""Stage: DPO pairs from the SFT model's own samples (method step 4) and their statistics.

Each sample of an unsafe query is scored with the method's reward (F_safe from the answer judge, S_exist/S_full
from the `<safe>` block, T_full from the reasoning); per query the best and the worst sample form a pair when they
differ by at least delta. General queries, when in the pool, are not judged: the untagged helpful answer wins over
a tagged one (else a refusal), and their samples are counted as tagged / refusal / helpful / incomplete. Written as TRL
prompt/chosen/rejected text JSONL; a pair longer than `dpo.max_length` is dropped and counted, never cut.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from safetrigger.config import RunConfig
from safetrigger.method import (RewardWeights, capped_general, category, choose_pair, general_category, query_messages,
                                score_sample)
from safetrigger.method.reward import Pair, Scored

from .answer_judge import sample_id
from .chat import load_tokenizer, prompt_completion_text, reasoning_rule
from .rows import DpoPair, SampleSet, Verdict


class PairBuilder:
    """One query's pair, as `build_dpo_pairs` keeps it: scored by the method's reward (an unsafe query, from the
    judge's verdicts) or as a general query's (no verdict read), then written as TRL text and dropped when longer
    than `dpo.max_length`. The DPO sampling stage asks it too, to stop sampling general queries once the cap on
    their pairs is met (`pipelines/sample.py`)."""

    def __init__(self, cfg: RunConfig, model_path: str) -> None:
        self.cfg, self.rule, self.tok = cfg, reasoning_rule(cfg, model_path), load_tokenizer(model_path)
        d = cfg.dpo
        self.weights = RewardWeights(d.w_a, d.w_b, d.w_c)

    def label(self, s: SampleSet):
        """How its samples are counted: by the reward's categories, or a general query's (its samples not judged)."""
        return category if s.label == "unsafe" else general_category

    def build(self, s: SampleSet, safe: dict[str, bool]) -> tuple[list[Scored], tuple[Pair, DpoPair] | str]:
        """The scored samples and either the pair or why there is none (`dropped_no_pair`, `dropped_too_long`)."""
        d, unsafe, label = self.cfg.dpo, s.label == "unsafe", self.label(s)
        scored = [score_sample(text, safe[sample_id(s.query_id, i)] if unsafe else None, self.rule)
                  for i, text in enumerate(s.samples)]
        choice = choose_pair(scored, unsafe, d.delta, self.weights, d.rejected)
        if choice.pair is None:
            return scored, "dropped_no_pair"
        messages = query_messages(s.prompt, self.cfg.model.system_prompt)
        kwargs, tok = self.cfg.model.chat_template_kwargs, self.tok
        prompt, chosen = prompt_completion_text(tok, messages, choice.pair.chosen.text, kwargs)
        _, rejected = prompt_completion_text(tok, messages, choice.pair.rejected.text, kwargs)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in (chosen, rejected))
        if n_prompt + longest + 1 > d.max_length:  # +1: the EOS the trainer appends
            return scored, "dropped_too_long"
        return scored, (choice.pair, DpoPair(
            query_id=s.query_id, kind=s.kind, prompt=prompt, chosen=chosen, rejected=rejected,
            margin=choice.pair.margin,
            chosen_category=label(choice.pair.chosen), rejected_category=label(choice.pair.rejected),
            rewards=list(choice.rewards)))


def build_dpo_pairs(
    samples: list[SampleSet], verdicts: list[Verdict], cfg: RunConfig, model_path: str
) -> tuple[list[DpoPair], dict[str, Any]]:
    d, builder = cfg.dpo, PairBuilder(cfg, model_path)
    safe = {v.query_id: v.answer_safe for v in verdicts}
    built, per_kind = [], defaultdict(Counter)
    margins, mixes = defaultdict(list), defaultdict(Counter)
    for s in sorted(samples, key=lambda r: r.query_id):
        stats = per_kind[s.kind]
        scored, outcome = builder.build(s, safe)
        stats["queries"] += 1
        stats["samples"] += len(scored)
        stats.update(builder.label(s)(x) for x in scored)
        if isinstance(outcome, str):
            stats[outcome] += 1
            continue
        built.append(outcome)
    pairs = _capped(built, d.general_pairs_per_unsafe, per_kind)
    for p in pairs:
        per_kind[p.kind]["pairs"] += 1
        margins[p.kind].append(p.margin)
        mixes[p.kind][f"{p.chosen_category}>{p.rejected_category}"] += 1
    # the pair mix: which category beat which (C, tagged but complying, must be the rejected side often enough
    # to teach "tag -> safe answer")
    stats = {k: {**dict(c), "mean_margin": sum(margins[k]) / len(margins[k]) if margins[k] else 0.0,
                 "mix": dict(sorted(mixes[k].items()))} for k, c in sorted(per_kind.items())}
    return pairs, {"per_kind": stats, "delta": d.delta, "max_length": d.max_length, "judge": d.judge.type,
                   "rejected": d.rejected, **({} if d.general_pairs_per_unsafe is None
                                              else {"general_pairs_per_unsafe": d.general_pairs_per_unsafe})}


def _capped(built: list[tuple[Pair, DpoPair]], per_unsafe: float | None, per_kind: dict[str, Counter]) -> list[DpoPair]:
    """The pairs in query order, general ones under `dpo.general_pairs_per_unsafe`; those left out are counted."""
    general = [i for i, (_, p) in enumerate(built) if p.kind == "general"]
    keep = {general[j] for j in capped_general([built[i][0] for i in general], [built[i][1].query_id for i in general],
                                                 len(built) - len(general), per_unsafe)}
    if len(keep) < len(general):
        per_kind["general"]["dropped_capped"] += len(general) - len(keep)
    return [p for i, (_, p) in enumerate(built) if p.kind != "general" or i in keep]


def _judged(kind_stats: dict[str, Any]) -> bool:
    """Whether a kind's samples were counted by the reward's categories (judged), not as general ones."""
    return any(k in kind_stats for k in "ABCD")


def format_pair_table(stats: dict[str, Any]) -> str:
    lines = [f"DPO samples and pairs (judge: {stats['judge']}, delta {stats['delta']}, rejected: "
             f"{stats.get('rejected', 'worst')}; A safe+tag, B safe, C unsafe+tag, D unsafe)",
             "", "| kind | queries | samples | A | B | C | D | pairs | no pair | too long | mean margin | pair mix (chosen>rejected) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for kind, c in stats["per_kind"].items():
        abcd = " | ".join(str(c.get(k, 0)) if _judged(c) else "–" for k in "ABCD")
        lines.append(f"| {kind} | {c.get('queries', 0)} | {c.get('samples', 0)} | {abcd} | {c.get('pairs', 0)} | "
                     f"{c.get('dropped_no_pair', 0)} | "
                     f"{c.get('dropped_too_long', 0)} | {c['mean_margin']:.2f} | "
                     f"{', '.join(f'{m} {n}' for m, n in c.get('mix', {}).items()) or '–'} |")
    general = stats["per_kind"].get("general", {})
    if general and not _judged(general):
        lines.append("\ngeneral samples, not judged (their pairs read no verdict): " + ", ".join(
            f"{k} {general.get(k, 0)}" for k in ("tagged", "refusal", "helpful", "incomplete")))
    capped = general.get("dropped_capped", 0)
    if capped:
        lines.append(f"\n{capped} general pair(s) left out: at most {stats['general_pairs_per_unsafe']:g} per unsafe pair "
                     "(dpo.general_pairs_per_unsafe)")
    return "\n".join(lines)
