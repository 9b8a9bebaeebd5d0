"""`embedded:smollm2-135m-think`: the embedded model taught, once, to reason in a `<think>` block before it answers.

SmolLM2-135M-Instruct writes no reasoning tags, so with it every path a real reasoning model takes (a template
that prefills `<think>\\n`, verdicts read after the reasoning, `<safe>` after `</think>`) would run on no
generation at all. This builds the smallest model that takes those paths, from data the project makes itself:
- GSM8K's worked solutions are real reasoning: the steps go in the think block, "The answer is N." after it.
  They are the last rows in the order runs read the file (by the hash of their query id, then `limit`), so no
  run that reads fewer than all but those rows evaluates on them.
- for everyday requests (`data/think_prompts.jsonl`) the model's own answer is split where the pipeline's
  `leading` rule splits it for the plain model: its first paragraph (else sentence) becomes the think block.
- for harmful requests the project wrote itself (`data/review_prompts.jsonl`, in no benchmark) the model's own
  structured self-review, made as the pipeline makes it for the plain model, in the pipeline's layout for the
  think model (`<safe>` after a closed think block, one row per part with its cue in the prompt). Without these
  the think model, asked to review after `</think>`, wrote closing tags in place of every part (7 of 8 reviews
  dropped as `think_tag_in_review`); trained on whole reviews it recited the cues instead (83 of 94 dropped).
The model's own texts are generated once and kept in `data/think_targets.json` (`think_targets`: a build reads
them where they were made from its inputs). A LoRA adapter is trained on those targets (completion only) and
merged, and the tokenizer gets an R1-style chat template: the generation prompt ends with `<think>\\n` and earlier
assistant turns keep only what follows `</think>`. `build.json` beside the weights records the time taken (by
phase) and how often held-out prompts (requests and sums the build never saw) come back with a closed think
block and an answer after it, and how often held-out harmful requests get a self-review the SFT data stage would
keep.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from .config import REPO_ROOT
from .hardware import this_cpu, training_precision
from .method.prompts import REVIEW_PART_CUES, review_messages, structured_review_text
from .method.reasoning import ReasoningRule, SplitSource, split_reasoning
from .method.records import query_id, stable_hash
from .method.sft import unsafe_target
from .method.tags import SAFE_CLOSE, SAFE_OPEN
from .method.thinking import review_prefill
from .think_targets import TARGETS, Example, Row, Targets, committed_targets

BUILD_INFO = "build.json"
PROMPTS = REPO_ROOT / "data" / "think_prompts.jsonl"
REVIEW_PROMPTS = REPO_ROOT / "data" / "review_prompts.jsonl"
GSM8K = "gsm8k_train.jsonl"
# ChatML as SmolLM2's own template, R1's conventions: no default system prompt (a third of a short prompt's
# tokens), the think block prefilled, and stripped from earlier assistant turns.
THINK_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ThinkBuild:
    gsm8k: int = 24  # worked solutions, the last in the order runs read the train file
    self_prompts: int = 40  # requests answered by the model itself; the rest of the file is held out
    review_prompts: int = 18  # harmful requests reviewed by the model itself; the rest of the file is held out
    held_out_gsm8k: int = 12
    max_new_tokens: int = 64
    part_max_tokens: int = 32  # one line of a structured review
    review_attempts: int = 4  # per harmful request: greedy, then sampled until one review is well formed
    epochs: int = 2
    batch_size: int = 8  # examples per optimizer step
    # sequences per forward pass, accumulated to `batch_size`: in batches of 8 the padding to the longest row was
    # compute spent for nothing (training took 269 of the build's 517 s on an AVX512-BF16 EPYC)
    micro_batch_size: int = 1
    learning_rate: float = 2e-3
    lora_r: int = 32
    seed: int = 0
    # training under bfloat16 autocast, spelt as SFT/DPO's `precision`: auto where the CPU computes bf16 natively
    # (AVX512-BF16/AMX; emulated on AVX2 it crawls). The model generates its own targets and is checked in float32
    # either way: generating in bf16 too (AVX512-BF16 EPYC) took the build 457 -> 351 s but its held-out checks
    # fell (closed think and answered 94% -> 72%, reviews kept 6/6 -> 4/6)
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")


def think_row(request: str, reasoning: str, answer: str) -> Row:
    return think_prompt(request), f"{reasoning}\n</think>\n\n{answer}"


# Raised whenever the way a build turns its data into training rows changes (the spec and files are hashed apart).
# 2: reviews as one row per part, the cue in the prompt. 3: no empty part (the base model often ended the line at
# once). 4: sampled attempts until a review is well formed (greedy alone: 5 of 18). 5: a looping review is not
# well formed (method.sft). 6: the base model's texts from data/think_targets.json where made from the same inputs,
# the adapter seeded after them.
RECIPE_VERSION = 6


def train_dtype(spec: ThinkBuild = ThinkBuild()) -> str:
    """`ThinkBuild.precision` resolved for this machine's CPU (the rule SFT and DPO train by)."""
    return training_precision(spec.precision, False, this_cpu()).dtype


