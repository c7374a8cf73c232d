"""Run the configurations of one evaluation, each in its own engine process, and compare them
with the 16-bit reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .metrics import logprob_agreement, perplexity
from .simulate import quantization_config


@dataclass(frozen=True)
class EvalConfig:
    """One engine configuration: a model directory, vLLM's ``quantization`` and KV-cache dtype."""

    model: str
    quantization: str | None = None
    kv_cache_dtype: str = "auto"

    @property
    def label(self) -> str:
        w = self.quantization or ("FP8 checkpoint" if quantization_config(self.model) is not None
                                     else "16-bit weights")
        kv = "16-bit KV" if self.kv_cache_dtype == "auto" else f"{self.kv_cache_dtype} KV"
        return f"{Path(self.model).name}: {w}, {kv}"


class EngineRunError(RuntimeError):
    """An engine process failed; the message carries the configuration and its log's tail."""


def score(config: EvalConfig, windows: list[list[int]], threads: int = 1, timeout: float = 3600,
          log: Path | None = None, env: dict[str, str | None] | None = None) -> dict:
    """Prompt log-probs of ``windows`` under ``config`` (one fresh single-process engine with
    ``threads`` OpenMP threads), with the engine's linear-layer summary. ``env``: variables set
    for the engine (a None value removes the variable) on top of this process's environment."""
    with tempfile.TemporaryDirectory(prefix="fp8-eval-") as tmp:
        wf = Path(tmp) / "windows.json"
        wf.write_text(json.dumps(windows))
        cmd = [sys.executable, "-m", "fp8_backend.vllm_adapter.evaluate", "--model", config.model,
               "--kv-cache-dtype", config.kv_cache_dtype, "--windows-file", str(wf)]
        if config.quantization:
            cmd += ["--quantization", config.quantization]
        engine_env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads),
                          TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        for k, v in (env or {}).items():
            if v is None:
                engine_env.pop(k, None)
            else:
                engine_env[k] = v
        log_path = Path(log) if log else Path(tmp) / "engine.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as f:
            try:
                rc = subprocess.run(cmd, env=engine_env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {timeout:.0f} s"
        out = log_path.read_text(errors="replace")
    for line in out.splitlines():
        if line.startswith("RESULT ") and rc == 0:
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - t0
            return result
    raise EngineRunError(f"{config.label}: engine failed (rc={rc}); last output:\n{out[-4000:]}")


def compare(reference: dict, results: dict[str, dict]) -> list[dict]:
    """One row per configuration: perplexity, its change against the reference, |delta log-prob|
    statistics and linear-layer weight bytes."""
    rows = [{"config": "reference", "ppl": perplexity(reference["logprobs"]), "linear": reference["linear"]}]
    for name, r in results.items():
        a = logprob_agreement(reference["logprobs"], r["logprobs"])
        rows.append({"config": name, "ppl": a["ppl"], "ppl_change": a["ppl"] / a["ppl_ref"] - 1,
                     "agreement": a, "linear": r["linear"]})
    return rows
