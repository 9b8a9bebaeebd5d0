"""A typed model of the KubeRay v1 fields the manifests in cluster/ use (ray.io/v1 RayCluster, RayJob and
RayService as defined by KubeRay's v1 API types, ray-operator/apis/ray/v1). No package registry ships the CRD
schemas, so this model stands in for them: unknown fields are errors (a misspelt field would be silently
ignored by the operator), and pod templates are validated separately against the Kubernetes schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metadata(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class HeadGroupSpec(_Strict):
    rayStartParams: dict[str, str] = Field(default_factory=dict)  # KubeRay v1: map[string]string
    template: dict[str, Any]
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None
    enableIngress: bool | None = None


class WorkerGroupSpec(_Strict):
    groupName: str
    replicas: int | None = Field(None, ge=0)
    minReplicas: int | None = Field(None, ge=0)
    maxReplicas: int | None = Field(None, ge=0)
    numOfHosts: int | None = Field(None, ge=1)
    rayStartParams: dict[str, str] = Field(default_factory=dict)
    template: dict[str, Any]
    suspend: bool | None = None


class RayClusterSpec(_Strict):
    rayVersion: str | None = None
    enableInTreeAutoscaling: bool | None = None
    autoscalerOptions: dict[str, Any] | None = None
    headServiceAnnotations: dict[str, str] | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(default_factory=list)
    suspend: bool | None = None


class RayJobSpec(_Strict):
    entrypoint: str
    runtimeEnvYAML: str | None = None
    metadata: dict[str, str] | None = None
    jobId: str | None = None
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = None
    entrypointNumCpus: float | None = None
    entrypointNumGpus: float | None = None
    entrypointResources: str | None = None
    shutdownAfterJobFinishes: bool | None = None
    ttlSecondsAfterFinished: int | None = Field(None, ge=0)
    activeDeadlineSeconds: int | None = Field(None, ge=1)
    backoffLimit: int | None = Field(None, ge=0)
    rayClusterSpec: RayClusterSpec | None = None
    clusterSelector: dict[str, str] | None = None
    submitterPodTemplate: dict[str, Any] | None = None
    suspend: bool | None = None


class RayServiceSpec(_Strict):
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec
    serviceUnhealthySecondThreshold: int | None = None
    deploymentUnhealthySecondThreshold: int | None = None
    upgradeStrategy: dict[str, Any] | None = None
    excludeHeadPodFromServeSvc: bool | None = None


class RayCluster(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: Metadata
    spec: RayClusterSpec


class RayJob(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Metadata
    spec: RayJobSpec


class RayService(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: Metadata
    spec: RayServiceSpec


KINDS = {"RayCluster": RayCluster, "RayJob": RayJob, "RayService": RayService}


def cluster_spec(doc: BaseModel) -> RayClusterSpec:
    if isinstance(doc, RayCluster):
        return doc.spec
    if isinstance(doc, RayJob):
        assert doc.spec.rayClusterSpec is not None
        return doc.spec.rayClusterSpec
    return doc.spec.rayClusterConfig
