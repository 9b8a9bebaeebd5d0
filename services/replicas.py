"""How many replicas of a deployment Serve is running, read from `serve.status()`: the one fact both a pipeline
stage waiting out a replica restart and the gateway refusing requests during one need."""

from __future__ import annotations

from typing import Any


def _name(v: Any) -> str:
    return str(getattr(v, "value", v))  # Serve's str enums print as `ReplicaState.RUNNING`


def running_replicas(status: Any, app_name: str, deployment_name: str) -> tuple[int | None, str]:
    """RUNNING replicas of the deployment and a one-line account of its state; None when waiting cannot help:
    the application is gone, or Serve gave up deploying it (DEPLOY_FAILED)."""
    app = status.applications.get(app_name)
    if app is None:
        return None, f"the application {app_name!r} is not deployed"
    if _name(app.status) == "DEPLOY_FAILED":
        return None, f"Serve gave up deploying {app_name!r}: {app.message[:500]}"
    dep = app.deployments.get(deployment_name)
    if dep is None:
        return 0, f"{deployment_name!r} is not listed yet"
    states = {_name(k): n for k, n in dep.replica_states.items()}
    return states.get("RUNNING", 0), f"{_name(dep.status)}, replicas {states or 'none'}"
