"""vLLM engines for tests, each in a fresh interpreter (run_engine.py beside this file)."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


class EngineError(RuntimeError):
    def __init__(self, msg: str, output: str):
        super().__init__(msg)
        self.output = output


def run_engine(
    model: os.PathLike,
    llm_kwargs: dict | None = None,
    prompts: list[str] | None = None,
    max_tokens: int = 8,
    multiprocess: bool = False,
    timeout: int = 600,
    env: dict | None = None,
) -> dict:
    """Build a vLLM engine in a fresh interpreter; return run_engine.py's JSON result.

    Single-process eager mode unless ``multiprocess`` (vLLM's default: engine-core and worker
    processes, where the plugin must load again). Raises EngineError carrying the output.
    """
    e = dict(os.environ)
    e.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if not multiprocess:
        e["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        # layer_report sends a function to the worker process (LLM.apply_model); vLLM pickles
        # callables only when allowed. Test-only: the function is ours.
        e["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    e.update(env or {})
    cmd = [
        sys.executable,
        str(HERE / "run_engine.py"),
        "--model",
        str(model),
        "--llm-kwargs",
        json.dumps(llm_kwargs or {}),
        "--prompts",
        json.dumps(prompts or []),
        "--max-tokens",
        str(max_tokens),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    out = p.stdout + "\n" + p.stderr
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["log"] = out  # the engine's stdout + stderr (vLLM's and the plugin's log lines)
            return result
    raise EngineError(f"engine failed (exit {p.returncode}):\n{out[-6000:]}", out)
