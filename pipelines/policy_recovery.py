"""A policy replica lost mid-stage (the engine OOM-killed or crashed, its node gone): recognise it, wait until
Serve has a replica that answers again, and let the stage resend only the rows no committed part holds.

Serve restarts a replica whose actor died or whose health check fails (the embedded engine took 70-100 s to come
back on 2 cores), but it does not replay the requests that were in flight on it: those surface in the stage as
`ActorDiedError` (the process is gone) or `EngineDeadError` (the engine died inside a live replica). Any other
error (a request the engine refused, a bug of ours) still fails the stage at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

from services.policy import PolicyEndpoint
from services.replicas import running_replicas

# Exception class names (anywhere in an error's chain or, for errors Ray Data re-raised as text, its message)
# that mean the replica is gone rather than the request being wrong.
LOST_REPLICA_ERRORS = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "EngineDeadError",
                       "WorkerCrashedError", "NodeDiedError")


class PolicyUnavailableError(RuntimeError):
    """The policy did not come back (or was lost more often than allowed); committed rows are kept."""


@dataclass(frozen=True)
class Recovery:
    """How a stage survives lost replicas: at most `retries` losses, each waiting up to `timeout_s` for a
    replica that answers a health check."""

    retries: int = 0
    timeout_s: float = 900.0

    @classmethod
    def of(cls, generation: Any) -> "Recovery":
        return cls(generation.replica_retries, generation.replica_recovery_s)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)  # a RayTaskError's original error
        todo += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]


def replica_loss(exc: BaseException) -> str | None:
    """The failure's name when `exc` means a policy replica was lost, else None."""
    for e in _chain(exc):
        for cls in type(e).__mro__:
            if cls.__name__ in LOST_REPLICA_ERRORS:
                return cls.__name__
        text = str(e)
        for name in LOST_REPLICA_ERRORS:
            if name in text:
                return name
    return None


def wait_for_policy(endpoint: PolicyEndpoint, timeout_s: float, *, poll_s: float = 2.0, clock=time.monotonic,
                    sleep=time.sleep) -> float:
    """Seconds until a replica of the policy answers a health check again; PolicyUnavailableError after
    `timeout_s`, or at once when Serve has given up deploying it."""
    from ray import serve

    start = clock()
    handle = serve.get_deployment_handle(endpoint.deployment_name, endpoint.app_name)
    while True:
        running, last = running_replicas(serve.status(), endpoint.app_name, endpoint.deployment_name)
        if running is None:
            raise PolicyUnavailableError(last)
        if running:
            try:  # a replica the controller still lists may be the dead one: only an answer counts
                handle.check_health.remote().result(timeout_s=max(1.0, min(30.0, timeout_s - (clock() - start))))
                return clock() - start
            except Exception as e:  # noqa: BLE001 - any failure here means "not back yet"
                last += f"; health check: {type(e).__name__}"
        if clock() - start >= timeout_s:
            raise PolicyUnavailableError(f"no policy replica answered within {timeout_s:.0f}s (last: {last})")
        sleep(poll_s)
