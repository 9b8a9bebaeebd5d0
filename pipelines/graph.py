"""A declared graph of stages and the small runner that owns what every stage shares.

A `Stage` says what it reads (`inputs`: other stages, by name), what its key hashes (`key`: its config slice and
its inputs' keys), what it writes (`output`) and how (`run`). The runner computes every key in declaration
order, opens the stage's store, skips a stage finished earlier, times it, prints its progress line and keeps the
results by name; the summary's stage paths and times come from the same declarations. Adding a stage is one
declaration (in `pipelines/stages.py`) and one function.

Outputs:
- `rows`: a resumable `StageStore` directory `<name>-<key>/` (Parquet parts; a killed stage resumes);
- `jsonl`: a file `<name>-<key>.jsonl`, rebuilt on every run from its inputs (cheap, deterministic);
- `adapter`: a LoRA adapter directory `<name>-<key>/` with its result beside it in `<name>-<key>.json`,
  trained once, then published to the registry.

A stage whose `run` returns `Skip` (or whose inputs were skipped) produces no result; the stages that read it
are skipped too, each with the reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from safetrigger.config import RunConfig

from .stage_store import DONE, StageStore, stage_key

Output = Literal["rows", "jsonl", "adapter"]


@dataclass(frozen=True)
class Skip:
    """What a stage returns when it has nothing to do; `reason` is printed."""

    reason: str


class Keys(Mapping[str, str]):
    """The keys a stage's key recipe may read: its declared inputs' keys, nothing else (a recipe that reads an
    undeclared stage's key fails at once instead of silently depending on it)."""

    def __init__(self, stage: str, allowed: tuple[str, ...], keys: dict[str, str]) -> None:
        self._stage, self._allowed, self._keys = stage, allowed, keys

    def __getitem__(self, name: str) -> str:
        if name not in self._allowed:
            raise KeyError(f"stage {self._stage!r} reads the key of {name!r}, which is not among its inputs {self._allowed}")
        return self._keys[name]

    def __iter__(self):
        return iter(self._allowed)

    def __len__(self) -> int:
        return len(self._allowed)


@dataclass(frozen=True)
class Stage:
    name: str  # also its output's name under the run directory: `<name>-<key>`
    inputs: tuple[str, ...]
    key: Callable[[RunConfig, Keys], tuple]  # the parts hashed into its key (kept bit-for-bit across refactors)
    run: Callable[..., Any]  # rows: run(job, results, store) -> rows of `row`; jsonl/adapter: run(job, results, path)
    output: Output = "rows"
    doc: str = ""
    publish: str | None = None  # adapter stages: the registry name it is served as (`model: policy:<publish>`)
    row: type | None = None  # rows stages: the type of its rows (`pipelines/rows.py`), as written and read back

    def __post_init__(self) -> None:
        if (self.output == "rows") != (self.row is not None):
            raise TypeError(f"stage {self.name!r}: a rows stage declares its row type, and only a rows stage does")

    def path(self, out: Path, key: str) -> Path:
        return out / (f"{self.name}-{key}.jsonl" if self.output == "jsonl" else f"{self.name}-{key}")


@dataclass
class Job:
    """What stages share: the config, the queries, the policy (started on first use), timings and output."""

    cfg: RunConfig
    out: Path
    queries: list
    model_path: str
    policy: Callable[[], Any]
    emit: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)
    stage_times: list[dict[str, Any]] = field(default_factory=list)  # every store's own time, also earlier ones
    tracker: Any = None  # pipelines.tracking.Tracker: a nested run per stage, adapters registered


def compute_keys(stages: list[Stage], cfg: RunConfig, given: dict[str, str]) -> dict[str, str]:
    """Every stage's key, in declaration order (an input must be declared before the stage that reads it)."""
    keys = dict(given)
    for s in stages:
        missing = [i for i in s.inputs if i not in keys]
        if missing:
            raise ValueError(f"stage {s.name!r} reads {missing}, declared after it or not at all")
        keys[s.name] = stage_key(*s.key(cfg, Keys(s.name, s.inputs, keys)))
    return keys


class UnknownStageError(ValueError):
    pass


def upstream_of(stages: list[Stage], target: str) -> list[Stage]:
    """`target` and every stage it reads, transitively, in declaration order (`safe-trigger run --until`)."""
    by_name = {s.name: s for s in stages}
    if target not in by_name:
        raise UnknownStageError(f"no stage {target!r} in this run's graph; its stages: {', '.join(by_name)}")
    needed, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name in by_name and name not in needed:
            needed.add(name)
            todo += by_name[name].inputs
    return [s for s in stages if s.name in needed]


def run_stages(stages: list[Stage], job: Job, keys: dict[str, str], results: dict[str, Any]) -> dict[str, Any]:
    """Run (or reuse) every stage in order; `results` maps a stage name to its result, or to a `Skip`.

    One at a time, in declaration order. Ready stages side by side (ST-S's eval beside DPO sampling, each in a
    thread, sharing the engine) gained nothing, measured: the embedded main job from ST-S's eval to its end took
    452 and 440 s that way against 454 s one at a time (same stores, 2-core AVX512-BF16 EPYC). One stage's 256
    requests already keep the CPU engine computing, and its last batch drains in seconds. Whoever tries it on
    GPUs: a local Ray started from a stage's thread dies with that thread (Ray forks GCS and raylet with a
    parent-death signal, which Linux ties to the forking thread, not the process)."""
    for s in stages:
        skipped = next((results[i] for i in s.inputs if isinstance(results.get(i), Skip)), None)
        if skipped is not None:
            results[s.name] = skipped
            continue
        results[s.name] = _RUNNERS[s.output](s, job, keys[s.name], results)
        if isinstance(results[s.name], Skip):
            job.emit(f"[{s.name}] skipped: {results[s.name].reason}")
    return results


