"""The gateway's FastAPI app, composed from routers (inference, models, jobs, admin, ops) that share one `Gateway`
state through dependencies (`state.py`): keys and scopes, limits, metrics, the policy upstreams, the jobs service."""

from __future__ import annotations

from fastapi import FastAPI

from .config import GatewayConfig
from .errors import install_error_handlers
from .metrics import ObserveRequests
from .routers import admin, inference, jobs, models, ops
from .state import Gateway


def build_app(cfg: GatewayConfig) -> FastAPI:
    app = FastAPI(title="Safe Trigger gateway", version="1.0",
                  description="OpenAI-compatible inference with a structured <safe> field, and pipeline jobs.")
    app.state.gateway = gw = Gateway.of(cfg)
    install_error_handlers(app)
    app.add_middleware(ObserveRequests, metrics=gw.metrics)
    for router in (inference.router, models.router, jobs.router, admin.router, ops.router):
        app.include_router(router)
    return app
