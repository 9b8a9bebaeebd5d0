"""Where the gateway's generation requests go: one small interface, two ways to reach the policy.

- `HandleUpstream` (the default inside Ray Serve): the policy's `LLMServer` deployment through a deployment
  handle, exactly as `ray.serve.llm`'s own OpenAI ingress calls it. A request crosses Serve's proxy once, as a
  direct request does. Going back out over HTTP crossed the proxy twice more and split the server's 50 ms stream
  batches into one proxy message per token: measured +385 ms p50 per 32-token stream (bench/gateway.py).
- `HttpUpstream`: any OpenAI-compatible server by URL, for a gateway in front of a policy it cannot reach by
  handle (another Ray cluster, a plain vLLM server).

Both hand streams over in batches of SSE payloads as they arrive, so the gateway writes one packet per batch.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Literal

import httpx

from services.replicas import running_replicas

Kind = Literal["chat", "completions"]


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class Upstream(ABC):
    def prepare(self, kind: Kind, body: dict[str, Any]) -> Any:
        """The request as this upstream sends it; a malformed body fails here (UpstreamError 400), before the
        request takes a concurrency slot."""
        return body

    @abstractmethod
    async def complete(self, kind: Kind, model: str, request: Any) -> dict[str, Any]:
        """The whole (non-streamed) OpenAI response."""

    @abstractmethod
    async def stream(self, kind: Kind, model: str, request: Any) -> AsyncIterator[list[str]]:
        """Batches of SSE `data:` payloads (JSON text, `[DONE]` left out). Fails with UpstreamError before the
        first batch is handed over, so an upstream error still becomes an HTTP status."""

    @abstractmethod
    async def models(self, timeout_s: float) -> dict[str, Any]:
        """The policy's OpenAI model list (base and registry adapters); UpstreamError(503) when it does not answer."""

    async def aclose(self) -> None:
        return None


async def _peeked(batches: AsyncIterator[list[str]]) -> AsyncIterator[list[str]]:
    first = await anext(batches, None)  # raises here, before any response header has gone out

    async def rest():
        try:
            if first is not None:
                yield first
            async for batch in batches:
                yield batch
        finally:  # a client that hung up stops the generation upstream too
            await batches.aclose()

    return rest()


