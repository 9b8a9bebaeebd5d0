"""Durable, resumable stage outputs: a directory of Parquet parts plus a manifest.

Each stage writes under `<output_dir>/<stage>-<key>/`, the key a hash of its inputs and config, so a changed
config never reuses stale rows. Parts are written to a temporary file and renamed into place, so a part is
either whole or absent; a run killed mid-stage keeps every committed part and the next run asks only for the
rows no part holds yet. `_DONE.json` marks a finished stage, which a re-run skips.

A store with a row type (`row`, see `pipelines/rows.py`) writes every part in that type's Arrow schema and reads
parts back as instances of it; reopening one whose parts do not fit the type fails at once (`StageSchemaError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from . import rows as typed
from .progress_log import record, say

DONE = "_DONE.json"


class StageSchemaError(RuntimeError):
    """A store whose parts disagree on their columns: written by another version of the code."""


class StageWriteError(OSError):
    """A part the disk would not take (full, read-only, over a size limit): what was committed before stays."""


def _family(t: pa.DataType) -> str | None:
    """What a column holds, coarsely: Parquet keeps int in one chunk and float in the next, or `null` for an
    all-None chunk, and reading promotes those; only a change of kind means another writer."""
    for kind, test in (("number", lambda x: pa.types.is_integer(x) or pa.types.is_floating(x)),
                       ("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)),
                       ("list", lambda x: pa.types.is_list(x) or pa.types.is_large_list(x)),
                       ("struct", pa.types.is_struct), ("bool", pa.types.is_boolean)):
        if test(t):
            return kind
    return None if pa.types.is_null(t) else str(t)


def _columns(schema: pa.Schema) -> dict[str, str | None]:
    return {f.name: _family(f.type) for f in schema}


def check_same_schema(root: Path, found: pa.Schema, new: pa.Schema, what: str) -> None:
    """Same column names, and the same kind of value in each wherever neither side is all-null."""
    a, b = _columns(found), _columns(new)
    clash = sorted(n for n in a.keys() & b.keys() if a[n] != b[n] and a[n] is not None and b[n] is not None)
    if a.keys() != b.keys() or clash:
        detail = "; ".join(x for x in (
            f"missing {sorted(a.keys() - b.keys())}" if a.keys() - b.keys() else "",
            f"new {sorted(b.keys() - a.keys())}" if b.keys() - a.keys() else "",
            ", ".join(f"{n}: {a[n]} vs {b[n]}" for n in clash)) if x)
        raise StageSchemaError(f"{root}: {what} do not match the rows already stored there ({detail}); it was written "
                               "by another version of this code: delete that directory or use another output_dir")


def conform(root: Path, table: pa.Table, row: type, what: str) -> pa.Table:
    """`table` in `row`'s schema: fields a part lacks that have a default read as it; a missing field without one,
    an unknown column or another kind of value means the part was written by another version of the code."""
    schema, found = typed.arrow_schema(row), _columns(table.schema)
    want, fill = _columns(schema), typed.defaults(row)
    missing = sorted(n for n in want.keys() - found.keys() if n not in fill)
    extra = sorted(found.keys() - want.keys())
    clash = sorted(n for n in want.keys() & found.keys() if found[n] is not None and found[n] != want[n])
    if missing or extra or clash:
        detail = "; ".join(x for x in (f"missing {missing}" if missing else "", f"unknown {extra}" if extra else "",
                                       ", ".join(f"{n}: {found[n]}, {row.__name__} wants {want[n]}" for n in clash)) if x)
        raise StageSchemaError(f"{root}: {what} do not fit the {row.__name__} rows this code reads ({detail}); it was "
                               "written by another version of this code: delete that directory or use another output_dir")
    n = table.num_rows
    cols = [table.column(f.name).cast(f.type) if f.name in found else pa.array([fill[f.name]] * n, type=f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def stage_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class StageStore:
    root: Path
    id_column: str = "query_id"
    row: type | None = None  # the rows' type (pipelines/rows.py); None: plain dicts (inspection, tools)
    _next_part: int = field(default=0, init=False)
    _schema: pa.Schema | None = field(default=None, init=False)  # what every part's columns must match

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # a part that was being written when a run died
            stale.unlink(missing_ok=True)
        parts = self.parts()
        self._next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)
        if self.row is not None:
            self._check_parts()

    def of(self, row: type) -> "StageStore":
        """This store's rows as `row` (a stage function given an untyped store, e.g. by a test, types it)."""
        if self.row is None:
            self.row = row
            self._check_parts()
        elif self.row is not row:
            raise TypeError(f"{self.root} holds {self.row.__name__} rows, not {row.__name__}")
        return self

    def _check_parts(self) -> None:
        """A reopened store's parts must fit the row type: checked on their schemas, before anything is sent."""
        for p in self.parts():
            schema = pq.read_schema(p)
            conform(self.root, schema.empty_table(), self.row, f"the columns of {p.name}")

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet"))

    @property
    def done(self) -> bool:
        return (self.root / DONE).is_file()

    def done_ids(self) -> set[str]:
        ids: set[str] = set()
        for p in self.parts():
            ids.update(pq.read_table(p, columns=[self.id_column]).column(self.id_column).to_pylist())
        return ids

    def commit(self, rows: list[dict[str, Any]]) -> Path | None:
        if not rows:
            return None
        table = typed.to_table(self.row, rows) if self.row is not None else pa.Table.from_pylist(rows)
        if self.row is None and self._schema is None and self._next_part > 0:  # a resumed stage: read what a killed run left, once
            self._schema = pq.read_schema(self.parts()[0])
        if self.row is None and self._schema is not None:
            check_same_schema(self.root, self._schema, table.schema, "the new rows' columns")
        path = self.root / f"part-{self._next_part:05d}.parquet"
        tmp = self.root / f".tmp-{os.getpid()}-{path.name}"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StageWriteError(
                e.errno, f"{self.root}: could not write {len(rows)} rows as {path.name} ({e}); the "
                         f"{self._next_part} part(s) committed before are intact, and a re-run resumes after them "
                         "once the disk takes writes again") from e
        self._next_part += 1
        if self._schema is None:
            self._schema = table.schema
        return path

    def finish(self, **meta: Any) -> None:
        meta = {"rows": self.count(), "finished_at": time.time(),
                **({"row_type": self.row.__name__} if self.row is not None else {}), **meta}
        tmp = self.root / f".tmp-{DONE}"
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, self.root / DONE)

    def count(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts())

    def read(self) -> list[Any]:
        """Every committed row: instances of the row type, or dicts for an untyped store."""
        parts = self.parts()
        if not parts:
            return []
        tables = [pq.read_table(p) for p in parts]
        if self.row is not None:
            return [r for p, t in zip(parts, tables)
                    for r in typed.from_table(self.row, conform(self.root, t, self.row, f"the columns of {p.name}"))]
        for p, t in zip(parts[1:], tables[1:]):
            check_same_schema(self.root, tables[0].schema, t.schema, f"the columns of {p.name}")
        return pa.concat_tables(tables, promote_options="permissive").to_pylist()


class Progress:
    """Progress of a stage that fans rows through the policy: rows and new tokens done, tokens/s, ETA; and the
    prompt tokens read where they are counted (by handle), the only work of a judge's one-token verdicts, whose
    lines read "0 new tokens, 0.0 tokens/s" from start to end without them.

    A line per committed chunk, and a heartbeat line at least every `interval_s` while rows are slow to come back
    (a chunk took 5 minutes on an AVX2 CPU in bf16, and nothing said the engine was crawling). When the tokens/s
    measured after `warmup_s` is below `slow_tokens_per_s`, one warning says so, once `in_flight` rows (those the
    engine works on at once) came back: until the first of them do, the tokens counted are only those of rows that
    finished early (DPO sampling, 4 answers of 256 tokens per row, 16 rows in flight: 14.8 tokens/s counted at 60 s
    while the engine decoded ~95, AVX2 EPYC, float32).
    """

    def __init__(self, stage: str, total: int, already: int = 0, emit=say, *, interval_s: float = 30.0,
                 slow_tokens_per_s: float = 0.0, warmup_s: float = 60.0, in_flight: int = 1, clock=time.monotonic,
                 live: bool = False) -> None:
        self.stage, self.total, self.done, self.emit = stage, total, already, emit
        # On a terminal a live bar moves with every row; the lines still come, written above it.
        self._bar = _live_bar(stage, total, already) if live else None
        if self._bar is not None:
            self.emit = self._write_above_bar
        self.interval_s, self.slow_tokens_per_s, self.warmup_s, self.clock = interval_s, slow_tokens_per_s, warmup_s, clock
        self.in_flight = max(1, min(in_flight, total - already))
        self.tokens = self.prompt_tokens = 0
        self._start_done, self._t0 = already, clock()
        self._last_line = self._t0
        self._warned = False
        self._lock = threading.Lock()

    def _write_above_bar(self, text: str) -> None:
        self._bar.write(text)
        record(text)  # what `say` would have done besides printing: the run's progress.jsonl

    def observe(self, rows: int = 1, tokens: int = 0, prompt_tokens: int = 0) -> None:
        """Rows (and their new and prompt tokens) that came back, committed or not yet."""
        with self._lock:
            self.done += rows
            self.tokens += tokens
            self.prompt_tokens += prompt_tokens
            if self._bar is not None:
                elapsed = max(1e-9, self.clock() - self._t0)
                read = f", {self.prompt_tokens} prompt tokens" if self.prompt_tokens else ""
                self._bar.set_postfix_str(f"{self.tokens} tokens, {self.tokens / elapsed:.1f} tok/s{read}", refresh=False)
                self._bar.update(rows)

    def rewind(self, done: int) -> None:
        """Back to `done` rows: those that came back but were never committed (a lost replica) will come again."""
        with self._lock:
            if self._bar is not None:
                self._bar.update(done - self.done)
            self.done = done

    def advance(self, n: int, tokens: int = 0, prompt_tokens: int = 0) -> None:
        self.observe(n, tokens, prompt_tokens)
        self.line()

    def line(self) -> str:
        with self._lock:
            now = self.clock()
            elapsed = now - self._t0
            rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
            tps = self.tokens / elapsed if elapsed > 0 else 0.0
            left = self.total - self.done
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            pct = 100.0 * self.done / self.total if self.total else 100.0
            read = (f", {self.prompt_tokens} prompt tokens ({self.prompt_tokens / elapsed:.0f}/s)"
                    if self.prompt_tokens and elapsed > 0 else "")
            text = (f"[{self.stage}] {self.done}/{self.total} rows ({pct:.0f}%), {self.tokens} new tokens, "
                    f"{tps:.1f} tokens/s{read}, {rate:.2f} rows/s, ETA {eta}, {elapsed:.0f}s")
            self._last_line = now
            slow = (self.slow_tokens_per_s > 0 and not self._warned and elapsed >= self.warmup_s
                    and self.done - self._start_done >= self.in_flight and tps < self.slow_tokens_per_s)
            self._warned |= slow
        self.emit(text)
        if slow:
            self.emit(f"[{self.stage}] WARNING: {tps:.1f} tokens/s is below the {self.slow_tokens_per_s:g} this machine "
                      "should reach (a bf16 engine on a CPU without AVX512-BF16/AMX, or the cores busy elsewhere?)")
        return text

    def tick(self) -> None:
        """Write a line if none was written for `interval_s` (called by the heartbeat)."""
        if self.clock() - self._last_line >= self.interval_s:
            self.line()

    @contextmanager
    def heartbeat(self):
        """A daemon thread calling `tick` while the block runs; the iteration it wraps may block for minutes."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(min(5.0, self.interval_s)):
                self.tick()

        thread = threading.Thread(target=beat, name=f"progress-{self.stage}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=10)
            if self._bar is not None:
                self._bar.close()


def _live_bar(stage: str, total: int, already: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=already, desc=stage, unit="rows", dynamic_ncols=True, leave=False)


def chunked(rows: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    buf: list[dict[str, Any]] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf
