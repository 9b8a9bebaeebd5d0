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
from ..inference import RequestError, StreamShaper, resolve_model, shape_message, shape_stream, shape_text_choice
from ..state import Gateway, GatewayDep, InferenceKey
from ..upstream import UpstreamError

log = logging.getLogger("safe_trigger.gateway")
router = APIRouter(tags=["inference"])


@router.post("/v1/chat/completions", openapi_extra=schemas.body(schemas.CHAT))
async def chat_completions(request: Request, gw: GatewayDep, key: InferenceKey):
    """OpenAI chat completions; `safety: "hidden"|"visible"` overrides the key's default visibility."""
    return await forward(gw, key, await gw.read_json(request), chat=True)


@router.post("/v1/completions", openapi_extra=schemas.body(schemas.COMPLETION))
async def completions(request: Request, gw: GatewayDep, key: InferenceKey):
    return await forward(gw, key, await gw.read_json(request), chat=False)


def prompt_chars(body: dict[str, Any], chat: bool) -> int:
    """The prompt's size in characters, or a RequestError when there is no well-formed prompt."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "messages must be a non-empty list of message objects")
        return sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else len(json.dumps(m.get("content")))
                   for m in messages)
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)) or not prompt:
        raise RequestError(400, "prompt must be a non-empty string or list")
    return len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt))


def check_generation(body: dict[str, Any], chars: int, limits: LimitsConfig) -> None:
    """Bounds on what a request may ask of the policy; fills in the default `max_tokens`."""
    if chars > limits.max_prompt_chars:
        raise RequestError(400, f"prompt of {chars} characters exceeds the limit of {limits.max_prompt_chars}")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RequestError(400, f"{name} must be a positive integer, got {v!r}")
        if v > limits.max_tokens:
            raise RequestError(400, f"{name} {v} exceeds the limit of {limits.max_tokens}")
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = limits.max_tokens
    if body.get("n") not in (None, 1):
        raise RequestError(400, "n must be 1 (one choice per request)")
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("presence_penalty", -2.0, 2.0),
                         ("frequency_penalty", -2.0, 2.0)):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
            raise RequestError(400, f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError(400, "stream must be true or false")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise RequestError(400, "model must be a string")


def visibility(body: dict[str, Any], key: KeyConfig) -> bool:
    """Whether the `<safe>` block stays in the answer: the request's `safety`, else the key's default."""
    v = body.pop("safety", None)
    if v is None:
        return key.show_safety
    if v not in ("hidden", "visible"):
        raise RequestError(400, f"safety must be 'hidden' or 'visible', got {v!r}")
    return v == "visible"


async def forward(gw: Gateway, key: KeyConfig, body: dict[str, Any], chat: bool):
    started = time.thread_time()  # CPU time: on a busy machine wall time would count the engine's turns too
    check_generation(body, prompt_chars(body, chat), gw.cfg.limits)
    show = visibility(body, key)
    model = body["model"] = resolve_model(body.get("model"), gw.cfg.served_name, gw.cfg.adapter_root)
    kind = "chat" if chat else "completions"
    try:
        prepared = gw.upstream().prepare(kind, body)
    except UpstreamError as e:
        raise RequestError(e.status, e.message) from None
    gw.ring.acquire(key)
    released = False
    own = [time.thread_time() - started]  # the gateway's own work for this request, waits excluded
    try:
        if body.get("stream"):
            response = await _stream(gw, key, kind, model, prepared, StreamShaper(chat, show, gw.cfg.policy_think_opened), own)
            released = True  # the stream releases the slot when it ends
            return response
        return await _complete(gw, kind, model, prepared, chat, show, own)
    except UpstreamError as e:
        if e.status >= 500:
            log.warning("policy failed for key %s: %s", key.id, e.message)
        return error_response(e.status, e.message, "upstream_error", e.retry_after)
    finally:
        if not released:
            gw.ring.release(key)


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
    out = await gw.upstream().complete(kind, model, prepared)
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
