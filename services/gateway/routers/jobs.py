"""The jobs API: submit a pipeline config as a Ray Job; its status, logs, cancellation and report. A key sees
only its own jobs (another's id is a 404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from .. import schemas
from ..state import GatewayDep, JobsKey

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=201, openapi_extra=schemas.body(schemas.JOB))
async def submit(request: Request, gw: GatewayDep, key: JobsKey):
    """Run a pipeline config (a RunConfig as JSON under `config`) as a Ray Job."""
    return await gw.jobs.submit(key.id, await gw.read_json(request))


@router.get("/v1/jobs", operation_id="list_jobs", responses={200: schemas.JOB_LIST_LINKS})
async def list_jobs(gw: GatewayDep, key: JobsKey):
    """This key's jobs, newest first."""
    return await gw.jobs.list_own(key.id)


@router.get("/v1/jobs/{job_id}", operation_id="job_status")
async def status(job_id: str, gw: GatewayDep, key: JobsKey):
    return await gw.jobs.status(job_id, key.id)


@router.get("/v1/jobs/{job_id}/logs", operation_id="job_logs")
async def logs(job_id: str, gw: GatewayDep, key: JobsKey, follow: bool = False):
    return await gw.jobs.logs(job_id, key.id, follow)


@router.get("/v1/jobs/{job_id}/progress", operation_id="job_progress")
async def progress(job_id: str, gw: GatewayDep, key: JobsKey, after: Annotated[int, Query(ge=0, le=10**9)] = 0,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 200):
    """The run's progress events (time, stage, message) after the first `after`; poll again from `next`."""
    return await gw.jobs.events(job_id, key.id, after, limit)


@router.delete("/v1/jobs/{job_id}", operation_id="cancel_job")
async def cancel(job_id: str, gw: GatewayDep, key: JobsKey):
    return await gw.jobs.cancel(job_id, key.id)


@router.get("/v1/jobs/{job_id}/report", operation_id="job_report")
async def report(job_id: str, gw: GatewayDep, key: JobsKey, format: str = "json"):
    return await gw.jobs.report(job_id, key.id, format)
