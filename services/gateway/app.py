"""The gateway's FastAPI app: OpenAI-compatible inference, the jobs API, health, readiness and metrics."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from services import registry

from . import schemas
from .auth import AuthError, KeyRing
from .config import GatewayConfig, KeyConfig
from .inference import RequestError, StreamShaper, resolve_model, shape_message, shape_stream, shape_text_choice
from .jobs import JobsService
from .upstream import HandleUpstream, HttpUpstream, Upstream, UpstreamError

log = logging.getLogger("safe_trigger.gateway")


def _error(status: int, message: str, kind: str = "invalid_request_error", retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("safe_trigger_gateway_requests", "Requests by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram("safe_trigger_gateway_request_seconds", "Request latency", ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("safe_trigger_gateway_completion_tokens", "Completion tokens served", ["model"], registry=self.registry)
        self.responses = Counter("safe_trigger_gateway_responses", "Completed responses", ["model"], registry=self.registry)
        # what the gateway itself adds: CPU time of auth, checks, routing, request building and <safe> shaping,
        # without the time spent waiting for the body or the policy (bench/gateway.py reads it)
        self.own_work = Histogram("safe_trigger_gateway_own_work_seconds", "Gateway CPU time per request, waits excluded",
                                  ["kind"], registry=self.registry,
                                  buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))
        self.triggered = Counter("safe_trigger_gateway_safe_triggered", "Responses whose <safe> block fired", ["model"], registry=self.registry)

    def answered(self, model: str, safety: dict[str, Any], tokens: int = 0) -> None:
        self.responses.labels(model).inc()
        if safety.get("triggered"):
            self.triggered.labels(model).inc()
        if tokens:
            self.tokens.labels(model).inc(tokens)


class _Observe:
    """Requests by route and status, and their latency. Pure ASGI: `@app.middleware("http")` (Starlette's
    BaseHTTPMiddleware) runs the app in a child task and relays every streamed chunk through a memory stream,
    a task switch per chunk on a busy event loop."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the route template, not the raw path
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t)


def build_app(cfg: GatewayConfig) -> FastAPI:
    app = FastAPI(title="Safe Trigger gateway", version="1.0",
                  description="OpenAI-compatible inference with a structured <safe> field, and pipeline jobs.")
    ring = KeyRing(list(cfg.keys))
    metrics = Metrics()
    jobs = JobsService(cfg)
    limits = cfg.limits
    state: dict[str, Any] = {}

    def metadata() -> HttpUpstream:
        if "http" not in state:
            state["http"] = HttpUpstream(cfg.policy_base_url, cfg.request_timeout_s)
        return state["http"]

    def upstream() -> Upstream:
        if cfg.policy_via == "http":
            return metadata()
        if "handle" not in state:
            state["handle"] = HandleUpstream(cfg.policy_app_name, cfg.deployment)
        return state["handle"]

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limits.max_body_bytes}")
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise RequestError(413, f"request body of {len(raw)} bytes exceeds the limit of {limits.max_body_bytes}")
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise RequestError(400, f"body is not valid JSON: {e.msg} at position {e.pos}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "body must be a JSON object")
        return body

    def check_generation(body: dict[str, Any], prompt_chars: int) -> None:
        if prompt_chars > limits.max_prompt_chars:
            raise RequestError(400, f"prompt of {prompt_chars} characters exceeds the limit of {limits.max_prompt_chars}")
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
        v = body.pop("safety", None)
        if v is None:
            return key.show_safety
        if v not in ("hidden", "visible"):
            raise RequestError(400, f"safety must be 'hidden' or 'visible', got {v!r}")
        return v == "visible"

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return _error(e.status, e.message, retry_after=e.retry_after)

    @app.exception_handler(AuthError)
    async def _auth_error(_: Request, e: AuthError):
        kind = "rate_limit_error" if e.status == 429 else "authentication_error" if e.status == 401 else "permission_error"
        return _error(e.status, e.message, kind, e.retry_after)

    app.add_middleware(_Observe, metrics=metrics)

    async def _forward(request: Request, chat: bool):
        key = ring.authenticate(request.headers.get("authorization"), "inference")
        body = await read_json(request)
        started = time.thread_time()  # CPU time: on a busy machine wall time would count the engine's turns too
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise RequestError(400, "messages must be a non-empty list of message objects")
            chars = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else len(json.dumps(m.get("content")))
                        for m in messages)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, (str, list)) or not prompt:
                raise RequestError(400, "prompt must be a non-empty string or list")
            chars = len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt))
        check_generation(body, chars)
        show = visibility(body, key)
        model = body["model"] = resolve_model(body.get("model"), cfg.served_name, cfg.adapter_root)
        kind = "chat" if chat else "completions"
        try:
            prepared = upstream().prepare(kind, body)
        except UpstreamError as e:
            raise RequestError(e.status, e.message) from None
        ring.acquire(key)
        released = False
        headers = {"x-safe-trigger-model": model}
        own = [time.thread_time() - started]  # the gateway's own work for this request, waits excluded
        try:
            if body.get("stream"):
                shaper = StreamShaper(chat, show)
                batches = await upstream().stream(kind, model, prepared)

                async def events():
                    try:
                        async for packet in shape_stream(batches, shaper, own):
                            yield packet
                        metrics.answered(model, shaper.safety)
                        metrics.own_work.labels(kind).observe(own[0])
                    except UpstreamError as e:  # after the headers went out: an error event, as OpenAI sends
                        yield "data: " + json.dumps({"error": {"message": e.message, "type": "upstream_error",
                                                               "code": e.status}}) + "\n\n"
                    finally:
                        await batches.aclose()
                        ring.release(key)

                released = True  # the stream releases the slot when it ends
                return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
            out = await upstream().complete(kind, model, prepared)
            t = time.thread_time()
            tokens = int((out.get("usage") or {}).get("completion_tokens") or 0)
            choices = out.get("choices") or []
            for i, choice in enumerate(choices):
                if chat:
                    choice["message"] = shape_message(choice.get("message") or {}, show)
                    safety = choice["message"]["safety"]
                else:
                    choices[i] = choice = shape_text_choice(choice, show)
                    safety = choice["safety"]
                metrics.answered(model, safety, tokens)
            metrics.own_work.labels(kind).observe(own[0] + time.thread_time() - t)
            return JSONResponse(out, headers=headers)
        except UpstreamError as e:
            if e.status >= 500:
                log.warning("policy failed for key %s: %s", key.id, e.message)
            return _error(e.status, e.message, "upstream_error", e.retry_after)
        finally:
            if not released:
                ring.release(key)

    @app.post("/v1/chat/completions", openapi_extra=schemas.body(schemas.CHAT))
    async def chat_completions(request: Request):
        """OpenAI chat completions; `safety: "hidden"|"visible"` overrides the key's default visibility."""
        return await _forward(request, chat=True)

    @app.post("/v1/completions", openapi_extra=schemas.body(schemas.COMPLETION))
    async def completions(request: Request):
        return await _forward(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        ring.authenticate(request.headers.get("authorization"), "inference")
        try:
            _, listed = await metadata().get_json("/models")
        except httpx.HTTPError:
            return _error(503, "the policy service is unreachable; retry later", "upstream_error", 5)
        chosen = registry.promoted(cfg.adapter_root)
        listed["promoted"] = chosen["model"] if chosen else cfg.served_name
        return listed

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        try:
            status, _ = await metadata().get_json("/models", timeout=5)
            ok = status == 200
        except httpx.HTTPError:
            ok = False
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    jobs.mount(app, ring)
    return app
