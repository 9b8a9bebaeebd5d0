"""Query-set loaders for the formats in `shared/datasets`, our own JSONL/Parquet schema and hub datasets.

Every malformed row is reported with its file and line; a loader never skips a bad row silently. Limits take a
deterministic, hash-ordered sample (not the first rows of the file, which are often one category), and the
train/eval split is a hash of the split key, so re-running never moves a query between splits.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetrigger.config import DataConfig, SourceConfig
from safetrigger.method import Kind, Label, Query, assign_split, query_id, stable_hash

from .benchmarks import LOADERS as BENCHMARK_LOADERS
from .splits import SplitAudit, count_moved, drop_near_duplicates, hold_out, source_rules

TEMPLATE_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
_GSM8K_FINAL = re.compile(r"####\s*([-\d,\.]+)\s*$")


class DatasetError(ValueError):
    """Bad input data. The message names the file, and the line where there is one."""


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if not path.is_file():
        raise DatasetError(f"{path}: not a file")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    _require_file(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _field(path: Path, lineno: int, row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{path}:{lineno}: field {name!r} missing or not a non-empty string")
    return value


def _query(
    source: str, kind: Kind, label: Label, prompt: str, split_key: str, origin: str, data: DataConfig, **extra: str
) -> Query:
    return Query(
        id=query_id(source, prompt),
        kind=kind.value,
        label=label.value,
        prompt=prompt,
        source=source,
        split_key=split_key,
        split=assign_split(split_key, data.eval_fraction, data.split_salt,
                           data.dpo_fraction if kind.value in data.dpo_kinds else 0.0).value,
        origin=origin,
        **extra,
    )


def load_advbench(path: Path, data: DataConfig) -> list[Query]:
    out = []
    for lineno, row in _read_jsonl(path):
        goal = _field(path, lineno, row, "goal")
        cats = row.get("harm_categories") or []
        category = cats[0] if isinstance(cats, list) and cats else ""
        out.append(_query("advbench", Kind.HARMFUL, Label.UNSAFE, goal, goal, f"{path}:{lineno}", data, category=category))
    return out


def read_templates(path: Path, max_chars: int) -> list[tuple[str, str, str]]:
    """(name, template, origin) for every template of at most max_chars; every slot gets the same goal."""
    out = []
    for lineno, row in _read_jsonl(path):
        name = _field(path, lineno, row, "name")
        template = _field(path, lineno, row, "template")
        if not TEMPLATE_SLOT.search(template):
            raise DatasetError(f"{path}:{lineno}: template {name!r} has no '{{{{ prompt }}}}' slot")
        if len(template) <= max_chars:
            out.append((name, template, f"{path}:{lineno}"))
    return out


def load_jailbreak_templates(path: Path, goals_path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    templates = read_templates(path, src.max_template_chars)
    if not templates:
        raise DatasetError(f"{path}: no template of at most {src.max_template_chars} characters")
    out = []
    for goal_query in load_advbench(goals_path, data):
        goal = goal_query.prompt
        ranked = sorted(templates, key=lambda t: stable_hash(goal + "\x00" + t[0]))
        for name, template, origin in ranked[: src.templates_per_goal]:
            prompt = TEMPLATE_SLOT.sub(lambda _: goal, template)
            out.append(
                _query(
                    "jailbreak_templates", Kind.JAILBREAK, Label.UNSAFE, prompt, goal,
                    f"{origin} x {goal_query.origin}", data, category=name,
                )
            )
    return out


def load_jbb(path: Path, data: DataConfig) -> list[Query]:
    _require_file(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    rows = doc.get("jailbreaks") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JailbreakBench artifact with a 'jailbreaks' list")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: jailbreaks[{i}]"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object")
        prompt = row.get("prompt")
        if prompt is None:  # the attack found no jailbreak for this behaviour: nothing to send
            continue
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string or null")
        goal = row.get("goal") if isinstance(row.get("goal"), str) else prompt
        out.append(
            _query("jbb", Kind.JAILBREAK, Label.UNSAFE, prompt, goal, where, data, category=str(row.get("category") or ""))
        )
    return out


def load_xstest(path: Path, src: SourceConfig, data: DataConfig) -> list[Query]:
    _require_file(path)
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"prompt", "label", "type"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path}:1: missing CSV columns {sorted(missing)}")
        for row in reader:
            lineno = reader.line_num
            prompt, label = (row.get("prompt") or "").strip(), (row.get("label") or "").strip()
            if not prompt:
                raise DatasetError(f"{path}:{lineno}: empty prompt")
            if label not in ("safe", "unsafe"):
                raise DatasetError(f"{path}:{lineno}: label must be 'safe' or 'unsafe', got {label!r}")
            if src.xstest_label and label != src.xstest_label:
                continue
            # Safe-looking prompts stand in the general pool (the tag must not fire on them); contrast prompts
            # are plainly harmful requests.
            kind = Kind.HARMFUL if label == "unsafe" else Kind.GENERAL
            out.append(
                _query("xstest", kind, Label(label), prompt, prompt, f"{path}:{lineno}", data, category=row.get("type", ""))
            )
    return out


def load_gsm8k(path: Path, data: DataConfig) -> list[Query]:
    out = []
    for lineno, row in _read_jsonl(path):
        question = _field(path, lineno, row, "question")
        answer = _field(path, lineno, row, "answer")
        m = _GSM8K_FINAL.search(answer.strip())
        if not m:
            raise DatasetError(f"{path}:{lineno}: answer has no final '#### N' line")
        out.append(
            _query("gsm8k", Kind.GENERAL, Label.SAFE, question, question, f"{path}:{lineno}", data,
                   reference=m.group(1).replace(",", ""))
        )
    return out


def _own_schema_row(path: Path, where: str, row: dict[str, Any], data: DataConfig) -> Query:
    """Our own schema: {prompt, kind, label?, category?, reference?}; label defaults from kind."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: field 'prompt' missing or not a non-empty string")
    try:
        kind = Kind(row.get("kind"))
    except ValueError:
        raise DatasetError(f"{where}: field 'kind' must be one of {[k.value for k in Kind]}, got {row.get('kind')!r}") from None
    default_label = Label.SAFE if kind is Kind.GENERAL else Label.UNSAFE
    try:
        label = Label(row.get("label") or default_label.value)
    except ValueError:
        raise DatasetError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {row.get('label')!r}") from None
    source = str(row.get("source") or path.stem)
    return _query(source, kind, label, prompt, str(row.get("split_key") or prompt), where, data,
                  category=str(row.get("category") or ""), reference=str(row.get("reference") or ""))


