"""Fanning rows through the policy's Serve replicas and committing results as they stream.

One helper for every stage that calls the policy (self-generation, self-judging, later sampling and
evaluation). Two ways in, the same rows out, committed in chunks to a `StageStore` so a failure loses at most
the chunk in flight:
- `ray_data`: a `ray.data.llm` `ServeDeploymentProcessorConfig` processor against the running deployment (scales
  its pre- and post-processing over the cluster; builds a fresh actor pool per call);
- `handle`: the driver calls the deployment handle itself, as that processor's actors do, with at most
  batch_size x concurrency requests in flight. Measured on 2 cores (8 one-token requests): 17-25 s through a
  processor, almost all of it start-up, against 1.4 s by handle; a main job makes about 19 such calls.
`auto` takes the handle up to `AUTO_HANDLE_MAX_ROWS` rows. A replica lost mid-stage is survived here, for every
stage alike (`policy_recovery`).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Literal

import os
import sys

import ray
from ray.data import DataContext
from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from safetrigger.method import stable_hash
from services.policy import PolicyEndpoint

from .policy_recovery import PolicyUnavailableError, Recovery, replica_loss, wait_for_policy
from .progress_log import say
from .stage_store import Progress, StageStore, chunked

Row = dict[str, Any]
Fanout = Literal["auto", "handle", "ray_data"]
AUTO_HANDLE_MAX_ROWS = 1024  # above it, Ray Data's distributed pre/post-processing is worth its start-up
_DTYPES = {"CompletionRequest": CompletionRequest, "ChatCompletionRequest": ChatCompletionRequest}


class PolicyRequestError(RuntimeError):
    pass


class SampledCompletion:
    """Picklable preprocess: a completion request from a row's exact prompt ids, with its own `max_tokens` and a
    seed per row (`salt` + query id), so a re-run samples the same text. The answer comes back by `completion_row`."""

    def __init__(self, model: str, sampling: dict[str, Any], seed: int, salt: str) -> None:
        self.model, self.sampling, self.seed, self.salt = model, sampling, seed, salt

    def __call__(self, row: Row) -> dict[str, Any]:
        sampling = {**self.sampling, "max_tokens": int(row["max_tokens"]),
                    "seed": (self.seed + stable_hash(self.salt + row["query_id"])) % 2**31}
        kwargs = {"model": self.model, "prompt": [int(i) for i in row["prompt_ids"]], **sampling}
        return {"query_id": row["query_id"], "sampling_json": json.dumps(sampling, sort_keys=True),
                "method": "completions", "dtype": "CompletionRequest", "request_kwargs": kwargs}


def completion_row(row: Row) -> dict[str, Any]:
    """A `Review`-shaped row of a completion request's answer: the text it continued with, why it stopped, its tokens."""
    choice = first_choice(row)
    return {"query_id": row["query_id"], "review": choice["text"] or "",
            "finish_reason": str(choice.get("finish_reason") or ""),
            "completion_tokens": int((row.get("usage") or {}).get("completion_tokens") or 0),
            "sampling": row["sampling_json"]}


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
    fanout: Fanout = "auto",
    recovery: Recovery = Recovery(),
) -> int:
    """Send `rows` (those not yet in the store) through the policy; returns how many rows were committed.

    A replica lost mid-stage (`policy_recovery`) costs only the rows not yet committed: after Serve has a replica
    that answers again, those are sent again, at most `recovery.retries` times."""
    if not rows:
        return 0
    total = total if total is not None else len(rows)
    window = batch_size * concurrency  # rows the replicas work on at once, either way to them
    progress = Progress(stage, total, already=total - len(rows), slow_tokens_per_s=slow_tokens_per_s,
                        in_flight=window, live=sys.stdout.isatty())
    pending, losses = rows, 0
    with progress.heartbeat():
        while True:
            try:
                by_handle = fanout == "handle" or fanout == "auto" and len(pending) <= AUTO_HANDLE_MAX_ROWS
                # by handle a row is counted when its answer arrives, not when its turn in row order comes: one long
                # answer at the head otherwise hid the rows done behind it (AVX2 EPYC, generate: 68 rows and 67.8
                # tokens/s shown at 125 s while the engine ran at ~120)
                results = (_by_handle(pending, endpoint, preprocess, postprocess, in_flight=window,
                                      on_answer=lambda row, prompt: progress.observe(1, _new_tokens(row), prompt))
                           if by_handle else _by_ray_data(pending, endpoint, preprocess, postprocess, batch_size, concurrency))
                # rows committed by earlier attempts, then this one's
                return len(rows) - len(pending) + _commit_all(results, store, progress, chunk_rows, counted=by_handle)
            except Exception as e:
                lost = replica_loss(e)
                if lost is None or any(store.id_column not in r for r in pending):
                    raise
                held = store.done_ids()
                pending = [r for r in pending if r[store.id_column] not in held]
                if losses >= recovery.retries:
                    raise PolicyUnavailableError(
                        f"[{stage}] a policy replica was lost ({lost}) {losses + 1} time(s), more than "
                        f"generation.replica_retries={recovery.retries} allows; the {total - len(pending)} rows "
                        "committed are kept and a re-run resumes after them") from e
                losses += 1
                say(f"[{stage}] a policy replica was lost ({lost}); {total - len(pending)}/{total} rows are committed, "
                    f"{len(pending)} will be sent again once a replica answers (loss {losses} of at most {recovery.retries})")
                back = wait_for_policy(endpoint, recovery.timeout_s)
                progress.rewind(total - len(pending))
                say(f"[{stage}] the policy answered again after {back:.0f}s; resending {len(pending)} rows")


