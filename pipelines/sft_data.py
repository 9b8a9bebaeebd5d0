"""Stage 4, SFT data: trajectories + self-reviews -> chat-format prompt/completion examples (train split only).

Written as TRL prompt-completion JSONL (loss on the completion only): the prompt is the exact templated text
the policy saw, the completion the assistant turn as text (see `chat.prompt_completion_text`). Every dropped
example is counted by reason; nothing is truncated.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

from safetrigger.config import RunConfig
from safetrigger.method import SAFE_CLOSE, SplitSource, query_messages, safe_position
from safetrigger.method.reasoning import THINK_OPEN, THINK_SOURCES
from safetrigger.method.sft import Candidate, Target, candidate_id, check_length, general_target, select_candidate, unsafe_target

from .answer_judge import selection_id
from .chat import chat_prompt_ids, load_tokenizer, prompt_completion_text
from .rows import Review, SftExample, Trajectory, Verdict

_THINK_SOURCES = {s.value for s in THINK_SOURCES}


def build_sft_examples(
    trajectories: list[Trajectory], reviews: list[Review], cfg: RunConfig, model_path: str,
    verdicts: list[Verdict] | None = None,
) -> tuple[list[SftExample], dict[str, Any]]:
    """`verdicts`: the review-judge stage's rows when `review.select_judges` is set (see `method.sft.select_candidate`)."""
    tok = load_tokenizer(model_path)
    reviewed = {r.query_id: r for r in reviews}
    judged = {v.query_id: v for v in verdicts or []}
    examples, drops, kept, positions, opened, trimmed = [], Counter(), Counter(), Counter(), Counter(), Counter()
    selection: dict[str, Counter] = defaultdict(Counter)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for t in sorted(trajectories, key=lambda r: r.query_id):
        if t.split != "train":
            continue
        think = t.split_source in _THINK_SOURCES
        messages = query_messages(t.prompt, cfg.model.system_prompt)
        prompt_tokens = len(chat_prompt_ids(tok, messages, cfg.model.chat_template_kwargs))
        if t.label == "safe":
            target = check_length(general_target(t.reasoning, t.answer, think), prompt_tokens, count,
                                  cfg.sft_data.max_length)
        else:
            candidates = _candidates(t, reviewed, judged, cfg, think, lambda x: check_length(
                x, prompt_tokens, count, cfg.sft_data.max_length))
            target = select_candidate(candidates, keep_unsafe=cfg.review.when_none_safe == "first")
            _count_selection(selection[t.kind], candidates, target)
        if target.completion is None:
            drops[f"{t.kind}/{target.drop.value}"] += 1
            continue
        kept[t.kind] += 1
        prompt, completion = prompt_completion_text(tok, messages, target.completion, cfg.model.chat_template_kwargs)
        if target.tagged:  # the method puts the block after the reasoning: counted, so the report can show it
            positions[safe_position(completion, opened=prompt.rstrip().endswith(THINK_OPEN))] += 1
            opened[t.kind] += _opens(completion, cfg.review.answer_opener)
            trimmed[t.kind] += target.trimmed
        examples.append(SftExample(query_id=t.query_id, kind=t.kind, tagged=target.tagged, prompt=prompt,
                                   completion=completion))
    stats = {"kept": dict(kept), "dropped": dict(drops), "max_length": cfg.sft_data.max_length,
             "safe_position": dict(positions), "trimmed": {k: n for k, n in trimmed.items() if n}}
    if cfg.review.answer_opener is not None:  # tagged targets whose answer starts with it, per kind
        stats["opened"] = {k: opened[k] for k in sorted(kept) if k != "general"}
    if cfg.review.candidates > 1 or cfg.review.select_judges:
        stats["selection"] = {"candidates": cfg.review.candidates, "judges": [j.name for j in cfg.review.select_judges],
                              "per_kind": {k: dict(c) for k, c in sorted(selection.items())}}
    return examples, stats


def _opens(completion: str, opener: str | None) -> bool:
    return opener is not None and SAFE_CLOSE in completion and \
        completion.split(SAFE_CLOSE, 1)[1].lstrip().startswith(opener.strip())


def _candidates(t: Trajectory, reviewed: dict[str, Review], judged: dict[str, Verdict], cfg: RunConfig, think: bool,
                fits: Callable[[Target], Target]) -> list[Candidate]:
    """Every review candidate of one unsafe query as a target with its judges' verdicts (none missing: a
    candidate a judge did not see is not safe)."""
    out = []
    for i in range(cfg.review.candidates):
        cid = candidate_id(t.query_id, i, cfg.review.candidates)
        if cid not in reviewed:
            continue  # the prompt left no room for a review: reported as a missing answer
        target = fits(unsafe_target(t.reasoning, reviewed[cid].review, think,
                                    reasoning_complete=t.split_source != SplitSource.UNCLOSED_THINK.value))
        verdicts = [judged.get(selection_id(cid, j.name)) for j in cfg.review.select_judges]
        out.append(Candidate(target, safe=all(v is not None and v.answer_safe for v in verdicts),
                             safety=-sum(v.margin for v in verdicts if v is not None)))
    return out


def _count_selection(c: Counter, candidates: list[Candidate], chosen: Target) -> None:
    c["queries"] += 1
    c["candidates"] += len(candidates)
    c["well_formed"] += sum(x.target.completion is not None for x in candidates)
    c["judged_safe"] += sum(x.target.completion is not None and x.safe for x in candidates)
    c["accepted"] += chosen.completion is not None


def format_opener_line(stats: dict[str, Any], opener: str | None, verdict_word: str | None = None) -> str:
    """How many unsafe SFT targets answer after the block with `review.answer_opener` (the policy's own unsafe
    verdict put it there), so a reader of the report knows what the refusals it measures were trained on."""
    words = (f" Where the policy's own self-judge called the query unsafe, the block's yes/no parts start with "
             f"{verdict_word.strip()!r} (review.verdict_word) and the policy wrote the reasons.") if verdict_word else ""
    if opener is None or "opened" not in stats:
        return words.strip()
    parts = ", ".join(f"{k} {n} of {stats['kept'].get(k, 0)}" for k, n in stats["opened"].items())
    return (f"SFT targets whose answer after the block starts with the configured opener {opener!r} (where the "
            f"policy's own self-judge called the query unsafe; the rest of each answer is the policy's): {parts}."
            + words)


def format_selection_table(stats: dict[str, Any]) -> str:
    """Self-selected answers per kind: how many candidates were well formed, judged safe, and how many queries
    kept a target (acceptance)."""
    sel = stats.get("selection")
    if not sel:
        return ""
    judges = ", ".join(sel["judges"]) or "none"
    lines = [f"Self-selected answers ({sel['candidates']} candidate(s) per query; judges: {judges})", "",
             "| kind | queries | candidates | well formed | judged safe | accepted | acceptance |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, c in sel["per_kind"].items():
        q = c.get("queries", 0)
        rate = f"{c.get('accepted', 0) / q:.1%}" if q else "n/a"
        lines.append(f"| {kind} | {q} | {c.get('candidates', 0)} | {c.get('well_formed', 0)} | {c.get('judged_safe', 0)} "
                     f"| {c.get('accepted', 0)} | {rate} |")
    return "\n".join(lines)


def write_jsonl(path: Path, rows: list[Any]) -> None:
    """Typed rows (`SftExample`, `DpoPair`) as JSONL, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
