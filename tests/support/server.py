"""`fp8-backend serve` in a subprocess for tests: a free port, GET, and a context manager that
starts the server, waits until it answers and stops it."""

import contextlib
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
