"""`/v1/models`: what the policy serves (base and registry adapters with versions) and which one is promoted."""

from __future__ import annotations

import httpx
from fastapi import APIRouter

from services import registry

from ..errors import error_response
from ..state import GatewayDep, InferenceKey

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def models(gw: GatewayDep, key: InferenceKey):
    try:
        _, listed = await gw.metadata().get_json("/models")
    except httpx.HTTPError:
        return error_response(503, "the policy service is unreachable; retry later", "upstream_error", 5)
    chosen = registry.promoted(gw.cfg.adapter_root)
    listed["promoted"] = chosen["model"] if chosen else gw.cfg.served_name
    return listed
