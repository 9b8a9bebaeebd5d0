"""`/v1/models`: what the policy serves (base and registry adapters with versions) and which one is promoted."""

from __future__ import annotations

from fastapi import APIRouter

from services import registry

from ..errors import error_response
from ..upstream import UpstreamError
from ..state import GatewayDep, InferenceKey

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def models(gw: GatewayDep, key: InferenceKey):
    try:
        listed = await gw.upstream().models(timeout_s=30)
    except UpstreamError as e:
        return error_response(e.status, e.message, "upstream_error", e.retry_after)
    chosen = registry.promoted(gw.cfg.adapter_root)
    listed["promoted"] = chosen["model"] if chosen else gw.cfg.served_name
    return listed
