"""The gateway as a Ray Serve ingress deployment in front of the policy app."""

from __future__ import annotations

from typing import Any

from ray import serve

from .app import build_app
from .config import GatewayConfig


def build_gateway_deployment(cfg: GatewayConfig, num_replicas: int = 1, route_prefix: str = "/gw", name: str = "gateway"):
    """An application to `serve.run(app, name=..., route_prefix=...)`: the FastAPI app behind Serve's proxy."""
    app = build_app(cfg)

    @serve.deployment(name=name, num_replicas=num_replicas, ray_actor_options={"num_cpus": 0.1},
                      max_ongoing_requests=256)
    @serve.ingress(app)
    class Gateway:
        pass

    return Gateway.bind()


def start_gateway(cfg: GatewayConfig, route_prefix: str = "/gw", name: str = "gateway", **kw: Any) -> str:
    serve.run(build_gateway_deployment(cfg, **kw), name=name, route_prefix=route_prefix)
    return route_prefix