def recipe_id(spec: ThinkBuild = ThinkBuild()) -> str:
    """Names what a build makes: a cached model built by another recipe (or trained in another dtype) is built
    again."""
    inputs = [str(RECIPE_VERSION), json.dumps(asdict(spec), sort_keys=True), THINK_TEMPLATE, PROMPTS.read_text(),
              REVIEW_PROMPTS.read_text(), train_dtype(spec), TARGETS.read_text() if TARGETS.is_file() else ""]
    return f"{stable_hash(chr(0).join(inputs)):016x}"


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def gsm8k_examples(path: Path, skip: int, n: int) -> list[Example]:
    """`n` worked solutions counted back, after `skip`, from the end of the order in which runs read the file
    (`load_source` sorts a source's queries by the hash of their id and keeps the first `limit`), calculator
    notes removed."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda row: stable_hash(query_id("gsm8k", row["question"])), reverse=True)
    out = []
    for row in rows[skip: skip + n]:
        steps, _, final = row["answer"].rpartition("####")
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()
        out.append((row["question"], steps, f"The answer is {final.strip()}."))
    return out


def own_examples(model: Any, tok: Any, requests: list[str], max_new_tokens: int) -> list[Example]:
    """The model's own answers, split by the pipeline's `leading` rule; answers with nothing after the lead are
    left out (they would teach an empty answer)."""
    out = []
    for request, text in zip(requests, generate(model, tok, [_plain_prompt(tok, r) for r in requests], max_new_tokens)):
        split = split_reasoning(text.strip(), ReasoningRule())
        if split.reasoning and split.answer and split.source is not SplitSource.NONE:
            out.append((request, split.reasoning, split.answer))
    return out


def own_reviews(model: Any, tok: Any, requests: list[str], spec: ThinkBuild) -> list[list[Row]]:
    """The base model's first thoughts on each request, then its structured self-review of them, made as the
    pipeline makes it for a model with no think tags; reviews the SFT data stage would drop are left out. Each
    review becomes the rows of the pipeline's own layout for the think model (the `<safe>` block opened after an
    empty closed think block): one row per part, its cue in the prompt and the model's words the completion, and
    one for the answer after the block. Trained as one completion, cues and all, the think model learnt the cues
    and not the parts: asked for part 1 it wrote the cue of part 2 (83 of 94 reviews in a main job)."""
    import torch

    thoughts = [_lead(t) for t in generate(model, tok, [_plain_prompt(tok, r) for r in requests], spec.max_new_tokens)]
    turns = [review_messages(q, r) for q, r in zip(requests, thoughts)]
    prefixes = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + review_prefill("none")
                for m in turns]
    found: dict[int, tuple[list[str], str]] = {}
    for attempt in range(spec.review_attempts):  # greedy first, then sampled: the first well-formed review counts
        todo = [i for i in range(len(turns)) if i not in found]
        if not todo:
            break
        torch.manual_seed(spec.seed + attempt)
        sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.95} if attempt else {}
        for i, review in zip(todo, structured_reviews(model, tok, [prefixes[i] for i in todo], spec, **sampling)):
            if well_formed(*review):
                found[i] = review
    out = []
    for request, (parts, answer) in sorted(found.items()):
        head = think_prompt(turns[request][0]["content"]) + review_prefill("prefilled")
        rows = [(head + structured_review_text(parts[:k]), f" {part}\n") for k, part in enumerate(parts)]
        out.append(rows + [(head + structured_review_text(parts), answer)])
    return out


def own_targets(model: Any, tok: Any, spec: ThinkBuild) -> Targets:
    """The base model's own texts a build trains on (what `data/think_targets.json` keeps): its reviews of the
    first `review_prompts` harmful requests, then its answers to the first `self_prompts` everyday ones."""
    reviews = own_reviews(model, tok, read_prompts(REVIEW_PROMPTS)[:spec.review_prompts], spec)
    return Targets(own_examples(model, tok, read_prompts(PROMPTS)[:spec.self_prompts], spec.max_new_tokens), reviews)


def well_formed(parts: list[str], answer: str) -> bool:
    """A review the SFT data stage keeps, every part in the model's own words (not empty), and an answer that is
    not the cue list going on ("4. What's next? …", a third of the base model's answers)."""
    target = unsafe_target("", structured_review_text(parts) + answer, think_tags=True)
    return all(parts) and not re.match(r"\d+\.\s", answer) and target.drop is None and not target.trimmed


def structured_reviews(model: Any, tok: Any, prefixes: list[str], spec: ThinkBuild,
                       **sampling: Any) -> list[tuple[list[str], str]]:
    """The parts and the answer each prompt's model writes after the opened `<safe>`: one greedy line per cued
    part (never an empty one: its first token may not end the line, as the pipeline's `min_tokens` has it), then
    the answer after the closed block, cut where it would open or close another block (the pipeline's
    `structured` review mode)."""
    line_ends = sorted({i for text in ("\n", "\n\n", " \n") for i in tok.encode(text, add_special_tokens=False)[-1:]}
                       | {tok.eos_token_id})
    parts: list[list[str]] = [[] for _ in prefixes]
    for _ in REVIEW_PART_CUES:
        texts = generate(model, tok, [p + structured_review_text(done) for p, done in zip(prefixes, parts)],
                         spec.part_max_tokens, begin_suppress_tokens=line_ends, **sampling)
        for done, text in zip(parts, texts):
            done.append(text.split("\n", 1)[0].strip())
    answers = generate(model, tok, [p + structured_review_text(done) for p, done in zip(prefixes, parts)],
                       spec.max_new_tokens, **sampling)
    return [(done, re.split(f"{re.escape(SAFE_OPEN)}|{re.escape(SAFE_CLOSE)}", a)[0].strip())
            for done, a in zip(parts, answers)]


def _lead(text: str) -> str:
    split = split_reasoning(text.strip(), ReasoningRule())
    return split.reasoning or text.strip()


def generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, **options: Any) -> list[str]:
    import torch

    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, **{"max_new_tokens": max_new_tokens, "do_sample": False,
                                         "pad_token_id": tok.pad_token_id, "repetition_penalty": 1.1, **options})
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _plain_prompt(tok: Any, request: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True)


