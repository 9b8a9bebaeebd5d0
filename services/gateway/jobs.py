"""The jobs API: a pipeline config in, a Ray Job out (`JobSubmissionClient`), status, logs, cancel and report.

A config is validated before anything runs, and confined: it writes only under `<artifact_root>/<job id>/`, reads
data only under the allowed roots, attaches to the running policy app instead of starting its own, and publishes
its adapters into its own registry (`<adapter_root>/jobs/<job id>/`), never the served one: promotion is an
operator's action (`routers/admin.py`). Keys see only their own jobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from safetrigger.artifacts import (
    PROGRESS, REPORT_DIR, REPORT_HTML, REPORT_MARKDOWN, REPORT_METRICS, last_progress, progress_events,
)
from safetrigger.config import REPO_ROOT, RunConfig, default_data_root

from .config import GatewayConfig, JobPolicy
from .inference import RequestError

JOB_ID = re.compile(r"^st-[0-9a-f]{12}$")
ENTRYPOINT_MODULE = "apps.cli"  # what a Ray Job runs: `python -m <this> run <config>`


def _inside(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


def confine(raw: Any, cfg: GatewayConfig, job_id: str, key_id: str = "") -> RunConfig:
    """The job's RunConfig, or RequestError(422) naming what is not allowed."""
    if not isinstance(raw, dict):
        raise RequestError(422, "config must be a JSON object (a RunConfig)")
    try:
        _refuse_nul(raw, "config")
    except RecursionError:
        raise RequestError(422, "config is nested too deeply") from None
    try:
        run = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise RequestError(422, f"invalid config: {e}") from None
    out = Path(run.output_dir)
    if out.is_absolute() or ".." in out.parts:
        raise RequestError(422, f"output_dir {run.output_dir!r}: must be relative, without '..'; jobs write under their own artifact directory")
    roots = [Path(os.path.realpath(r)) for r in (cfg.allowed_data_roots or [default_data_root()])]
    data_root = Path(run.data.root)
    if not _inside(data_root, roots):
        raise RequestError(422, f"data.root {run.data.root!r} is outside the allowed data roots")
    repo = [Path(os.path.realpath(REPO_ROOT / cfg.jobs.repo_data))]
    for i, src in enumerate(run.data.sources):
        if src.type == "hf" and src.path not in cfg.jobs.hf_datasets:
            raise RequestError(422, f"data.sources[{i}].path {src.path[:200]!r}: a hub dataset must be one the operator "
                                    f"allows (gateway jobs.hf_datasets: {cfg.jobs.hf_datasets})")
        for field, value in (("path", src.path), ("goals", src.goals)):
            if not value or src.type == "hf" and field == "path":
                continue
            if ".." in Path(value.removeprefix("repo:")).parts:
                raise RequestError(422, f"data.sources[{i}].{field} {value!r}: '..' is not allowed")
            resolved = run.data.resolve(value)
            if not _inside(resolved, repo if value.startswith("repo:") else roots):
                where = f"the checkout's {cfg.jobs.repo_data}/ folder" if value.startswith("repo:") else "the allowed data roots"
                raise RequestError(422, f"data.sources[{i}].{field} {value!r} is outside {where}")
    source = run.model.source
    if source.startswith(("/", ".", "~")) and not _inside(Path(os.path.expanduser(source)), roots):
        raise RequestError(422, f"model.source {source!r}: a local model must lie under the allowed roots")
    served = cfg.policy_model_source
    if served and source != served:
        if "source" in run.model.model_fields_set:  # said explicitly: refuse rather than train another model's adapter
            raise RequestError(422, f"model.source {source!r} is not the served policy's ({served!r}): a job "
                                    "generates with, trains and serves adapters for the policy it is attached to")
        source = served
    within_policy(run, cfg.jobs)
    if run.serving.adapter_scope is not None:  # another job's id would publish into that job's registry
        raise RequestError(422, "serving.adapter_scope: every job publishes into its own registry (set by the gateway)")
    if run.tracking.uri is not None:  # a tenant's URI would be a write anywhere (sqlite path) or a send anywhere
        raise RequestError(422, "tracking.uri: jobs log to the operator's tracking store (gateway jobs.tracking_uri)")
    shared = f"sqlite:///{Path(cfg.artifact_root).resolve() / 'mlflow.db'}"  # every job's run in one store
    tracking = run.tracking.model_copy(update={"uri": cfg.jobs.tracking_uri or shared, "key": key_id, "job": job_id})
    job_dir = Path(cfg.artifact_root).resolve() / job_id
    return run.model_copy(update={
        "tracking": tracking,
        "model": run.model.model_copy(update={"served_name": cfg.served_name, "source": source}),
        "output_dir": str(job_dir / out),
        "ray": run.ray.model_copy(update={"address": "auto"}),
        "serving": run.serving.model_copy(update={"attach": True, "app_name": cfg.policy_app_name,
                                                  "adapter_root": cfg.adapter_root, "adapter_scope": job_id,
                                                  "route_prefix": None}),
    })


