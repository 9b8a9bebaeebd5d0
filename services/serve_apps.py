"""Application builders for Ray Serve config files (a RayService's serveConfigV2, `serve run`):

    import_path: services.serve_apps:policy_app     args: {config: configs/r1-distill-llama-8b.yaml}
    import_path: services.serve_apps:gateway_app    args: {config: …, gateway: configs/gateway.yaml}
    import_path: services.serve_apps:guard_app      args: {config: …, guard: llama-guard}

The same builders the Python API uses, so a RayService serves exactly what `safe-trigger serve` serves.
"""

from __future__ import annotations

from typing import Any

from safetrigger.config import load_config, with_adapter_root


def _run_config(args: dict[str, Any]):
    return with_adapter_root(load_config(args["config"]))


def policy_app(args: dict[str, Any]):
    """The policy app of a shared deployment: it must have no HTTP route (give the app `route_prefix: null`)."""
    from .policy import build_policy_app
    from .policy_rules import refuse_public_route

    cfg = _run_config(args)
    refuse_public_route(cfg)
    return build_policy_app(cfg)


def guard_app(args: dict[str, Any]):
    """A guard judge of the run config (`guards`, by `guard: <name>`) as its own app, e.g. Llama-Guard-3-8B; no
    HTTP route (give the app `route_prefix: null`): the pipeline's judges reach it by handle."""
    from .policy import build_guard_app

    return build_guard_app(_run_config(args), args["guard"])


def gateway_app(args: dict[str, Any]):
    from .gateway.config import load_gateway_config
    from safetrigger.model_cache import resolve_model

    from .gateway.deploy import build_gateway_deployment, template_opens_think

    cfg = _run_config(args)
    gw = load_gateway_config(args["gateway"])
    s = cfg.serving
    update = {"adapter_root": gw.adapter_root or s.adapter_root, "served_name": cfg.model.served_name,
              "policy_model_source": cfg.model.source,
              "policy_think_opened": template_opens_think(resolve_model(cfg.model.source), cfg.model.chat_template_kwargs)}
    if "policy_app_name" not in gw.model_fields_set:
        update["policy_app_name"] = s.app_name
    return build_gateway_deployment(gw.model_copy(update=update), num_replicas=int(args.get("num_replicas", 1)))
