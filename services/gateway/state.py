"""What every route of one gateway shares (config, keys, metrics, upstreams, jobs), kept on `app.state`, and the
FastAPI dependencies that hand it and the caller's key to a route."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from .auth import KeyRing
from .config import GatewayConfig, KeyConfig
from .inference import RequestError
from .jobs import JobsService
from .metrics import Metrics
from .upstream import HandleUpstream, HttpUpstream, Upstream


@dataclass
class Gateway:
    cfg: GatewayConfig
    ring: KeyRing
    metrics: Metrics
    jobs: JobsService
    _upstream: Upstream | None = None

    @classmethod
    def of(cls, cfg: GatewayConfig) -> "Gateway":
        ring, metrics = KeyRing(list(cfg.keys)), Metrics()
        metrics.watch_slots(ring.in_flight)
        return cls(cfg, ring, metrics, JobsService(cfg))

    def upstream(self) -> Upstream:
        """Where requests go: the policy's deployments by handle, or an OpenAI server over HTTP (`policy_via`)."""
        if self._upstream is None:
            self._upstream = (HttpUpstream(self.cfg.policy_base_url, self.cfg.request_timeout_s)
                              if self.cfg.policy_via == "http" else HandleUpstream(self.cfg.policy_app_name, self.cfg.deployment))
        return self._upstream

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object within the body limit, or a RequestError naming what is wrong."""
        raw = await self.read_body(request)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise RequestError(400, f"body is not valid JSON: {e.msg} at position {e.pos}") from None
        except UnicodeDecodeError as e:
            raise RequestError(400, f"body is not valid UTF-8 (byte {e.start})") from None
        except RecursionError:
            raise RequestError(400, "body is nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(400, "body must be a JSON object")
        return body


    async def read_body(self, request: Request) -> bytes:
        """The raw body, streamed: refused as soon as it passes the byte limit (a chunked body declares no size)
        and when it has not all arrived by the deadline, so a slow or endless upload holds nothing for long."""
        limit, deadline = self.cfg.limits.max_body_bytes, self.cfg.limits.body_timeout_s
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(deadline):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(408, f"request body not received within {deadline:g}s") from None
        return b"".join(chunks)


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _key_with(scope: str):
    # async: a plain `def` dependency would run in a worker thread, a thread hop on every request
    async def authenticated(request: Request) -> KeyConfig:
        return gateway(request).ring.authenticate(request.headers.get("authorization"), scope)

    return authenticated


GatewayDep = Annotated[Gateway, Depends(gateway)]
InferenceKey = Annotated[KeyConfig, Depends(_key_with("inference"))]
JobsKey = Annotated[KeyConfig, Depends(_key_with("jobs"))]
AdminKey = Annotated[KeyConfig, Depends(_key_with("admin"))]
