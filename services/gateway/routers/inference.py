"""OpenAI-compatible generation: checks, routing to the policy, `<safe>` and reasoning shaping, streaming."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import schemas
from ..config import KeyConfig, LimitsConfig
from ..errors import error_response
from ..fields import check_fields
from ..inference import (
    RequestError, StreamShaper, public_fields, resolve_model, shape_message, shape_stream, shape_text_choice,
)
from ..state import Gateway, GatewayDep, InferenceKey
from ..upstream import UpstreamError

log = logging.getLogger("safe_trigger.gateway")
router = APIRouter(tags=["inference"])


@router.post("/v1/chat/completions", openapi_extra=schemas.body(schemas.CHAT))
async def chat_completions(request: Request, gw: GatewayDep, key: InferenceKey):
    """OpenAI chat completions; `safety: "hidden"|"visible"` within what the key may see."""
    return await admitted(request, gw, key, chat=True)


@router.post("/v1/completions", openapi_extra=schemas.body(schemas.COMPLETION))
async def completions(request: Request, gw: GatewayDep, key: InferenceKey):
    return await admitted(request, gw, key, chat=False)


async def admitted(request: Request, gw: Gateway, key: KeyConfig, chat: bool):
    """The key's rate token and concurrency slot are taken before the body is read, so slow uploads count against
    the key that sends them, never fill the replica; the slot is released on every path (a stream releases it
    when it ends)."""
    gw.ring.acquire(key)
    handed_over = False
    try:
        response = await forward(gw, key, await gw.read_json(request), chat)
        handed_over = isinstance(response, StreamingResponse)
        return response
    finally:
        if not handed_over:
            gw.ring.release(key)


def prompt_chars(body: dict[str, Any], chat: bool) -> int:
    """The prompt's size in characters (fields already checked: string contents, a string prompt)."""
    return sum(len(m["content"]) for m in body["messages"]) if chat else len(body["prompt"])


def check_generation(body: dict[str, Any], chat: bool, key: KeyConfig, limits: LimitsConfig) -> None:
    """Only allowlisted fields with values in bounds, within the gateway's limits; fills in the default
    `max_tokens`."""
    check_fields(body, chat, key.engine_fields)
    chars = prompt_chars(body, chat)
    if chars > limits.max_prompt_chars:
        raise RequestError(400, f"prompt of {chars} characters exceeds the limit of {limits.max_prompt_chars}")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and v > limits.max_tokens:
            raise RequestError(400, f"{name} {v} exceeds the limit of {limits.max_tokens}")
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = limits.max_tokens


def visibility(body: dict[str, Any], key: KeyConfig) -> bool:
    """Whether the `<safe>` analysis reaches the client: the request's `safety` within what the key allows, else
    the key's default. A key without `show_safety` never gets it, however the request asks."""
    v = body.pop("safety", None)
    if v == "visible" and not key.show_safety:
        raise RequestError(403, f"key {key.id!r} may not see the <safe> analysis (its show_safety is off); "
                                "ask without safety: visible")
    return key.show_safety if v is None else v == "visible"


async def forward(gw: Gateway, key: KeyConfig, body: dict[str, Any], chat: bool):
    started = time.thread_time()  # CPU time: on a busy machine wall time would count the engine's turns too
    check_generation(body, chat, key, gw.cfg.limits)
    show = visibility(body, key)
    model = body["model"] = resolve_model(body.get("model"), gw.cfg.served_name, gw.cfg.adapter_root)
    kind = "chat" if chat else "completions"
    try:
        prepared = gw.upstream().prepare(kind, body)
    except UpstreamError as e:
        raise RequestError(e.status, e.message) from None
    own = [time.thread_time() - started]  # the gateway's own work for this request, waits excluded
    try:
        if body.get("stream"):
            return await _stream(gw, key, kind, model, prepared, StreamShaper(chat, show, gw.cfg.policy_think_opened), own)
        return await _complete(gw, kind, model, prepared, chat, show, own)
    except UpstreamError as e:
        if e.status >= 500:
            log.warning("policy failed for key %s: %s", key.id, e.message)
        if e.status == 503:
            gw.ring.refund(key)
        return error_response(e.status, e.message, "upstream_error", e.retry_after)


async def _stream(gw: Gateway, key: KeyConfig, kind: str, model: str, prepared, shaper: StreamShaper, own: list[float]):
    batches = await gw.upstream().stream(kind, model, prepared)

    async def events():
        try:
            async for packet in shape_stream(batches, shaper, own):
                yield packet
            gw.metrics.answered(model, shaper.safety)
            gw.metrics.own_work.labels(kind).observe(own[0])
        except UpstreamError as e:  # after the headers went out: an error event, as OpenAI sends
            yield "data: " + json.dumps({"error": {"message": e.message, "type": "upstream_error", "code": e.status}}) + "\n\n"
        finally:
            await batches.aclose()
            gw.ring.release(key)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-safe-trigger-model": model})


async def _complete(gw: Gateway, kind: str, model: str, prepared, chat: bool, show: bool, own: list[float]):
    out = public_fields(await gw.upstream().complete(kind, model, prepared))
    t = time.thread_time()
    tokens = int((out.get("usage") or {}).get("completion_tokens") or 0)
    choices = out.get("choices") or []
    for i, choice in enumerate(choices):
        if chat:
            choice["message"] = shape_message(choice.get("message") or {}, show, gw.cfg.policy_think_opened)
            safety = choice["message"]["safety"]
        else:
            choices[i] = choice = shape_text_choice(choice, show)
            safety = choice["safety"]
        gw.metrics.answered(model, safety, tokens)
    gw.metrics.own_work.labels(kind).observe(own[0] + time.thread_time() - t)
    return JSONResponse(out, headers={"x-safe-trigger-model": model})