def think_prompt(request: str) -> str:
    """What THINK_TEMPLATE renders for one request (tests/test_think_model.py holds them equal)."""
    return f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n<think>\n"


def train_merged(model: Any, tok: Any, examples: list[Row], spec: ThinkBuild, scratch: Path, dtype: str) -> Any:
    """LoRA on the think targets (loss on the completion only), merged into the float32 weights; `dtype` bfloat16
    trains under autocast."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from trl.trainer import sft_trainer

    from safetrigger.lm_head import compact_heads_in

    rows = [{"prompt": prompt, "completion": completion} for prompt, completion in examples]
    args = SFTConfig(output_dir=str(scratch), per_device_train_batch_size=spec.micro_batch_size,
                     gradient_accumulation_steps=spec.batch_size // spec.micro_batch_size, num_train_epochs=spec.epochs,
                     learning_rate=spec.learning_rate, lr_scheduler_type="constant", logging_steps=50,
                     save_strategy="no", report_to="none", use_cpu=True, seed=spec.seed, completion_only_loss=True,
                     max_length=512, disable_tqdm=True, dataloader_num_workers=0,
                     # no recomputation: a 135M model needs no memory saving (TRL defaults it on)
                     bf16=dtype == "bfloat16", gradient_checkpointing=False)
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    with compact_heads_in(sft_trainer):  # the build trains on CPU
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora)
    trainer.train()
    return trainer.model.merge_and_unload()


def review_rate(model: Any, tok: Any, requests: list[str], spec: ThinkBuild) -> float:
    """Share of harmful requests whose self-review by the think model, in the pipeline's layout (its own first
    thoughts, `<safe>` opened after the closed think block), the SFT data stage would keep."""
    texts = generate(model, tok, [think_prompt(r) for r in requests], spec.max_new_tokens)
    rule = ReasoningRule(opened=True)
    thoughts = [split_reasoning(t, rule).reasoning or t.strip() for t in texts]
    prefixes = [think_prompt(review_messages(q, r)[0]["content"]) + review_prefill("prefilled")
                for q, r in zip(requests, thoughts)]
    reviews = structured_reviews(model, tok, prefixes, spec)
    return sum(well_formed(parts, answer) for parts, answer in reviews) / max(len(reviews), 1)


def format_rate(model: Any, tok: Any, requests: list[str], max_new_tokens: int) -> float:
    """Share of requests answered with a closed think block and a non-empty answer after it."""
    texts = generate(model, tok, [think_prompt(r) for r in requests], max_new_tokens)
    rule = ReasoningRule(opened=True)
    return sum(bool(split_reasoning(t, rule).answer) for t in texts) / max(len(texts), 1)


def build_think_model(base: Path, out: Path, data_root: Path, spec: ThinkBuild = ThinkBuild(),
                      emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Build into `out` (a fresh directory); returns what `build.json` records."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    torch.manual_seed(spec.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    gsm8k = data_root / GSM8K
    if not gsm8k.is_file():
        raise FileNotFoundError(f"the think model is built from GSM8K's worked solutions: {gsm8k} is missing "
                                "(set SAFE_TRIGGER_DATA to the folder holding gsm8k_train.jsonl)")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    requests, harmful = read_prompts(PROMPTS), read_prompts(REVIEW_PROMPTS)
    targets = committed_targets(spec)
    source = "committed" if targets is not None else "generated"
    if targets is None:
        emit(f"[think-model] {TARGETS.name} is missing or was made from other inputs: the base model answers "
             f"{spec.self_prompts} requests and reviews {spec.review_prompts} (`python -m safetrigger.think_targets` "
             "writes the file again)")
        targets = own_targets(model, tok, spec)
    thinking = gsm8k_examples(gsm8k, 0, spec.gsm8k) + targets.answers
    examples = [think_row(*e) for e in thinking] + [row for rows in targets.reviews for row in rows]
    reviews = targets.reviews
    dtype = train_dtype(spec)
    targets_s = time.monotonic() - started
    emit(f"[think-model] training on {len(thinking)} think targets and {len(reviews)} reviews ({len(examples)} rows, "
         f"the base model's texts {source}; {targets_s:.0f}s so far) in {dtype} on {this_cpu().describe()}")
    torch.manual_seed(spec.seed)  # the adapter's initial weights, whether the texts were read or generated
    with tempfile.TemporaryDirectory() as scratch:
        model = train_merged(model, tok, examples, spec, Path(scratch), dtype)
    trained_s = time.monotonic() - started
    held_out = requests[spec.self_prompts:] + [q for q, _, _ in gsm8k_examples(gsm8k, spec.gsm8k, spec.held_out_gsm8k)]
    rate = format_rate(model, tok, held_out, 2 * spec.max_new_tokens)
    reviewed = review_rate(model, tok, harmful[spec.review_prompts:], spec)
    tok.chat_template = THINK_TEMPLATE
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"recipe": recipe_id(spec), "spec": asdict(spec), "examples": len(thinking) + len(reviews),
            "think_targets": len(thinking), "reviews": len(reviews), "rows": len(examples),
            "held_out": len(held_out), "held_out_closed_think_and_answered": rate,
            "held_out_reviews": len(harmful) - spec.review_prompts, "held_out_reviews_kept": reviewed,
            "seconds": round(time.monotonic() - started, 1), "base_texts": source,
            "phase_seconds": {"base_texts": round(targets_s, 1), "training": round(trained_s - targets_s, 1),
                              "checks": round(time.monotonic() - started - trained_s, 1)},
            "threads": torch.get_num_threads(), "train_dtype": dtype, "cpu": this_cpu().describe()}
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    emit(f"[think-model] built in {info['seconds']:.0f}s: {100 * rate:.0f}% of {len(held_out)} held-out prompts "
         f"close the think block and answer; {100 * reviewed:.0f}% of {info['held_out_reviews']} held-out harmful "
         "requests get a review the SFT data stage keeps")
    return info
