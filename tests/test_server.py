"""The OpenAI-compatible server, started with `fp8-backend serve ... --quantization fp8` on
127.0.0.1, answers /v1/completions, and is stopped."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@contextlib.contextmanager
def running_server(model, log_path, *args: str):
    """`fp8-backend serve MODEL --host 127.0.0.1 --port <free> ARGS` in its own session; yields
    (base URL, process, log file) once /health answers; interrupted (then killed) on exit."""
    port = free_port()
    exe = shutil.which("fp8-backend") or ""
    cmd = ([exe] if exe else [sys.executable, "-m", "fp8_backend.cli"])
    cmd += ["serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    log = open(log_path, "w+")
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-5000:]}")
            try:
                get(base + "/health")
                break
            except OSError:
                if time.time() > deadline:
                    log.seek(0)
                    pytest.fail("server not healthy after 600 s:\n" + log.read()[-5000:])
                time.sleep(2)
        yield base, proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.slow
def test_server_completions_with_fp8(tiny_model, tmp_path):
    with running_server(tiny_model, tmp_path / "server.log", "--quantization", "fp8", "--dtype", "bfloat16",
                        "--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "tiny") as (base, proc, log):
        req = urllib.request.Request(
            base + "/v1/completions",
            data=json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
        assert body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] == 6
        assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
        log.seek(0)
        text = log.read()
        assert "quantization=fp8" in text
        assert "fp8-backend" in text  # our config announced itself in the server's log
    assert proc.returncode is not None