def _payloads(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data and data != "[DONE]":
                out.append(data)
    return out


class HandleUpstream(Upstream):
    """The policy by deployment handle. While Serve has no running replica of it (a replica restarting after its
    engine died: 70-100 s measured for the embedded model), requests are refused at once with 503 and
    Retry-After: Serve's router would hold each one, and the client's concurrency slot, until a replica is back."""

    STATUS_TTL_S = 1.0  # how long one read of serve.status() stands for all requests
    RESTART_RETRY_AFTER_S = 10

    def __init__(self, app_name: str, deployment: str) -> None:
        self._app, self._deployment = app_name, deployment
        self._handles: dict[str, Any] = {}
        self._app_handle = None  # the policy app's ingress (model lists, readiness), looked up once
        self._status_at, self._running, self._state = float("-inf"), None, ""
        self._reading: asyncio.Future | None = None  # the status read in flight, or the last one

    async def _check_running(self) -> None:
        now = time.monotonic()
        if now - self._status_at >= self.STATUS_TTL_S:
            self._status_at = now  # before the await: concurrent requests share this read
            self._reading = asyncio.ensure_future(self._read_status())
        # Every request waits for a read still out, not only the one that started it: the others read the state
        # before it, and a fresh gateway's first concurrent requests all got 503 "no running replica ()" while
        # the first read was out (bench/gateway.py's two warm-up clients); shielded, so a request cancelled
        # meanwhile leaves the shared read running
        if not self._reading.done():
            await asyncio.shield(self._reading)
        if self._running is None or self._running == 0:
            raise UpstreamError(503, f"the policy has no running replica ({self._state}); retry later",
                                self.RESTART_RETRY_AFTER_S)

    async def _read_status(self) -> None:
        from ray import serve

        try:
            status = await asyncio.to_thread(serve.status)
            self._running, self._state = running_replicas(status, self._app, self._deployment)
        except Exception as e:  # noqa: BLE001 - an unreadable status must not block requests
            self._running, self._state = -1, type(e).__name__

    def _handle(self, model: str):
        # Adapters route as Serve multiplexed models (replica affinity for loaded LoRA weights), as the OpenAI
        # ingress does; the base model is load-balanced over all replicas.
        if model not in self._handles:
            from ray import serve

            handle = serve.get_deployment_handle(self._deployment, self._app)
            opts: dict[str, Any] = {"stream": True}
            if ":" in model:
                opts["multiplexed_model_id"] = model
            self._handles[model] = handle.options(**opts)
        return self._handles[model]

    def prepare(self, kind: Kind, body: dict[str, Any]):
        from pydantic import ValidationError
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        try:
            request = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise UpstreamError(400, f"{where}: {first.get('msg')}" + (f" ({e.error_count()} errors)" if e.error_count() > 1 else "")) from None
        # Ray's own ingress also runs a private sanitiser here for pydantic#9467 (iterable message fields kept as
        # unpicklable ValidatorIterators); on the pinned pydantic/vLLM every variant validates to lists and pickles,
        # which tests/test_gateway_logic.py pins, so no private call is needed.
        return request

    async def _items(self, kind: Kind, model: str, request: Any) -> AsyncIterator[Any]:
        from services.adapters import AdapterError

        await self._check_running()
        response = getattr(self._handle(model), kind).remote(request, None)
        done = False
        try:
            async for item in self._assigned(response):
                first = item[0] if isinstance(item, list) and item else item
                error = getattr(first, "error", None)
                if error is not None and not isinstance(first, str):
                    code = int(getattr(error, "code", 500) or 500)
                    if code >= 500:  # the engine failed, not the request: the client may retry, never a 500
                        raise UpstreamError(503, f"the policy failed: {error.message}; retry later", 5)
                    raise UpstreamError(code, f"policy: {error.message}")
                yield item
            done = True
        except UpstreamError:
            raise
        except AdapterError:  # the replica could not find the adapter version asked for
            raise UpstreamError(404, f"adapter {model!r} not found") from None
        except Exception as e:
            raise UpstreamError(503, f"the policy failed: {type(e).__name__}; retry later", 5) from e
        finally:
            if not done:
                response.cancel()

    async def _assigned(self, response) -> AsyncIterator[Any]:
        """The response's items; while the first is awaited, the policy's replicas are looked at once a second and
        the request is given up (503) when none runs. Serve's router re-queues a request whose replica died before
        it started and holds it until a new replica is up (57 s measured), past any client's patience."""
        items = response.__aiter__()
        first = asyncio.ensure_future(items.__anext__())
        try:
            while not (await asyncio.wait({first}, timeout=self.STATUS_TTL_S))[0]:
                await self._check_running()
        except BaseException:
            first.cancel()
            raise
        try:
            yield first.result()
        except StopAsyncIteration:
            return
        async for item in items:
            yield item

    async def complete(self, kind: Kind, model: str, request: Any) -> dict[str, Any]:
        items = [item async for item in self._items(kind, model, request)]  # one response object when not streamed
        if not items:
            raise UpstreamError(503, "the policy returned nothing; retry later", 5)
        return items[0].model_dump() if hasattr(items[0], "model_dump") else items[0]

    async def stream(self, kind: Kind, model: str, request: Any) -> AsyncIterator[list[str]]:
        async def batches():
            items = self._items(kind, model, request)
            try:
                async for item in items:
                    # LLMServer batches stream chunks (50 ms by default): a list of "data: …\n\n" strings
                    yield _payloads("".join(item) if isinstance(item, list) else str(item))
            finally:
                await items.aclose()  # now, not at garbage collection: cancels the request if it is unfinished

        return await _peeked(batches())

    async def models(self, timeout_s: float) -> dict[str, Any]:
        # the policy app's ingress by application handle: it has no HTTP route (`serving.route_prefix`)
        from ray import serve

        await self._check_running()
        try:
            async with asyncio.timeout(timeout_s):
                if self._app_handle is None:
                    self._app_handle = serve.get_app_handle(self._app)
                listed = await self._app_handle.models.remote()
        except Exception as e:  # not deployed yet, replicas restarting, or too slow: not ready
            raise UpstreamError(503, f"the policy service is unreachable ({type(e).__name__}); retry later", 5) from None
        return listed.model_dump() if hasattr(listed, "model_dump") else listed


class HttpUpstream(Upstream):
    def __init__(self, base_url: str, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        # one pooled client per replica: a fresh connection per request costs more than the gateway itself
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, transport=transport,
                                         limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    @staticmethod
    def _path(kind: Kind) -> str:
        return "/chat/completions" if kind == "chat" else "/completions"

    async def complete(self, kind: Kind, model: str, request: Any) -> dict[str, Any]:
        try:
            r = await self._client.post(self._path(kind), json=request)
        except httpx.HTTPError as e:
            raise UpstreamError(503, f"the policy service is unreachable ({type(e).__name__}); retry later", 5) from None
        if r.status_code != 200:
            raise UpstreamError(r.status_code, f"policy: {r.text[:2000]}")
        return r.json()

    async def stream(self, kind: Kind, model: str, request: Any) -> AsyncIterator[list[str]]:
        try:
            response = await self._client.send(self._client.build_request("POST", self._path(kind), json=request), stream=True)
        except httpx.HTTPError as e:
            raise UpstreamError(503, f"the policy service is unreachable ({type(e).__name__}); retry later", 5) from None
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:2000]
            await response.aclose()
            raise UpstreamError(response.status_code, f"policy: {detail}")

        async def batches():
            pending = ""
            try:
                async for text in response.aiter_text():
                    pending += text
                    complete, sep, pending = pending.rpartition("\n\n")  # only whole events
                    if sep:
                        yield _payloads(complete)
                if pending.strip():
                    yield _payloads(pending)
            except httpx.HTTPError as e:  # the policy went away mid-stream: the gateway ends it with an error event
                raise UpstreamError(503, f"the policy stream broke off ({type(e).__name__})", 5) from None
            finally:
                await response.aclose()

        return await _peeked(batches())

    async def models(self, timeout_s: float) -> dict[str, Any]:
        try:
            r = await self._client.get("/models", timeout=timeout_s)
            listed = r.json()
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            raise UpstreamError(503, f"the policy service is unreachable ({type(e).__name__}); retry later", 5) from None
        if r.status_code != 200 or not isinstance(listed, dict):
            raise UpstreamError(503, f"the policy's model list answered {r.status_code}; retry later", 5)
        return listed

    async def aclose(self) -> None:
        await self._client.aclose()
