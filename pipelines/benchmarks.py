"""Loaders for the safety benchmarks the paper and its peers report on, each in its own published file format.

The paper (arXiv 2606.16808) and ThinkSafe (arXiv 2601.23143) report ASR per benchmark on HarmBench, StrongREJECT,
HEx-PHI, JailbreakBench and WildJailbreak, and over-refusal on XSTest or OR-Bench. A user points a source at the
file as its authors publish it; one table per format says where the prompt, the goal (the split key, so every
attack on one goal lands in one split) and the category are, and which rows are which kind of query:

| type | file | rows |
|---|---|---|
| `harmbench` | `harmbench_behaviors_text_*.csv` (Behavior, FunctionalCategory, SemanticCategory, ContextString, BehaviorID) | harmful; contextual behaviours carry their context as HarmBench renders it; copyright behaviours are left out (HarmBench scores them by hashing, not by a judge) |
| `strongreject` | `strongreject_dataset.csv` (category, source, forbidden_prompt) | harmful |
| `hex_phi` | `category_<n>.csv`, one prompt per line, no header | harmful; the category is the file's |
| `wildjailbreak` | `train.tsv` (vanilla, adversarial, tactics, completion, data_type) or `eval.tsv` (adversarial, label, data_type) | adversarial harmful: jailbreak (goal: its vanilla request); vanilla harmful: harmful; benign of either form: general, safe (over-refusal) |
| `jbb_behaviors` | JBB-Behaviors `harmful-behaviors.csv` / `benign-behaviors.csv` (Index, Goal, Target, Behavior, Category, Source) | harmful, or general with `label: safe` |
| `or_bench` | `or-bench-80k.csv` / `or-bench-hard-1k.csv` / `or-bench-toxic.csv` (prompt, category) | general, safe (seemingly toxic); `label: unsafe` for the toxic file |

Every row problem names the file and line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from safetrigger.config import DataConfig, SourceConfig
from safetrigger.method import Kind, Label, Query

Row = dict[str, str]


def _rows(path: Path, columns: set[str], delimiter: str = ",") -> Iterator[tuple[int, Row]]:
    from .datasets import DatasetError, _require_file

    _require_file(path)
    csv.field_size_limit(2**31 - 1)  # WildJailbreak's adversarial prompts run long
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = columns - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path}:1: missing columns {sorted(missing)} (has {reader.fieldnames})")
        for row in reader:
            yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}


def _text(path: Path, lineno: int, row: Row, column: str) -> str:
    from .datasets import DatasetError

    value = row.get(column, "")
    if not value:
        raise DatasetError(f"{path}:{lineno}: empty {column!r}")
    return value


def _q(src: SourceConfig, kind: Kind, label: Label, prompt: str, goal: str, where: str, data: DataConfig,
       category: str) -> Query:
    from .datasets import _query

    return _query(src.type, kind, label, prompt, goal, where, data, category=category)


def load_harmbench(path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    out = []
    for lineno, row in _rows(path, {"Behavior", "FunctionalCategory", "SemanticCategory"}):
        if row["FunctionalCategory"] == "copyright":
            continue
        behavior = _text(path, lineno, row, "Behavior")
        context = row.get("ContextString", "")
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        out.append(_q(src, Kind.HARMFUL, Label.UNSAFE, prompt, behavior, f"{path}:{lineno}", data, row["SemanticCategory"]))
    return out


def load_strongreject(path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    return [_q(src, Kind.HARMFUL, Label.UNSAFE, prompt, prompt, f"{path}:{lineno}", data, row.get("category", ""))
            for lineno, row in _rows(path, {"forbidden_prompt", "category"})
            for prompt in [_text(path, lineno, row, "forbidden_prompt")]]


def load_hex_phi(path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    from .datasets import DatasetError, _require_file

    _require_file(path)
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            prompt = row[0].strip() if row else ""
            if not prompt:
                raise DatasetError(f"{path}:{lineno}: empty prompt")
            out.append(_q(src, Kind.HARMFUL, Label.UNSAFE, prompt, prompt, f"{path}:{lineno}", data, path.stem))
    return out


_WILDJAILBREAK = {  # data_type -> (kind, label, the column with the prompt)
    "adversarial_harmful": (Kind.JAILBREAK, Label.UNSAFE, "adversarial"),
    "vanilla_harmful": (Kind.HARMFUL, Label.UNSAFE, "vanilla"),
    "adversarial_benign": (Kind.GENERAL, Label.SAFE, "adversarial"),
    "vanilla_benign": (Kind.GENERAL, Label.SAFE, "vanilla"),
}


def load_wildjailbreak(path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    from .datasets import DatasetError

    out = []
    for lineno, row in _rows(path, {"adversarial", "data_type"}, delimiter="\t"):
        kind_label = _WILDJAILBREAK.get(row["data_type"])
        if kind_label is None:
            raise DatasetError(f"{path}:{lineno}: data_type must be one of {sorted(_WILDJAILBREAK)}, got {row['data_type']!r}")
        kind, label, column = kind_label
        if column == "vanilla" and "vanilla" not in row:
            raise DatasetError(f"{path}:{lineno}: a {row['data_type']} row needs the 'vanilla' column")
        prompt = _text(path, lineno, row, column)
        goal = row.get("vanilla") or prompt  # the eval file has no vanilla request: each attack is its own goal
        out.append(_q(src, kind, label, prompt, goal, f"{path}:{lineno}", data, row["data_type"]))
    return out


def load_jbb_behaviors(path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    kind, label = (Kind.GENERAL, Label.SAFE) if src.label == "safe" else (Kind.HARMFUL, Label.UNSAFE)
    return [_q(src, kind, label, goal, goal, f"{path}:{lineno}", data, row.get("Category", ""))
            for lineno, row in _rows(path, {"Goal", "Category"})
            for goal in [_text(path, lineno, row, "Goal")]]


def load_or_bench(path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    kind, label = (Kind.HARMFUL, Label.UNSAFE) if src.label == "unsafe" else (Kind.GENERAL, Label.SAFE)
    return [_q(src, kind, label, prompt, prompt, f"{path}:{lineno}", data, row.get("category", ""))
            for lineno, row in _rows(path, {"prompt", "category"})
            for prompt in [_text(path, lineno, row, "prompt")]]


LOADERS = {"harmbench": load_harmbench, "strongreject": load_strongreject, "hex_phi": load_hex_phi,
           "wildjailbreak": load_wildjailbreak, "jbb_behaviors": load_jbb_behaviors, "or_bench": load_or_bench}
