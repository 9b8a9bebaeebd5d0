"""The row type of every stage store, with the Arrow schema it is written in and read back as.

Each `rows` stage declares one of these (`pipelines/stages.py`); its `StageStore` writes every part in the type's
schema and reads every part back as instances of it. A store reopened by code whose row type no longer matches
what its parts hold fails at once, naming the directory and the columns (`StageSchemaError`), instead of handing
string-keyed dicts to a stage that expects other fields. A field added later with a default (e.g. `Verdict.decided`)
reads from older parts as that default, so runs written before it still resume.

`Trajectory` and `Judgement` live in the pure method core (`safetrigger.method.records`); the rest are pipeline rows.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa

from safetrigger.method.records import Judgement, Trajectory

R = TypeVar("R")

_ARROW: dict[Any, pa.DataType] = {
    str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
    list[str]: pa.list_(pa.string()), list[float]: pa.list_(pa.float64()),
}


@dataclass
class Review:
    """One self-review (or one round of a structured review): the text after the prefilled `<safe>` opening."""

    query_id: str  # `<query_id>#<i>` for the i-th candidate when `review.candidates` > 1
    review: str
    finish_reason: str
    completion_tokens: int
    sampling: str  # JSON of the sampling parameters actually sent


@dataclass
class SampleSet:
    """The k answers the SFT model sampled for one held-apart DPO query (one request, `n=k`)."""

    query_id: str
    kind: str
    label: str
    split: str
    prompt: str
    samples: list[str]
    finish_reasons: list[str]
    completion_tokens: int
    adapter: str
    sampling: str


@dataclass
class Verdict:
    """One answer judge's verdict on one visible answer (F_safe, an ASR judge, XSTest classes, a rubric)."""

    query_id: str  # the item judged: a query id, `<query_id>#<i>` (a sample), `<candidate>@<judge>` (selection)
    judge: str
    scores: list[float]  # calibrated option log-probs; the rubric score; empty for refusal match
    choice: int  # index of the chosen option
    resolved: bool  # every option was in the top-k (log-prob judges), the rubric parsed
    xstest_class: str
    margin: float  # flagged minus the other option (log-prob judges); score minus threshold (rubric)
    answer_safe: bool
    # probability the options held together before calibration (judge health); NaN (unknown, never healthy) in
    # stores written before it was recorded
    mass: float = float("nan")
    decided: bool = True  # false when a rubric judge wrote no grades: no verdict, its health counts the row
    reply: str = ""  # what a rubric judge wrote (cut to 2,000 characters)


@dataclass
class SftExample:
    """One SFT target as TRL's prompt-completion row (loss on the completion only); `sft-data` writes these as JSONL."""

    query_id: str
    kind: str
    tagged: bool  # the target carries a `<safe>` block (unsafe queries)
    prompt: str  # the exact templated text the policy saw
    completion: str  # the assistant turn as text


@dataclass
class DpoPair:
    """One preference pair as TRL's prompt/chosen/rejected row; `dpo-pairs` writes these as JSONL."""

    query_id: str
    kind: str
    prompt: str
    chosen: str
    rejected: str
    margin: float  # best minus worst reward
    chosen_category: str  # A safe+tag, B safe, C unsafe+tag, D unsafe (general queries: helpful, tagged, refusal)
    rejected_category: str
    rewards: list[float]  # every sample's reward, in sample order (general queries: empty, their pair reads none)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def arrow_schema(cls: type) -> pa.Schema:
    """The Arrow schema of a row type, from its field annotations (an unsupported annotation fails when a store
    of that type is first written or reopened)."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = _ARROW.get(hints[f.name])
        if t is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no Arrow type for {hints[f.name]!r}")
        out.append(pa.field(f.name, t, nullable=False))
    return pa.schema(out)


def defaults(cls: type) -> dict[str, Any]:
    """The fields a part may lack (written before the field existed), with the value they read as."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def as_record(cls: type[R], row: Any) -> R:
    """A row as `cls`: an instance passes; a dict must carry every field without a default and nothing else (an
    extra key is a postprocessor that drifted from its type, caught before it reaches the disk)."""
    if isinstance(row, cls):
        return row
    if not isinstance(row, dict):
        raise TypeError(f"a {cls.__name__} row must be a {cls.__name__} or a dict, got {type(row).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(row) - names)
    if extra:
        raise TypeError(f"{cls.__name__} has no field(s) {extra} (row {row.get('query_id', '?')!r})")
    try:
        return cls(**row)
    except TypeError as e:
        raise TypeError(f"{cls.__name__} row {row.get('query_id', '?')!r}: {e}") from None


def to_table(cls: type, rows: list[Any]) -> pa.Table:
    """Rows (instances or dicts) as one table in the type's schema; a value of the wrong type fails here."""
    records = [as_record(cls, r) for r in rows]
    schema = arrow_schema(cls)
    columns = {f.name: [getattr(r, f.name) for r in records] for f in schema}
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise TypeError(f"{cls.__name__} rows do not fit its schema: {e}") from e


def from_table(cls: type[R], table: pa.Table) -> list[R]:
    """A table already conformed to the type's schema, as instances."""
    names = [f.name for f in dataclasses.fields(cls)]
    cols = {n: table.column(n).to_pylist() for n in names}
    return [cls(**{n: cols[n][i] for n in names}) for i in range(table.num_rows)]


__all__ = ["DpoPair", "Judgement", "Review", "SftExample", "SampleSet", "Trajectory", "Verdict", "arrow_schema",
           "as_record", "defaults", "from_table", "to_table"]