def _commit_all(results: Iterator[Row], store: StageStore, progress: Progress, chunk_rows: int,
                counted: bool = False) -> int:
    """Commit `results` in chunks; `counted`: the rows were already counted in `progress` as they came back."""
    committed = 0
    try:
        for chunk in chunked((dict(r) for r in results) if counted else _observed(results, progress), chunk_rows):
            store.commit(chunk)
            committed += len(chunk)
            progress.line()
        return committed
    finally:  # on a failure, now: requests still out on live replicas are cancelled before the stage waits
        close = getattr(results, "close", None)
        if close is not None:
            close()


def complete_by_handle(endpoint: PolicyEndpoint, requests: list[dict[str, Any]]) -> list[Row]:
    """A few completion requests (e.g. a judge's calibration prompts) by deployment handle, answers in order: the
    policy app has no HTTP route by default (`serving.route_prefix`)."""
    rows = [{"method": "completions", "dtype": "CompletionRequest", "request_kwargs": r} for r in requests]
    return list(_by_handle(rows, endpoint, dict, lambda row: row, in_flight=max(1, len(rows))))


def _by_ray_data(rows: list[Row], endpoint: PolicyEndpoint, preprocess, postprocess, batch_size: int,
                 concurrency: int) -> Iterator[Row]:
    config = ServeDeploymentProcessorConfig(deployment_name=endpoint.deployment_name, app_name=endpoint.app_name,
                                            dtype_mapping=_DTYPES, batch_size=batch_size, concurrency=concurrency)
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    # Our own per-chunk progress line (rows, rate, ETA) replaces Ray Data's operator dump every 10 s.
    DataContext.get_current().enable_progress_bars = os.environ.get("SAFE_TRIGGER_RAY_PROGRESS", "0") == "1"
    # One block per request batch: from_items would otherwise make one block per row, and per-block overhead
    # dominates on small stages.
    ds = processor(ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size))))
    return ds.iter_rows()


def _by_handle(rows: list[Row], endpoint: PolicyEndpoint, preprocess, postprocess, in_flight: int,
               on_answer: Callable[[Row, int], None] | None = None) -> Iterator[Row]:
    """The processor's request, sent by the driver: each row preprocessed, its `request_kwargs` made the request
    type its `dtype` names, `method` called on the deployment, and the response merged into the row for
    `postprocess`. `in_flight` requests stay out: a new one goes as soon as any answers, and rows come back in order;
    `on_answer` sees each postprocessed row and its prompt's token count as soon as it is answered, in any order
    (progress: a judge's rows carry no new tokens, their work is the prompt).

    Refilled on any answer, not when the oldest answers: with a window that waited for its head, one long answer
    held the engine's batch below `in_flight` until it ended. Measured (128 generate requests, SmolLM2-135M, fp32,
    AVX2 EPYC, 2 cores): 96.5 tok/s waiting for the head, 108.5 refilling on any answer, both 32 in flight."""
    from ray import serve

    handle = serve.get_deployment_handle(endpoint.deployment_name, endpoint.app_name).options(stream=True)
    live: dict[int, Any] = {}  # the responses still out, so an abandoned stage can cancel them
    lock, stopping = threading.Lock(), threading.Event()

    def call(i: int, row: Row) -> Row:
        if stopping.is_set():
            raise _Abandoned()
        pre = preprocess(row)
        kwargs = pre.pop("request_kwargs")
        request = _DTYPES[pre["dtype"]](**kwargs) if pre.get("dtype") else kwargs
        with lock:
            if stopping.is_set():
                raise _Abandoned()
            live[i] = response = getattr(handle, pre["method"]).remote(request)
        try:
            items = list(response)  # a request that is not streamed answers with one object
        finally:
            with lock:
                live.pop(i, None)
        if not items:
            raise PolicyRequestError(f"the policy returned nothing for {pre.get('query_id', '?')}")
        output = items[0]
        answer = output.model_dump() if hasattr(output, "model_dump") else output
        done = postprocess({**pre, **answer})
        if on_answer is not None:
            on_answer(done, int((answer.get("usage") or {}).get("prompt_tokens") or 0))
        return done

    pool = ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="policy-request")
    try:
        futures = [pool.submit(call, i, row) for i, row in enumerate(rows)]
        for future in futures:
            yield future.result()
    finally:  # abandoned (a lost replica, a failed commit): the requests still out must not run on for nothing
        stopping.set()
        with lock:
            for response in live.values():
                response.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


class _Abandoned(Exception):
    """A request not sent because its stage was abandoned first."""


def _observed(rows, progress: Progress):
    """Rows as plain dicts, each counted (with its new tokens) as it comes back, before its chunk is committed."""
    for r in rows:
        row = dict(r)
        progress.observe(1, _new_tokens(row))
        yield row


def _new_tokens(row: Row) -> int:
    return int(row.get("completion_tokens") or 0)
