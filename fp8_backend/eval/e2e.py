"""One engine per process for end-to-end measurements (load, generate, time decode, score text):
the worker is :mod:`fp8_backend.vllm_adapter.e2e_worker`; used by scripts/demo.py and
benchmarks/bench_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class WorkerError(RuntimeError):
    pass


def run_e2e(model: str, quantization: str | None = None, *, eager: bool = True, threads: int = 1,
            prompts: list[str] | None = None, chat: bool = True, gen_tokens: int = 48,
            decode_tokens: int = 128, decode_repeats: int = 3, windows: list[list[int]] | None = None,
            log: Path | None = None, timeout: float = 1200, env: dict | None = None) -> dict:
    """One engine in a fresh process (e2e_worker.py); its RESULT dict (with "linear":
    fp8_backend.eval.linear_summary) plus "wall_s". Raises WorkerError with the log's tail on failure."""
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        args = ["--model", str(model), "--gen-tokens", str(gen_tokens),
                "--decode-tokens", str(decode_tokens), "--decode-repeats", str(decode_repeats),
                "--prompts", json.dumps(prompts or [])]
        if quantization:
            args += ["--quantization", quantization]
        if eager:
            args.append("--eager")
        if chat:
            args.append("--chat")
        if windows:
            score = Path(tmp) / "windows.json"
            score.write_text(json.dumps(windows))
            args += ["--score-file", str(score)]
        e = dict(os.environ)
        e.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(threads),
                  "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
        e.update(env or {})
        cmd = [sys.executable, "-m", "fp8_backend.vllm_adapter.e2e_worker", *args]
        log_path = Path(log) if log else Path(tmp) / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as f:
            try:
                rc = subprocess.run(cmd, env=e, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.perf_counter() - t0
        out = log_path.read_text(errors="replace")
    result = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if rc != 0 or result is None:
        raise WorkerError(f"engine ({quantization or 'bf16'}) failed (rc={rc}); last output:\n{out[-4000:]}")
    result["wall_s"] = wall
    return result
