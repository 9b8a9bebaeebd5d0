"""Promotion into the served registry: an operator's action, never a job's.

A job publishes and decides only in its own registry (`<root>/jobs/<job id>/`, `services/adapters.py`), so no
tenant can change what others are served. An operator (a key with the `admin` scope: `POST /v1/admin/promote`,
`safe-trigger promote`) promotes one of its adapters:

1. the version must be one the job's own gate decided on (its report evaluated exactly those weights);
2. the operator's gate policy decides again on that report (`safetrigger/evaluation/regate.py`): the job's own
   gate came from a tenant's config, and a suite with too few examples cannot carry a promotion;
3. the files are checked and copied into the served registry as a new version of the same name, and
   PROMOTED.json points at it, so `model: policy` switches without a restart; the decision is recorded either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetrigger.evaluation.regate import MetricsError, decide_again

from . import adapters, registry


class PromotionRefused(Exception):
    def __init__(self, status: int, message: str, decision: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.decision = status, message, decision


def job_version(root: str | Path, job_id: str, adapter: str, version: int | None) -> tuple[int, Path]:
    """The job's adapter version (its current one when not given), and that its gate decided on it."""
    job_root = adapters.registry_root(root, job_id)
    try:
        number, path = adapters.version(job_root, adapter, version) if version else adapters.current(job_root, adapter)
    except adapters.AdapterError:
        raise PromotionRefused(404, f"job {job_id} has no adapter {adapter!r}" + (f" version {version}" if version else "")) from None
    decided = [d for d in registry.decisions(job_root) if d.get("candidate") == adapter and d.get("version") == number]
    if not decided:
        raise PromotionRefused(409, f"job {job_id}'s report evaluated no {adapter} v{number}: only a version its "
                                    "gate decided on can be promoted")
    return number, path


def promote_from_job(root: str | Path, job_id: str, adapter: str, version: int | None, metrics_path: Path | None,
                     policy: Any, served_name: str, base_model: str | None, by: str) -> dict[str, Any]:
    """Promote a job's adapter under the operator's `policy` (`gateway.config.PromotionPolicy`); PromotionRefused
    (404 nothing to promote, 409 the gate refuses) otherwise. Returns the promotion entry and the decision."""
    number, path = job_version(root, job_id, adapter, version)
    if metrics_path is None or not metrics_path.is_file():
        raise PromotionRefused(409, f"job {job_id} has no report to decide on")
    try:
        metrics = json.loads(metrics_path.read_text())
        decision = decide_again(metrics, adapter, policy.gate.rules(), policy.min_suite_examples)
    except (MetricsError, json.JSONDecodeError) as e:
        raise PromotionRefused(409, f"job {job_id}'s report cannot be decided on: {e}") from None
    entry = {**decision.to_dict(), "job": job_id, "job_version": number, "by": by, "gate": "operator"}
    if not decision.promote:
        registry.record_decision(root, {**entry, "promoted": False})
        raise PromotionRefused(409, f"the operator's gate refuses {adapter} v{number} of job {job_id}: "
                                    + "; ".join(decision.reasons), decision.to_dict())
    try:
        served = adapters.publish(root, adapter, path, base_model)
    except adapters.AdapterError:  # its message names server paths: the operator finds it in the decisions file
        registry.record_decision(root, {**entry, "promoted": False, "refused": "adapter files failed their check"})
        raise PromotionRefused(409, f"{adapter} v{number} of job {job_id} cannot be served: its files failed the "
                                    "check against the base model") from None
    registry.record_decision(root, {**entry, "version": served, "promoted": True})
    promoted = registry.promote(root, adapter, served, served_name, job=job_id, job_version=number, by=by,
                                reasons=decision.reasons)
    return {"promoted": promoted, "decision": decision.to_dict()}
