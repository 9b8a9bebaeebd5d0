"""Liveness, readiness (the policy answers) and Prometheus metrics; no key needed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..upstream import UpstreamError
from ..state import GatewayDep

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gw: GatewayDep):
    try:
        await gw.upstream().models(timeout_s=5)
        ok = True
    except UpstreamError:
        ok = False
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/metrics")
async def prometheus(gw: GatewayDep):
    return PlainTextResponse(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
