"""The base model's own texts the think model learns from, kept in the repository (`data/think_targets.json`).

Writing them was most of a build: on a 2-core AVX2 EPYC the base model took 325 s of the build's 532 s in
`generate` (its answers, its reviews sampled until well formed, and the held-out checks), and the suite builds
the think model on every clean checkout. The texts depend only on what `targets_id` names: the base model's file
(a pinned package), the two prompt files, the review layout and the generation settings, all generated in
float32 on any CPU. A build reads them from the file where it was made from the same inputs, and generates them
otherwise (saying so); `python -m safetrigger.think_targets` writes the file again. Every machine then trains on
the same texts, where before float32 kernels of different CPUs could part greedy decodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import REPO_ROOT
from .method.prompts import REVIEW_PART_CUES, REVIEW_TEMPLATE
from .method.records import stable_hash
from .method.thinking import review_prefill

TARGETS = REPO_ROOT / "data" / "think_targets.json"
BASE = "smollm2-135m-instruct"
# Raised whenever the way the base model's texts are generated changes (think_model: own_examples, own_reviews,
# structured_reviews, generate) where no input below shows it.
TARGETS_VERSION = 1
# ThinkBuild's fields that decide the generated texts (the rest only shape training and the checks)
GENERATION_FIELDS = ("self_prompts", "review_prompts", "max_new_tokens", "part_max_tokens", "review_attempts", "seed")

Example = tuple[str, str, str]  # (request, reasoning, answer)
Row = tuple[str, str]  # (prompt, completion)


class ThinkTargetsError(ValueError):
    """The committed targets file cannot be read as targets."""


@dataclass(frozen=True)
class Targets:
    answers: list[Example]  # the base model's answers to everyday requests, split into reasoning and answer
    reviews: list[list[Row]]  # its structured self-reviews of harmful requests, one row per part and the answer


def targets_id(spec) -> str:
    """Names every input the texts depend on; a file made from others is not used."""
    from .model_cache import gguf_path
    from .think_model import PROMPTS, REVIEW_PROMPTS

    base = gguf_path(BASE)
    layout = [REVIEW_TEMPLATE, *REVIEW_PART_CUES, review_prefill("none"), review_prefill("prefilled")]
    inputs = [str(TARGETS_VERSION), json.dumps({f: getattr(spec, f) for f in GENERATION_FIELDS}, sort_keys=True),
              PROMPTS.read_text(), REVIEW_PROMPTS.read_text(), *layout, base.name, _sha256(base)]
    return f"{stable_hash(chr(0).join(inputs)):016x}"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def committed_targets(spec, path: Path = TARGETS) -> Targets | None:
    """The texts in `path` where they were made from this build's inputs; None where the file is missing or
    made from others."""
    if not path.is_file():
        return None
    wanted = targets_id(spec)  # outside the parse: a missing base model is not a damaged file
    try:
        record = json.loads(path.read_text())
        if record["targets_id"] != wanted:
            return None
        answers = [tuple(_strings(e, 3, f"answers[{i}]")) for i, e in enumerate(record["answers"])]
        reviews = [[tuple(_strings(r, 2, f"reviews[{i}][{j}]")) for j, r in enumerate(rows)]
                   for i, rows in enumerate(record["reviews"])]
    except (ValueError, KeyError, TypeError) as e:
        raise ThinkTargetsError(f"{path}: not a think targets file ({e}); write it again with "
                                "`python -m safetrigger.think_targets`") from e
    return Targets(answers, reviews)  # type: ignore[arg-type]


def _strings(value, n: int, where: str) -> list[str]:
    if not (isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{where} is not a list of {n} strings")
    return value


def write_targets(targets: Targets, spec, made: dict, path: Path = TARGETS) -> None:
    record = {"targets_id": targets_id(spec), "made": made, "answers": targets.answers, "reviews": targets.reviews}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    """Generate the texts with the base model, as a build does, and write them to data/think_targets.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hardware import this_cpu
    from .model_cache import ensure_embedded
    from .think_model import ThinkBuild, own_targets

    spec = ThinkBuild()
    base = ensure_embedded(BASE)
    started = time.monotonic()
    torch.manual_seed(spec.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = own_targets(model, tok, spec)
    made = {"seconds": round(time.monotonic() - started, 1), "cpu": this_cpu().describe(), "dtype": "float32",
            "torch": torch.__version__}
    write_targets(targets, spec, made)
    print(f"{TARGETS}: {len(targets.answers)} answers and {len(targets.reviews)} reviews in {made['seconds']:.0f}s "
          f"on {made['cpu']}")


if __name__ == "__main__":
    main()
