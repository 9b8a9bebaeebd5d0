"""Fanning rows through the policy's Serve replicas with `ray.data.llm` and committing results as they stream.

One helper for every stage that calls the policy (self-generation, self-judging, later sampling and
evaluation): it builds a `ServeDeploymentProcessorConfig` processor against the running deployment, streams
the output rows and commits them in chunks to a `StageStore`, so a failure loses at most the chunk in flight.
"""

from __future__ import annotations

from typing import Any, Callable

import os
import sys

import ray
from ray.data import DataContext
from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from services.policy import PolicyEndpoint

from .stage_store import Progress, StageStore, chunked

Row = dict[str, Any]


class PolicyRequestError(RuntimeError):
    pass


def first_choice(row: Row) -> dict[str, Any]:
    """The first choice of a response row, or a clear error when the policy answered with an error."""
    choices = row.get("choices")
    if not choices:
        detail = row.get("error") or row.get("message") or {k: v for k, v in row.items() if k not in ("request_kwargs",)}
        raise PolicyRequestError(f"the policy returned no choices for {row.get('query_id', '?')}: {detail}")
    return choices[0]


def run_through_policy(
    rows: list[Row],
    endpoint: PolicyEndpoint,
    preprocess: Callable[[Row], Row],
    postprocess: Callable[[Row], Row],
    store: StageStore,
    stage: str,
    *,
    batch_size: int,
    concurrency: int,
    chunk_rows: int,
    total: int | None = None,
    slow_tokens_per_s: float = 0.0,
) -> int:
    """Send `rows` (those not yet in the store) through the policy; returns how many rows were committed."""
    if not rows:
        return 0
    config = ServeDeploymentProcessorConfig(
        deployment_name=endpoint.deployment_name,
        app_name=endpoint.app_name,
        dtype_mapping={"CompletionRequest": CompletionRequest, "ChatCompletionRequest": ChatCompletionRequest},
        batch_size=batch_size,
        concurrency=concurrency,
    )
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    # Our own per-chunk progress line (rows, rate, ETA) replaces Ray Data's operator dump every 10 s.
    DataContext.get_current().enable_progress_bars = os.environ.get("SAFE_TRIGGER_RAY_PROGRESS", "0") == "1"
    total = total if total is not None else len(rows)
    progress = Progress(stage, total, already=total - len(rows), slow_tokens_per_s=slow_tokens_per_s,
                        live=sys.stdout.isatty())
    # One block per request batch: from_items would otherwise make one block per row, and per-block overhead
    # dominates on small stages.
    ds = processor(ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size))))
    committed = 0
    with progress.heartbeat():
        for chunk in chunked(_observed(ds.iter_rows(), progress), chunk_rows):
            store.commit(chunk)
            committed += len(chunk)
            progress.line()
    return committed


def _observed(rows, progress: Progress):
    """Rows as plain dicts, each counted (with its new tokens) as it comes back, before its chunk is committed."""
    for r in rows:
        row = dict(r)
        progress.observe(1, int(row.get("completion_tokens") or 0))
        yield row