def load_queries(path: Path, data: DataConfig) -> list[Query]:
    if path.suffix == ".parquet":
        _require_file(path)
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [_own_schema_row(path, f"{path}: row {i}", row, data) for i, row in enumerate(rows)]
    return [_own_schema_row(path, f"{path}:{lineno}", row, data) for lineno, row in _read_jsonl(path)]


def load_hf(src: SourceConfig, data: DataConfig) -> list[Query]:
    import datasets  # hub access is the library's job; offline machines get its own clear error

    ds = datasets.load_dataset(src.path, split=src.hf_split)
    if src.hf_prompt_column not in ds.column_names:
        raise DatasetError(f"hub dataset {src.path}: no column {src.hf_prompt_column!r} (has {ds.column_names})")
    kind = Kind(src.hf_kind)
    label = Label.SAFE if kind is Kind.GENERAL else Label.UNSAFE
    return [
        _query(src.path, kind, label, str(row[src.hf_prompt_column]), str(row[src.hf_prompt_column]),
               f"{src.path}[{src.hf_split}][{i}]", data)
        for i, row in enumerate(ds)
    ]


def load_source(src: SourceConfig, data: DataConfig, audit: SplitAudit | None = None) -> list[Query]:
    """One source's queries after the per-source leakage rules, a hash-ordered sample of `limit`."""
    path = data.resolve(src.path)
    try:
        queries = _read_source(src, path, data)
    except UnicodeDecodeError:  # every file loader reads UTF-8: name the file and the first line that is not
        files = [path] + ([data.resolve(src.goals)] if src.goals else [])
        raise DatasetError(next((f"{f}:{n}: not valid UTF-8" for f in files if (n := _first_undecodable_line(f))),
                                f"{path}: not valid UTF-8")) from None
    if not queries:
        raise DatasetError(f"{src.type} source {path}: no queries")
    queries = source_rules(queries, data, audit if audit is not None else SplitAudit())
    queries.sort(key=lambda q: stable_hash(q.id))
    sample = queries[: src.limit] if src.limit else queries
    if audit is not None:
        count_moved(sample, data, audit)
    return hold_out(sample, audit if audit is not None else SplitAudit()) if src.held_out else sample


def _first_undecodable_line(path: Path) -> int | None:
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return lineno
    return None


def _read_source(src: SourceConfig, path: Path, data: DataConfig) -> list[Query]:
    if src.type == "advbench":
        queries = load_advbench(path, data)
    elif src.type == "jailbreak_templates":
        queries = load_jailbreak_templates(path, data.resolve(src.goals or ""), src, data)
    elif src.type == "jbb":
        queries = load_jbb(path, data)
    elif src.type == "xstest":
        queries = load_xstest(path, src, data)
    elif src.type == "gsm8k":
        queries = load_gsm8k(path, data)
    elif src.type == "queries":
        queries = load_queries(path, data)
    elif src.type in BENCHMARK_LOADERS:
        queries = BENCHMARK_LOADERS[src.type](path, src, data)
    else:
        queries = load_hf(src, data)
    return queries


def load_all(data: DataConfig) -> list[Query]:
    """Every configured source; a prompt listed twice by one source is asked once."""
    return load_all_audited(data)[0]


def load_all_audited(data: DataConfig) -> tuple[list[Query], SplitAudit]:
    """`load_all` and what its leakage rules removed or moved (pipelines/splits.py)."""
    audit = SplitAudit()
    seen: dict[str, Query] = {}
    for src in data.sources:
        for q in load_source(src, data, audit):
            seen.setdefault(q.id, q)
    if not seen:
        raise DatasetError("the configured data sources hold no queries")
    return drop_near_duplicates(list(seen.values()), data.near_duplicate_threshold, audit), audit
