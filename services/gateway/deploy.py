"""The gateway as a Ray Serve ingress deployment in front of the policy app."""

from __future__ import annotations

from typing import Any

from ray import serve

from .app import build_app
from .config import GatewayConfig

GATEWAY_PREFIX = "/gw"  # the route the gateway app takes on Serve's proxy unless told otherwise


def build_gateway_deployment(cfg: GatewayConfig, num_replicas: int = 1, name: str = "gateway"):
    """An application to `serve.run(app, name=..., route_prefix=...)`: the FastAPI app behind Serve's proxy (the
    route is the app's, given where it is run)."""
    app = build_app(cfg)

    @serve.deployment(name=name, num_replicas=num_replicas, ray_actor_options={"num_cpus": 0.1},
                      max_ongoing_requests=256)
    @serve.ingress(app)
    class Gateway:
        def __init__(self) -> None:
            if cfg.policy_via == "handle":  # else the first request pays for importing the request models
                import ray.serve.llm.openai_api_models  # noqa: F401

    return Gateway.bind()


def template_opens_think(model_path: str | None, template_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the policy's chat template opens `<think>` itself (`safetrigger.method.thinking`), read from its
    tokenizer: the gateway must then split streamed reasoning from the first token on."""
    if not model_path:
        return False
    from transformers import AutoTokenizer

    from safetrigger.method import convention_of

    return convention_of(AutoTokenizer.from_pretrained(model_path), template_kwargs) == "prefilled"


def pointed_at(cfg: GatewayConfig, policy: Any) -> GatewayConfig:
    """`cfg` in front of a running policy (a `services.policy.PolicyEndpoint`): its app and deployment (and its URL,
    where its app has an HTTP route)."""
    return cfg.model_copy(update={"policy_base_url": policy.base_url or cfg.policy_base_url, "policy_app_name": policy.app_name,
                                  "policy_deployment": policy.deployment_name, "served_name": policy.model_id,
                                  "policy_think_opened": template_opens_think(policy.model_path)})


def gateway_target(cfg: GatewayConfig, route_prefix: str = GATEWAY_PREFIX, name: str = "gateway",
                   **kw: Any) -> serve.RunTarget:
    """The gateway app as one of several to deploy at once (`services.policy.start_policy(beside=...)`)."""
    return serve.RunTarget(build_gateway_deployment(cfg, name=name, **kw), name=name, route_prefix=route_prefix)


def start_gateway(cfg: GatewayConfig, route_prefix: str = GATEWAY_PREFIX, name: str = "gateway", **kw: Any) -> str:
    """The gateway app alone, deployed and running; its route prefix."""
    app = gateway_target(cfg, route_prefix, name, **kw)
    serve.run(app.target, name=app.name, route_prefix=app.route_prefix)
    return route_prefix