def _policy_start_s(job: Job) -> float:
    return job.timings.get("serve_start_s", 0.0) + job.timings.get("guards_start_s", 0.0)


def _own_seconds(job: Job, started: float, policy_before: float) -> float:
    """A stage's time without the policy's start it set off (the first stage to call `job.policy()` starts it),
    which `serve_start_s` reports apart: counted in both, a table of stage times held it twice (the main job's
    generate stage read 203 s of which 39 s were the start)."""
    return time.monotonic() - started - (_policy_start_s(job) - policy_before)


def _run_rows(s: Stage, job: Job, key: str, results: dict[str, Any]) -> list[Any] | Skip:
    store = StageStore(s.path(job.out, key), row=s.row)
    if store.done:
        job.emit(f"[{s.name}] finished earlier: {store.root}")
        rows = store.read()
    else:
        t, policy_before = time.monotonic(), _policy_start_s(job)
        rows = s.run(job, results, store)
        if isinstance(rows, Skip):
            return rows
        elapsed = job.timings[f"{s.name}_s"] = _own_seconds(job, t, policy_before)
        tokens = sum(getattr(r, "completion_tokens", 0) for r in rows)
        store.finish(stage=s.name, key=key, completion_tokens=tokens, elapsed_s=elapsed)
        job.emit(f"[{s.name}] {len(rows)} rows, {tokens} new tokens in {elapsed:.0f}s")
        if job.tracker is not None:
            job.tracker.stage(s.name, key, {"seconds": elapsed, "rows": len(rows), "completion_tokens": tokens})
    meta = json.loads((store.root / DONE).read_text())
    if meta.get("elapsed_s"):
        job.stage_times.append({"stage": s.name, "rows": meta["rows"], "seconds": meta["elapsed_s"],
                                "completion_tokens": meta.get("completion_tokens", 0)})
    return rows


def _run_file(s: Stage, job: Job, key: str, results: dict[str, Any]) -> Any:
    return s.run(job, results, s.path(job.out, key))


def _run_adapter(s: Stage, job: Job, key: str, results: dict[str, Any]) -> dict[str, Any] | Skip:
    """Train unless the adapter exists already; the result (metrics, version) is kept beside it."""
    adapter_dir = s.path(job.out, key)
    meta = adapter_dir.parent / f"{adapter_dir.name}.json"
    if meta.is_file():
        job.emit(f"[{s.name}] finished earlier: {adapter_dir}")
        result = json.loads(meta.read_text())
    else:
        t, policy_before = time.monotonic(), _policy_start_s(job)
        result = s.run(job, results, adapter_dir)
        if isinstance(result, Skip):
            return result
        elapsed = job.timings[f"{s.name}_s"] = _own_seconds(job, t, policy_before)
        m = result.get("metrics", {})
        job.emit(f"[{s.publish or s.name}] loss {m.get('train_loss', m.get('loss'))}, "
                 f"{m.get('train_tokens_per_second', 0):.0f} tokens/s, {elapsed:.0f}s")
        if job.tracker is not None:
            # the trainer's end-of-run numbers apart from its per-step series of the same names (loss, ...)
            job.tracker.stage(s.name, key, {"seconds": elapsed, **{f"final/{k}": v for k, v in m.items()
                                                                    if isinstance(v, (int, float))}}, adapter_dir)
    if s.publish:
        result["version"] = _publish(job, s.publish, adapter_dir)
        if job.tracker is not None and not meta.is_file():
            job.tracker.register(s.publish, result["version"], s.name, key, adapter_dir)
    meta.write_text(json.dumps(result, indent=2, default=str))
    return {**result, "dir": str(adapter_dir)}


def _publish(job: Job, name: str, adapter_dir: Path) -> int:
    """Make this adapter the registry's current `name`, so running replicas serve it hot: the version that holds
    its files already (made current again after another run's), else a new one."""
    from services import adapters

    s = job.cfg.serving
    version = adapters.ensure_published(adapters.run_registry(s), name, adapter_dir, job.model_path)
    job.emit(f"[{name}] serving {name} v{version}" + (f" from job registry {s.adapter_scope}" if s.adapter_scope else ""))
    return version


_RUNNERS = {"rows": _run_rows, "jsonl": _run_file, "adapter": _run_adapter}


def stage_paths(stages: list[Stage], out: Path, keys: dict[str, str]) -> dict[str, str]:
    """The summary's `stages` map: every declared stage's output path (run or not), by its name with `_`."""
    return {s.name.replace("-", "_"): str(s.path(out, keys[s.name])) for s in stages}


def mermaid(stages: list[Stage], roots: tuple[str, ...] = ()) -> str:
    """The graph as a Mermaid flowchart (ARCHITECTURE.md is generated from it, so the drawing cannot drift)."""
    lines = ["flowchart TD"]
    shape = {"rows": ("[", "]"), "jsonl": ("[/", "/]"), "adapter": ("[[", "]]")}
    ident = {n: n.replace("-", "_") for n in [*roots, *(s.name for s in stages)]}
    for r in roots:
        lines.append(f"    {ident[r]}(({r}))")
    for s in stages:
        a, b = shape[s.output]
        what = f"{s.output}: {s.row.__name__}" if s.row is not None else s.output
        lines.append(f"    {ident[s.name]}{a}\"{s.name}<br/><small>{what}</small>\"{b}")
    for s in stages:
        lines += [f"    {ident[i]} --> {ident[s.name]}" for i in s.inputs]
    return "\n".join(lines)
