"""Durable, resumable stage outputs: a directory of Parquet parts plus a manifest.

Each stage writes under `<output_dir>/<stage>-<key>/`, the key a hash of its inputs and config, so a changed
config never reuses stale rows. Parts are written to a temporary file and renamed into place, so a part is
either whole or absent; a run killed mid-stage keeps every committed part and the next run asks only for the
rows no part holds yet. `_DONE.json` marks a finished stage, which a re-run skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

DONE = "_DONE.json"


def stage_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class StageStore:
    root: Path
    id_column: str = "query_id"
    _next_part: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # a part that was being written when a run died
            stale.unlink(missing_ok=True)
        parts = self.parts()
        self._next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)

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
        path = self.root / f"part-{self._next_part:05d}.parquet"
        tmp = self.root / f".tmp-{os.getpid()}-{path.name}"
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
        self._next_part += 1
        return path

    def finish(self, **meta: Any) -> None:
        meta = {"rows": self.count(), "finished_at": time.time(), **meta}
        tmp = self.root / f".tmp-{DONE}"
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, self.root / DONE)

    def count(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts())

    def read(self) -> list[dict[str, Any]]:
        parts = self.parts()
        if not parts:
            return []
        return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default").to_pylist()


class Progress:
    """One log line per committed chunk: rows done / total, rate and ETA."""

    def __init__(self, stage: str, total: int, already: int = 0, emit=print) -> None:
        self.stage, self.total, self.done, self.emit = stage, total, already, emit
        self._start_done, self._t0 = already, time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        elapsed = time.monotonic() - self._t0
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.emit(f"[{self.stage}] {self.done}/{self.total} rows ({pct:.0f}%), {rate:.2f} rows/s, ETA {eta}")


def chunked(rows: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    buf: list[dict[str, Any]] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf
