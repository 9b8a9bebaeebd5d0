"""Gateway settings: where the policy answers, which keys may do what, and the limits every request meets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from safetrigger.config import GateConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# engine fields an operator may grant a key beyond the allowlist: they change what is echoed, how the last message
# is continued or when generation stops, never the engine's logits path
EngineField = Literal["echo", "add_generation_prompt", "continue_final_message", "ignore_eos"]


class KeyConfig(_Strict):
    """One API key, stored as its SHA-256 only (`safe-trigger keygen` prints the key once)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # what logs and metrics name; never the key itself
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # inference: chat and completions; jobs: pipeline jobs of its own; admin: promote a job's adapter (operators)
    scopes: list[Literal["inference", "jobs", "admin"]] = Field(min_length=1)
    requests_per_minute: float = Field(600, gt=0)
    burst: int = Field(20, ge=1)
    max_concurrent: int = Field(8, ge=1)
    # may this key's users see the <safe> analysis (in `content` or `safety.analysis`)? It bounds what a request's
    # `safety` asks: a key without it gets the verdict only
    show_safety: bool = False
    # engine fields beyond the allowlist (services/gateway/fields.py) an operator grants this key, e.g. a test
    # harness that prefills the assistant turn; never needed by applications
    engine_fields: list[EngineField] = Field(default_factory=list)


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(1_000_000, ge=1024)
    body_timeout_s: float = Field(10.0, gt=0)  # the whole body must arrive within this
    max_prompt_chars: int = Field(32_000, ge=1)
    max_tokens: int = Field(2048, ge=1)  # the most a request may ask for; also the default when it asks nothing


class JudgeDeployment(_Strict):
    """A judge model deployed in the cluster that jobs may use, exactly as listed (a job naming any other app,
    model or tokenizer is refused: those fields would reach any Serve app or path). Jobs reach it by handle."""

    app_name: str
    model_id: str
    tokenizer: str


class JobPolicy(_Strict):
    """What any tenant's job may ask of the shared cluster, enforced at submission (the job's own config cannot
    widen it)."""

    max_active_per_key: int = Field(2, ge=1)  # PENDING or RUNNING jobs of one key
    max_workers: int = Field(4, ge=1)  # Ray Train workers of SFT and DPO
    max_epochs: float = Field(10, gt=0)
    max_new_tokens: int = Field(4096, ge=16)  # generation, review, DPO sampling and eval block room
    max_dpo_samples: int = Field(16, ge=2)
    max_review_candidates: int = Field(4, ge=1)  # self-selected answers: reviews sampled per query
    max_dpo_rounds: int = Field(2, ge=1)  # iterative DPO: each round samples, trains and evaluates again
    max_bootstrap_samples: int = Field(20_000, ge=100)
    judges: list[JudgeDeployment] = Field(default_factory=list)  # the only deployment judges a job may name
    hf_datasets: list[str] = Field(default_factory=list)  # the only hub datasets a `type: hf` source may name
    repo_data: str = "data"  # `repo:` paths must lie under this folder of the checkout
    # where every job's MLflow run goes (a job cannot name its own store); None: one sqlite store beside the jobs
    tracking_uri: str | None = None


class PromotionPolicy(_Strict):
    """The operator's gate, decided again on a job's report when its adapter is promoted (`services/promotion.py`);
    a job's own gate is its tenant's config and decides only in the job's registry."""

    gate: GateConfig = GateConfig()  # its ASR and over-refusal suite lists cannot be empty
    min_suite_examples: int = Field(20, ge=1)  # paired examples every gated ASR and over-refusal suite must hold


class GatewayConfig(_Strict):
    served_name: str = "policy"  # the policy's base model id
    # requests, model lists and readiness go to the policy's deployments by handle (same Serve cluster: the policy
    # app has no HTTP route), or over HTTP to policy_base_url (an OpenAI server elsewhere)
    policy_via: Literal["handle", "http"] = "handle"
    policy_base_url: str | None = None  # policy_via http only, e.g. http://vllm.other:8000/v1
    policy_deployment: str | None = None  # default: ray.serve.llm's name for it, "PolicyServer:<served_name>"
    adapter_root: str | None = None  # the adapter registry; PROMOTED.json there picks the default model
    keys: list[KeyConfig] = Field(default_factory=list)
    limits: LimitsConfig = LimitsConfig()
    # jobs: where the Ray job server listens, and the only places a job may read from and write to
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    artifact_root: str = "runs/jobs"
    allowed_data_roots: list[str] = Field(default_factory=list)
    jobs: JobPolicy = JobPolicy()
    promotion: PromotionPolicy = PromotionPolicy()
    policy_app_name: str = "policy"  # jobs attach to this running policy app instead of starting their own
    # the served policy's model.source: a job that names none gets it, one that names another is refused
    policy_model_source: str | None = None
    # the policy's chat template opens `<think>` itself (DeepSeek-R1-Distill): its content starts inside the
    # reasoning. Set from the template wherever the gateway is put in front of a policy (deploy.pointed_at).
    policy_think_opened: bool = False
    request_timeout_s: float = Field(600, gt=0)

    @model_validator(mode="after")
    def _http_needs_a_url(self) -> "GatewayConfig":
        if self.policy_via == "http" and not self.policy_base_url:
            raise ValueError("policy_via http needs policy_base_url (the OpenAI server's /v1 URL)")
        return self

    @property
    def deployment(self) -> str:
        return self.policy_deployment or f"PolicyServer:{self.served_name}"


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    return GatewayConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})