def _refuse_nul(value: Any, where: str) -> None:
    """A NUL reaches the file system as an error no check expects (`embedded null byte`): 422 naming the field."""
    if isinstance(value, str) and "\x00" in value:
        raise RequestError(422, f"{where}: a NUL character is not allowed")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_nul(k, where)
            _refuse_nul(v, f"{where}.{k}" if isinstance(k, str) and "\x00" not in k else where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_nul(v, f"{where}[{i}]")


def within_policy(run: RunConfig, policy: JobPolicy) -> None:
    """RequestError(422) naming the first field past the operator's job policy: compute bounds, and judges only
    from the allowed deployments."""
    bounds = [("sft.num_workers", run.sft.num_workers, policy.max_workers),
              ("dpo.num_workers", run.dpo.num_workers, policy.max_workers),
              ("sft.epochs", run.sft.epochs, policy.max_epochs), ("dpo.epochs", run.dpo.epochs, policy.max_epochs),
              ("generation.max_tokens", run.generation.max_tokens, policy.max_new_tokens),
              ("review.max_tokens", run.review.max_tokens, policy.max_new_tokens),
              ("dpo.max_tokens", run.dpo.max_tokens, policy.max_new_tokens),
              ("eval.block_room_tokens", run.eval.block_room_tokens, policy.max_new_tokens),
              ("dpo.num_samples", run.dpo.num_samples, policy.max_dpo_samples),
              ("review.candidates", run.review.candidates, policy.max_review_candidates),
              ("dpo.rounds", run.dpo.rounds, policy.max_dpo_rounds),
              ("eval.bootstrap_samples", run.eval.bootstrap_samples, policy.max_bootstrap_samples)]
    for name, value, most in bounds:
        if value > most:
            raise RequestError(422, f"{name} {value} exceeds this gateway's job limit of {most}")
    if run.guards:  # a tenant's guard would be a model of its choosing deployed on the shared cluster
        raise RequestError(422, "guards: deploying a judge model is the operator's; use a deployment judge the "
                                "operator allows (gateway jobs.judges)")
    allowed = {(d.app_name, d.model_id, d.tokenizer) for d in policy.judges}
    for where, j in run.answer_judges():
        if j.type == "deployment" and (j.app_name, j.model_id, j.tokenizer) not in allowed:
            raise RequestError(422, f"{where}: deployment judge {j.model_id!r} of app {j.app_name!r} is not one the "
                                    "operator allows (gateway jobs.judges); app_name, model_id and tokenizer "
                                    "must match one exactly")


class JobsService:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self._client = None
        self._submitting = asyncio.Lock()

    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.cfg.ray_dashboard_url)
            except ConnectionError:
                raise self._unreachable() from None
        return self._client

    @staticmethod
    def _unreachable() -> RequestError:
        return RequestError(503, "the Ray job server is unreachable; retry later", retry_after=5)

    async def call(self, method: str, *args, **kwargs):
        """A JobSubmissionClient call off the event loop; a job server that is down is a 503, not a 500."""
        import requests

        try:
            return await run_in_threadpool(getattr(self.client(), method), *args, **kwargs)
        except (ConnectionError, requests.exceptions.ConnectionError):
            raise self._unreachable() from None

    def job_dir(self, job_id: str) -> Path:
        return Path(self.cfg.artifact_root).resolve() / job_id

    async def own_job(self, job_id: str, key_id: str):
        if not JOB_ID.match(job_id):
            raise RequestError(404, f"no job {job_id!r}")
        try:
            info = await self.call("get_job_info", job_id)
        except RuntimeError:
            raise RequestError(404, f"no job {job_id!r}") from None
        if (info.metadata or {}).get("key") != key_id:
            raise RequestError(404, f"no job {job_id!r}")
        return info

    async def submit(self, key_id: str, body: Any) -> dict[str, Any]:
        """Validate and confine a RunConfig, write it under the job's directory and submit it as a Ray Job."""
        if not isinstance(body, dict) or "config" not in body:
            raise RequestError(422, "body must be an object with a 'config' (a RunConfig)")
        job_id = f"st-{uuid.uuid4().hex[:12]}"
        run = confine(body["config"], self.cfg, job_id, key_id)
        async with self._submitting:  # two submissions of one key cannot both pass the quota
            await self.within_quota(key_id)
            return await self._submit(key_id, job_id, run, body)

    async def _submit(self, key_id: str, job_id: str, run: RunConfig, body: dict[str, Any]) -> dict[str, Any]:
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True)
        config_path = job_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False))
        env = {"PYTHONPATH": str(REPO_ROOT), "SAFE_TRIGGER_DATA": run.data.root, "PYTHONUNBUFFERED": "1"}
        try:
            await self.call("submit_job", entrypoint=f"{sys.executable} -m {ENTRYPOINT_MODULE} run {config_path}",
                             submission_id=job_id, runtime_env={"env_vars": env},
                             metadata={"key": key_id, "name": str(body.get("name") or run.name)})
        except RequestError:
            shutil.rmtree(job_dir, ignore_errors=True)  # nothing was submitted: leave no half-made job behind
            raise
        return {"id": job_id, "status": "PENDING"}  # no server paths: the report and logs are reached by id

    async def within_quota(self, key_id: str) -> None:
        """429 while the key has as many jobs pending or running as the job policy allows."""
        most = self.cfg.jobs.max_active_per_key
        active = [j for j in (await self.list_own(key_id))["jobs"] if j["status"] in ("PENDING", "RUNNING")]
        if len(active) >= most:
            raise RequestError(429, f"this key has {len(active)} jobs pending or running (the limit is {most}); "
                                    "wait for one to finish or cancel one", retry_after=30)

    async def list_own(self, key_id: str) -> dict[str, Any]:
        """The key's jobs, newest first: id, name, status and times (no other key's, no server paths)."""
        jobs = [j for j in await self.call("list_jobs") if (j.metadata or {}).get("key") == key_id and j.submission_id
                and JOB_ID.match(j.submission_id)]
        jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
        return {"jobs": [{"id": j.submission_id, "name": (j.metadata or {}).get("name"), "status": _status(j),
                          "start_time": j.start_time, "end_time": j.end_time} for j in jobs]}

    async def status(self, job_id: str, key_id: str) -> dict[str, Any]:
        info = await self.own_job(job_id, key_id)
        event = self.progress(job_id) or {}
        return {"id": job_id, "status": _status(info), "message": info.message, "stage": event.get("stage"), "progress": event.get("message"),
                "start_time": info.start_time, "end_time": info.end_time, "report_ready": self.report_dir(job_id) is not None,
                "name": (info.metadata or {}).get("name")}

    def progress_file(self, job_id: str) -> Path | None:
        found = sorted(self.job_dir(job_id).rglob(PROGRESS), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def progress(self, job_id: str) -> dict[str, Any] | None:
        """The newest line of the run's structured progress file (`progress.jsonl`), not parsed log text."""
        path = self.progress_file(job_id)
        return last_progress(path) if path else None

    async def events(self, job_id: str, key_id: str, after: int, limit: int) -> dict[str, Any]:
        """The run's progress events after offset `after` (a client polls with `next`): structured, no log text."""
        await self.own_job(job_id, key_id)
        path = self.progress_file(job_id)
        events, nxt = progress_events(path, after, limit) if path else ([], after)
        return {"id": job_id, "events": events, "next": nxt}

    def report_dir(self, job_id: str) -> Path | None:
        found = sorted(self.job_dir(job_id).rglob(f"{REPORT_DIR}/{REPORT_METRICS}"))
        return found[0].parent if found else None

    async def logs(self, job_id: str, key_id: str, follow: bool):
        await self.own_job(job_id, key_id)
        if not follow:
            return PlainTextResponse(await self.call("get_job_logs", job_id))

        async def tail():
            async for piece in self.client().tail_job_logs(job_id):
                yield piece

        return StreamingResponse(tail(), media_type="text/plain")

    async def cancel(self, job_id: str, key_id: str):
        await self.own_job(job_id, key_id)
        stopped = await self.call("stop_job", job_id)
        return JSONResponse({"id": job_id, "stopped": bool(stopped)}, status_code=202)

    async def report(self, job_id: str, key_id: str, format: str):
        info = await self.own_job(job_id, key_id)
        rdir = self.report_dir(job_id)
        if rdir is None:
            raise RequestError(404, f"job {job_id} has no report yet (status {info.status})")
        if format == "html":
            return HTMLResponse((rdir / REPORT_HTML).read_text())
        if format == "markdown":
            return PlainTextResponse((rdir / REPORT_MARKDOWN).read_text(), media_type="text/markdown")
        if format != "json":
            raise RequestError(400, f"format must be json, html or markdown, got {format!r}")
        return {"id": job_id, "metrics": json.loads((rdir / REPORT_METRICS).read_text()),
                "markdown": (rdir / REPORT_MARKDOWN).read_text()}


def _status(info) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)
