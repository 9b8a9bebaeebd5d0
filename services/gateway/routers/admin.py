"""Operator actions (keys with the `admin` scope): promote a job's adapter into the served registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from safetrigger.artifacts import REPORT_METRICS
from services import adapters
from services.promotion import PromotionRefused, promote_from_job

from .. import schemas
from ..errors import error_response
from ..inference import RequestError
from ..jobs import JOB_ID
from ..state import AdminKey, Gateway, GatewayDep

router = APIRouter(tags=["admin"])


@router.post("/v1/admin/promote", openapi_extra=schemas.body(schemas.PROMOTE))
async def promote(request: Request, gw: GatewayDep, key: AdminKey):
    """Serve a job's adapter as `model: policy`, if the operator's gate (`promotion`) passes it on the job's
    report; 409 with the decision's reasons otherwise."""
    job, adapter, version = _promotion_request(await gw.read_json(request))
    if not gw.cfg.adapter_root:
        raise RequestError(409, "this gateway serves no adapter registry")
    try:
        return await run_in_threadpool(_promote, gw, job, adapter, version, key.id)
    except PromotionRefused as e:
        return error_response(e.status, e.message, "promotion_refused",
                              **({"decision": e.decision} if e.decision is not None else {}))


def _promote(gw: Gateway, job: str, adapter: str, version: int | None, by: str) -> dict[str, Any]:
    from safetrigger.model_cache import resolve_model

    cfg = gw.cfg
    report = gw.jobs.report_dir(job)
    base = resolve_model(cfg.policy_model_source) if cfg.policy_model_source else None  # the shapes to check against
    return promote_from_job(cfg.adapter_root, job, adapter, version, report / REPORT_METRICS if report else None,
                            cfg.promotion, cfg.served_name, base, by)


def _promotion_request(body: dict[str, Any]) -> tuple[str, str, int | None]:
    extra = sorted(set(body) - {"job", "adapter", "version"})
    if extra:
        raise RequestError(400, f"unknown field(s) {extra}: give job, adapter and optionally version")
    job, adapter, version = body.get("job"), body.get("adapter"), body.get("version")
    if not isinstance(job, str) or not JOB_ID.fullmatch(job):
        raise RequestError(400, "job must be a job id: 'st-' and 12 hex digits")
    if not isinstance(adapter, str) or not adapters.valid_name(adapter):
        raise RequestError(400, "adapter must be an adapter name: ASCII letters, digits, '._-', at most 64")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 999_999_999):
        raise RequestError(400, "version must be an integer from 1 to 999999999")
    return job, adapter, version
