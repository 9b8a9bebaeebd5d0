"""The gateway's Prometheus metrics, and the ASGI middleware that counts requests by route and status."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily


class _SlotsHeld:
    """`safe_trigger_gateway_in_flight{key}`, read from the key ring at scrape time."""

    def __init__(self, in_flight) -> None:
        self._in_flight = in_flight

    def collect(self):
        gauge = GaugeMetricFamily("safe_trigger_gateway_in_flight", "Concurrency slots held, by key", labels=["key"])
        for key_id, n in sorted(self._in_flight().items()):
            gauge.add_metric([key_id], n)
        yield gauge


class Metrics:
    def watch_slots(self, in_flight) -> None:
        """Export the slots each key holds (`KeyRing.in_flight`): a slot never released would show here."""
        self.registry.register(_SlotsHeld(in_flight))

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


class ObserveRequests:
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
