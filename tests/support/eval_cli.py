"""`python -m fp8_backend.cli eval ...` in a subprocess (one OpenMP thread)."""

import os
import subprocess
import sys


def run_eval_cli(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fp8_backend.cli", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
