"""Which failures of a stage's requests mean a lost policy replica (resend after it is back) and which must fail
the stage at once; the replica count read from Serve's own status types. The recovery itself, a replica
SIGKILLed under a running job, is in tests/test_gateway.py."""

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus
from vllm.v1.engine.exceptions import EngineDeadError

from pipelines.policy_recovery import Recovery, replica_loss
from pipelines.serve_batch import PolicyRequestError
from safetrigger.config import GenerationConfig
from services.replicas import running_replicas


def _task_error(cause: BaseException) -> BaseException:
    """What a handle call raises when the replica's method failed: Ray's dual-class task error."""
    return RayTaskError("chat", "Traceback ...", cause).as_instanceof_cause()


def test_a_dead_replica_or_engine_is_a_lost_replica_wherever_it_sits_in_the_chain():
    assert replica_loss(ActorDiedError()) == "ActorDiedError"
    assert replica_loss(_task_error(EngineDeadError())) == "EngineDeadError"
    try:
        try:
            raise EngineDeadError()
        except EngineDeadError as inner:
            raise RuntimeError("a stage failed") from inner
    except RuntimeError as outer:
        assert replica_loss(outer) == "EngineDeadError"
    # Ray Data re-raises a processor actor's failure with the original only in its text
    assert replica_loss(RuntimeError("UserCodeException: ... ray.exceptions.ActorDiedError: The actor died")) == "ActorDiedError"


def test_a_refused_request_or_our_own_bug_is_not_a_lost_replica():
    assert replica_loss(ValueError("prompt too long")) is None
    assert replica_loss(PolicyRequestError("the policy returned no choices for q1: BadRequestError 400")) is None
    assert replica_loss(_task_error(KeyError("choices"))) is None


def _status(app_status="RUNNING", replicas=None, message=""):
    dep = DeploymentStatusOverview(status=DeploymentStatus.HEALTHY,
                                   status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
                                   replica_states=replicas or {}, message="")
    app = ApplicationStatusOverview(status=ApplicationStatus(app_status), message=message, last_deployed_time_s=0.0,
                                    deployments={"PolicyServer:policy": dep})
    return ServeStatus(applications={"policy": app})


def _running(status):
    return running_replicas(status, "policy", "PolicyServer:policy")


def test_running_replicas_are_read_from_serves_status():
    assert _running(_status(replicas={ReplicaState.RUNNING: 1, ReplicaState.STARTING: 1}))[0] == 1
    running, said = _running(_status(replicas={ReplicaState.STARTING: 1}))
    assert running == 0 and said == "HEALTHY, replicas {'STARTING': 1}"


def test_waiting_cannot_help_when_serve_gave_up_or_the_app_is_gone():
    assert _running(_status("DEPLOY_FAILED", message="replica OOM")) == (None, "Serve gave up deploying 'policy': replica OOM")
    assert _running(ServeStatus()) == (None, "the application 'policy' is not deployed")


def test_recovery_settings_come_from_the_generation_config_and_stay_out_of_stage_keys():
    g = GenerationConfig(replica_retries=3, replica_recovery_s=60)
    assert Recovery.of(g) == Recovery(3, 60.0)
    assert {"replica_retries", "replica_recovery_s"} <= GenerationConfig.OPERATIONAL
    with pytest.raises(ValueError):
        GenerationConfig(replica_retries=11)  # a tenant's job cannot hold the replicas in a retry loop
    from pipelines.graph import compute_keys
    from pipelines.stages import QUERIES, main_graph
    from safetrigger.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "embedded.yaml")
    other = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"replica_retries": 5})})
    assert compute_keys(main_graph(cfg), cfg, {QUERIES: "q"}) == compute_keys(main_graph(other), other, {QUERIES: "q"})
