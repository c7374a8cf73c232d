#!/usr/bin/env python3
"""Serving: `fp8-backend serve` under a real load generator (guidellm), bf16 vs FP8 weights vs
FP8 weights + FP8 KV cache.

    .venv/bin/python benchmarks/bench_serve.py            # full run, rewrites the "serving" section
    .venv/bin/python benchmarks/bench_serve.py --quick    # a few requests per level: checks the plumbing

Do not wrap it in `flock` / `taskset`: it takes the machine's timing lock itself (exclusive around
each measured load-generator run, shared while servers start and warm up; --lock none skips it)
and pins its processes itself:

  * three servers (``python -m fp8_backend.cli serve MODEL ...``: bf16; ``--quantization fp8``;
    ``--quantization fp8 --kv-cache-dtype fp8``) are started once and stay up for the whole run,
    each on a free port, vLLM's default multi-process server with --enforce-eager (--compile: vLLM's
    default torch.compile mode), --engine-cpus (default core 0) for the model worker
    (``VLLM_CPU_OMP_THREADS_BIND``: one OpenMP thread per core listed);
  * the HTTP front-end, vLLM's scheduler process and the load generator run on --client-cpus
    (default core 1), so that the worker has its core to itself. vLLM's CPU OpenMP threads spin:
    a 2-thread worker sharing both cores with the front-end and the load generator would measure
    the contention, not the kernels;
  * for every concurrency level (--streams) the three servers are driven one after another
    (the order rotates per level), so the fp8 / bf16 ratios of one level come from one stretch of
    time: ``guidellm run`` with a concurrent profile of that many streams, synthetic prompts of
    exactly --prompt-tokens tokens (the /v1/completions API: no chat template), --output-tokens
    output tokens (ignore_eos), --requests requests.

guidellm 0.8.1 lives in its own virtual environment (--guidellm-venv, default .venv-guidellm in
the repository root; created with ``pip install guidellm==0.8.1 matplotlib`` if missing), so the
engine's pinned packages are untouched; it also draws the plot. Served model name = the model
directory's absolute path (guidellm loads its tokenizer from that name), HF_HUB_OFFLINE=1.

Reported per configuration and level: output tokens/s (output tokens of all successful requests /
the benchmark's duration), time to first token and inter-token latency (median and p90 over
requests / token gaps), and fp8 / bf16 ratios. Writes the "serving" section of
benchmarks/RESULTS.md, benchmarks/serving.png, and every raw guidellm JSON plus the server logs
under --logs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
GUIDELLM_VERSION = "0.8.1"
#: name -> extra `serve` arguments; bf16 first: it is what the ratios are against
CONFIGS: dict[str, list[str]] = {
    "bf16": [],
    "fp8": ["--quantization", "fp8"],
    "fp8+kv8": ["--quantization", "fp8", "--kv-cache-dtype", "fp8"],
}
LABELS = {"bf16": "bf16 (vLLM alone)", "fp8": "FP8 weights", "fp8+kv8": "FP8 weights + FP8 KV cache"}
DEFAULT_STREAMS = (1, 4, 16, 32)
QUICK_STREAMS = (1, 4)
SECTION = "serving"
PLOT = Path(__file__).with_name("serving.png")
#: issue targets: streams -> minimum fp8 / bf16 output tokens/s (reported, not asserted)
TARGETS = {1: 1.4, 16: 1.2}


# ----------------------------------------------------------------------------------------------
# Arguments (pure)
# ----------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    """"1,4,16" -> [1, 4, 16]; every value a positive integer."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, found {text!r}")
    return vals


def default_requests(streams: int, quick: bool = False) -> int:
    """Requests for one level: at least 8, at least one per stream (one wave at 16 and 32 streams:
    on a 2-core CPU the 256-token prefills of a wave of 32 already take minutes); --quick: one
    wave, at least 2."""
    return max(2, streams) if quick else max(8, streams)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory (default {DEFAULT_MODEL}; "
                    "fetched by scripts/get_smollm2.py if it is the default and missing)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {', '.join(CONFIGS)} (bf16 is needed for ratios)")
    ap.add_argument("--streams", type=int_list, default=None,
                    help=f"concurrency levels (default {','.join(map(str, DEFAULT_STREAMS))}; "
                         f"--quick: {','.join(map(str, QUICK_STREAMS))})")
    ap.add_argument("--requests", type=int_list, default=None,
                    help="requests per level: one value for all levels or one per level "
                         "(default max(8, streams); --quick: max(2, streams))")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="few requests, levels 1 and 4: a plumbing check")
    ap.add_argument("--compile", action="store_true",
                    help="vLLM's default torch.compile mode instead of --enforce-eager (its start-up profile run "
                         "of max-num-batched-tokens tokens per server, all on the engine core, costs minutes here)")
    ap.add_argument("--engine-cpus", default="0",
                    help="cores for the model worker, one OpenMP thread each (VLLM_CPU_OMP_THREADS_BIND; default 0)")
    ap.add_argument("--client-cpus", default="1",
                    help="cores for the HTTP front-end, vLLM's scheduler process and guidellm (default 1; "
                         "'all': no pinning)")
    ap.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per server (--kv-cache-memory-bytes)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--lock", default="/tmp/fp8-timing.lock",
                    help="flock file: exclusive around each measured run, shared while servers start; 'none': no locking")
    ap.add_argument("--guidellm-venv", default=str(ROOT / ".venv-guidellm"))
    ap.add_argument("--logs", default=None, help="directory for guidellm JSON and server logs "
                    "(default /tmp/bench_serve-<time>)")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / serving.png")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--render", metavar="SUMMARY_JSON", default=None,
                    help="no run: rewrite RESULTS.md and the plot from a summary written by --json")
    ap.add_argument("--from-logs", metavar="DIR", default=None,
                    help="no run: rebuild the summary from the guidellm-<config>-<streams>.json files in DIR "
                         "(a run that was stopped early; pass its --streams / --requests / --compile again)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        ap.error(f"--configs: unknown {unknown or configs!r}; expected a subset of {', '.join(CONFIGS)}")
    args.configs = [c for c in CONFIGS if c in configs]  # canonical order, bf16 first
    if args.streams is None:
        args.streams = list(QUICK_STREAMS if args.quick else DEFAULT_STREAMS)
    if args.requests is None:
        args.requests = [default_requests(s, args.quick) for s in args.streams]
    elif len(args.requests) == 1:
        args.requests = args.requests * len(args.streams)
    elif len(args.requests) != len(args.streams):
        ap.error(f"--requests: expected 1 or {len(args.streams)} values (one per level), found {len(args.requests)}")
    for s, n in zip(args.streams, args.requests):
        if n < s:
            ap.error(f"--requests: {n} requests at {s} streams would never fill the streams")
    if args.prompt_tokens < 1 or args.output_tokens < 2:
        ap.error("--prompt-tokens must be >= 1 and --output-tokens >= 2 (inter-token latency needs 2 tokens)")
    args.engine_threads = len(parse_cpus(args.engine_cpus))
    return args


def parse_cpus(text: str) -> list[int]:
    """"0", "0,1", "0-3" -> sorted core ids (taskset / VLLM_CPU_OMP_THREADS_BIND syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            cpus.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"CPU list: expected e.g. '0', '0,1' or '0-3', found {text!r}") from None
    if not cpus:
        raise ValueError(f"CPU list: empty ({text!r})")
    return sorted(cpus)


# ----------------------------------------------------------------------------------------------
# guidellm results (pure)
# ----------------------------------------------------------------------------------------------
def _dist(metrics: dict, name: str) -> dict:
    d = metrics.get(name) or {}
    return d.get("successful") or {}


def summarize_benchmark(bench: dict) -> dict:
    """One guidellm 0.8.1 generative benchmark (an item of the report's "benchmarks") -> the
    numbers this benchmark reports. Latencies in ms; output_tok_s = output tokens of the successful
    requests / the benchmark's measured duration."""
    m = bench["metrics"]
    totals = m["request_totals"]
    strategy = bench["config"]["strategy"]
    duration = float(bench["duration"])
    out_tokens = float(_dist(m, "output_token_count").get("total_sum", 0.0))
    ttft, itl = _dist(m, "time_to_first_token_ms"), _dist(m, "inter_token_latency_ms")
    return {
        "streams": int(strategy.get("streams") or strategy.get("max_concurrency")),
        "successful": int(totals["successful"]),
        "errored": int(totals["errored"]),
        "incomplete": int(totals["incomplete"]),
        "duration_s": duration,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration if duration > 0 else 0.0,
        "prompt_tokens_median": _dist(m, "prompt_token_count").get("median"),
        "output_tokens_median": _dist(m, "output_token_count").get("median"),
        "ttft_ms_median": ttft.get("median"),
        "ttft_ms_p90": (ttft.get("percentiles") or {}).get("p90"),
        "itl_ms_median": itl.get("median"),
        "itl_ms_p90": (itl.get("percentiles") or {}).get("p90"),
    }


def parse_guidellm_report(report: dict) -> list[dict]:
    """A guidellm JSON report (``--output kind=json``) -> one summary per benchmark in it."""
    benches = report.get("benchmarks")
    if not isinstance(benches, list) or not benches:
        raise ValueError("guidellm report: expected a non-empty 'benchmarks' list, found "
                         f"{type(benches).__name__}")
    return [summarize_benchmark(b) for b in benches]


def ratios(rows: dict[str, dict[int, dict]], config: str, base: str = "bf16") -> dict[int, dict]:
    """Per level: config / base for output tok/s (higher is better) and base-relative TTFT / ITL
    medians (config / base: below 1 is better)."""
    out = {}
    for streams, r in rows.get(config, {}).items():
        b = rows.get(base, {}).get(streams)
        if not b:
            continue
        div = lambda x, y: (x / y) if (x is not None and y) else None  # noqa: E731
        out[streams] = {"output_tok_s": div(r["output_tok_s"], b["output_tok_s"]),
                        "ttft_ms_median": div(r["ttft_ms_median"], b["ttft_ms_median"]),
                        "itl_ms_median": div(r["itl_ms_median"], b["itl_ms_median"])}
    return out


# ----------------------------------------------------------------------------------------------
# Report (pure)
# ----------------------------------------------------------------------------------------------
def _f(x, fmt="{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render(summary: dict, plot_name: str | None = PLOT.name) -> str:
    """The "serving" section of RESULTS.md from a summary (see run())."""
    meta, rows = summary["meta"], {c: {int(k): v for k, v in lv.items()} for c, lv in summary["rows"].items()}
    configs = [c for c in CONFIGS if c in rows]
    streams = sorted({s for lv in rows.values() for s in lv} | set(meta.get("streams", [])))
    lines = [
        f"## Serving: {meta['model_name']} behind `fp8-backend serve`, driven by guidellm",
        "",
        f"Regenerate: `{meta['command']}`" + (f" (this run took {meta['wall_s'] / 60:.0f} min)" if meta.get("wall_s") else "")
        + "; the full default run is `.venv/bin/python benchmarks/bench_serve.py`. It takes the timing lock "
        "and pins its processes itself: do not wrap it in flock / taskset.",
        f"CPU: {meta['cpu']}. fp8-backend CPU kernel path: `{meta['kernel_path']}`. "
        f"Engine: vllm-cpu {meta['vllm_version']}, default multi-process server, "
        f"{'enforce_eager' if meta['eager'] else 'torch.compile (vLLM default)'}, model worker with "
        f"{meta['engine_threads']} OpenMP thread(s) pinned to core(s) {meta['engine_cpus']} "
        f"(VLLM_CPU_OMP_THREADS_BIND); HTTP front-end, scheduler process and guidellm {GUIDELLM_VERSION} on "
        f"core(s) {meta['client_cpus']}. KV cache {meta['kv_cache_mib']} MiB per server, prefix caching off "
        "(every prefill is computed). Date: "
        f"{meta['date']}.",
        f"Load: concurrent streams {', '.join(map(str, streams))}; prompts of {meta['prompt_tokens']} tokens "
        f"(synthetic, /v1/completions), {meta['output_tokens']} output tokens (ignore_eos); requests per level: "
        + ", ".join(f"{s}: {n}" for s, n in zip(meta['streams'], meta['requests'])) + ". "
        "The three servers stay up together; each level drives them one after another (order rotating), "
        "each run under the exclusive timing lock, so a level's ratios come from one stretch of time.",
        "",
        "| config | streams | output tok/s | TTFT median, ms | TTFT p90, ms | ITL median, ms | ITL p90, ms | ok / errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in configs:
        for s in streams:
            r = rows[c].get(s)
            if r is None:
                lines.append(f"| {LABELS[c]} | {s} | failed: {summary.get('errors', {}).get(f'{c}@{s}', 'not run')} | | | | | |")
                continue
            lines.append(f"| {LABELS[c]} | {s} | {r['output_tok_s']:.1f} | {_f(r['ttft_ms_median'], '{:.0f}')} | "
                         f"{_f(r['ttft_ms_p90'], '{:.0f}')} | {_f(r['itl_ms_median'])} | {_f(r['itl_ms_p90'])} | "
                         f"{r['successful']} / {r['errored'] + r['incomplete']} |")
    if "bf16" in rows and len(configs) > 1:
        lines += ["", "Ratios to bf16, same level (output tok/s: higher is better; TTFT / ITL medians: lower is better):", "",
                  "| config | " + " | ".join(f"{s} stream{'s' if s > 1 else ''}" for s in streams) + " |",
                  "|---|" + "---:|" * len(streams)]
        for c in configs[1:]:
            rt = ratios(rows, c)
            cells = []
            for s in streams:
                x = rt.get(s)
                if not x:
                    cells.append("n/a")
                    continue
                tgt = TARGETS.get(s)
                verdict = f" (target >= {tgt}x: {'met' if x['output_tok_s'] >= tgt else 'NOT met'})" if tgt else ""
                cells.append(f"tok/s {x['output_tok_s']:.2f}x{verdict}; TTFT {_f(x['ttft_ms_median'], '{:.2f}')}x; "
                             f"ITL {_f(x['itl_ms_median'], '{:.2f}')}x")
            lines.append(f"| {LABELS[c]} | " + " | ".join(cells) + " |")
    lines += ["", "Output tok/s = output tokens of the successful requests / the run's duration (guidellm's "
              "measured window: first request sent to last answer, so it includes the ramp-up and the last "
              "wave's drain). TTFT: per request, request sent to first streamed token (includes queueing "
              "behind other requests' prefills). ITL: gaps between streamed tokens after the first. "
              + (f"Issue targets (after the kernel work): FP8 weights >= {TARGETS[1]}x bf16 output tok/s at 1 "
                 f"stream and >= {TARGETS[16]}x at 16 streams." if TARGETS else "")]
    if plot_name:
        lines += ["", f"![output tokens/s vs concurrent streams]({plot_name})"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Lock:
    """flock on the machine's timing lock file; no-op when path is None."""

    def __init__(self, path: str | None):
        self.path = path

    @contextlib.contextmanager
    def hold(self, exclusive: bool):
        if not self.path:
            yield
            return
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _set_affinity(cpus: list[int] | None):
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@dataclass
class Server:
    name: str
    model: str
    extra: list[str]
    args: argparse.Namespace
    log_path: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "fp8_backend.cli", "serve", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
               "--kv-cache-memory-bytes", str(self.args.kv_cache_mib << 20),
               "--max-model-len", str(self.args.max_model_len), "--seed", "0",
               "--disable-uvicorn-access-log", "--no-enable-prefix-caching", *self.extra]
        if not self.args.compile:
            cmd.append("--enforce-eager")
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env.update({
            "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
            "VLLM_CPU_OMP_THREADS_BIND": self.args.engine_cpus,
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        })
        self._log = open(self.log_path, "w")
        # own session: the server's whole process group (front-end, engine core, worker) is stopped at the end
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_set_affinity(self.args.client_cpu_list))

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode} before /health answered; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server {self.name} not healthy after {timeout:.0f} s; log {self.log_path}:\n"
                                   + self.log_tail())
            time.sleep(2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            # children left behind in the group (engine core, worker) after the leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log:
            self._log.close()
            self._log = None


def warm_up(server: Server, model: str, concurrency: int, prompt_words: int) -> None:
    """One, then `concurrency` concurrent short completions, so that the first measured run does
    not pay one-time costs (first requests, first batched steps, allocator growth)."""
    errors: list[str] = []

    def one(i: int) -> None:
        rng = random.Random(i)
        words = " ".join(rng.choice(("alpha", "river", "stone", "light", "paper", "green", "cloud", "seven"))
                         for _ in range(prompt_words))
        body = json.dumps({"model": model, "prompt": f"{i} {words}", "max_tokens": 8, "min_tokens": 8,
                           "ignore_eos": True, "temperature": 0}).encode()
        req = urllib.request.Request(server.base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(str(e))

    for batch in (1, concurrency):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"warm-up of server {server.name} failed: {errors[0]}; log:\n{server.log_tail()}")


def ensure_guidellm(venv: Path) -> Path:
    exe = venv / "bin" / "guidellm"
    if exe.is_file() and (venv / "bin" / "python").is_file():
        return exe
    print(f"creating {venv} with guidellm=={GUIDELLM_VERSION} (a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    f"guidellm=={GUIDELLM_VERSION}", "matplotlib"], check=True)
    return exe


def guidellm_cmd(exe: Path, target: str, model: str, streams: int, requests: int,
                 prompt_tokens: int, output_tokens: int, out: Path, seed: int = 42) -> list[str]:
    return [str(exe), "run",
            "--backend", f"kind=openai_http,target={target},model={model},request_format=/v1/completions",
            "--profile", f"kind=concurrent,streams={streams}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--constraint", f"kind=max_requests,count={requests}",
            "--seed", f"kind=static,value={seed}",
            "--output", f"kind=json,path={out}",
            "--disable-progress"]


def run_guidellm(args, exe: Path, server: Server, model: str, streams: int, requests: int, logs: Path) -> dict:
    out = logs / f"guidellm-{server.name}-{streams}.json"
    # one seed per level: every configuration gets the same prompts at a level, no prompt repeats across levels
    cmd = guidellm_cmd(exe, server.base, model, streams, requests, args.prompt_tokens, args.output_tokens, out,
                       seed=1000 + streams)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # its own venv; nothing of the engine's tree
    log = logs / f"guidellm-{server.name}-{streams}.log"
    timeout = 600 + 30 * requests
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=logs, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                           preexec_fn=_set_affinity(args.client_cpu_list))
    if p.returncode != 0 or not out.is_file():
        raise RuntimeError(f"guidellm failed (rc={p.returncode}) against {server.name} at {streams} streams; "
                           f"log {log}:\n{log.read_text(errors='replace')[-3000:]}")
    res = parse_guidellm_report(json.loads(out.read_text()))[0]
    if server.proc.poll() is not None:
        raise RuntimeError(f"server {server.name} died during the run; log:\n{server.log_tail()}")
    return res


def vllm_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Plot (runs in the guidellm venv, which has matplotlib)
# ----------------------------------------------------------------------------------------------
def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = summary["meta"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for c in CONFIGS:
        lv = {int(k): v for k, v in summary["rows"].get(c, {}).items()}
        if not lv:
            continue
        xs = sorted(lv)
        ax.plot(xs, [lv[s]["output_tok_s"] for s in xs], marker="o", label=LABELS[c])
    ax.set_xscale("log", base=2)
    streams = sorted({int(s) for lv in summary["rows"].values() for s in lv})
    ax.set_xticks(streams)
    ax.set_xticklabels([str(s) for s in streams])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{meta['model_name']}, fp8-backend serve, {meta['prompt_tokens']} in / {meta['output_tokens']} out\n"
                 f"{meta['cpu_short']}, kernels: {meta['kernel_path']}, {meta['engine_threads']} engine thread(s), {meta['date']}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def write_outputs(summary: dict, args) -> None:
    from fp8_backend.eval.results_md import update_section

    tmp = Path(args.logs) / "summary.json"
    tmp.write_text(json.dumps(summary, indent=1))
    py = Path(args.guidellm_venv) / "bin" / "python"
    p = subprocess.run([str(py), str(Path(__file__).resolve()), "--_plot", str(tmp), str(PLOT)],
                       capture_output=True, text=True, timeout=300)
    ok = p.returncode == 0 and PLOT.is_file()
    if not ok:
        print(f"plot failed (rc={p.returncode}): {p.stderr[-2000:]}", file=sys.stderr)
    update_section(ROOT / "benchmarks" / "RESULTS.md", SECTION, render(summary, PLOT.name if ok else None))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def ensure_model(model: str) -> str:
    path = (ROOT / model) if not Path(model).is_absolute() else Path(model)
    if not (path / "config.json").is_file():
        if model != DEFAULT_MODEL:
            sys.exit(f"bench_serve: model directory {path} has no config.json")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "get_smollm2.py"), "--out", str(path)],
                       cwd=ROOT, check=True)
    return str(path.resolve())


def rows_from_logs(logs: Path) -> dict[str, dict[int, dict]]:
    """guidellm-<config>-<streams>.json files of a run directory -> rows as run() returns them."""
    rows: dict[str, dict[int, dict]] = {}
    for c in CONFIGS:
        for f in sorted(logs.glob(f"guidellm-{c}-*.json")):
            level = f.stem[len(f"guidellm-{c}-"):]
            if level.isdigit():
                rows.setdefault(c, {})[int(level)] = parse_guidellm_report(json.loads(f.read_text()))[0]
    return rows


def run_meta(args, model: str) -> dict:
    from fp8_backend.eval.results_md import cpu_description, kernel_path

    shown, skip = [], False  # the command line as run, less where its files went
    for a in args.argv:
        if skip or a.startswith(("--logs=", "--json=", "--from-logs=")):
            skip = False
        elif a in ("--logs", "--json", "--from-logs"):
            skip = True
        elif a != "--no-write":
            shown.append(a)
    cmd = " ".join([".venv/bin/python benchmarks/bench_serve.py", *map(shlex.quote, shown)])
    meta = {
        "model_name": Path(model).name, "model": model, "cpu": cpu_description(),
        "cpu_short": "", "kernel_path": kernel_path(ROOT), "vllm_version": vllm_version(),
        "eager": not args.compile, "engine_cpus": args.engine_cpus, "engine_threads": args.engine_threads,
        "client_cpus": args.client_cpus, "kv_cache_mib": args.kv_cache_mib,
        "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "streams": args.streams, "requests": args.requests, "date": datetime.date.today().isoformat(),
        "command": cmd,
    }
    meta["cpu_short"] = meta["cpu"].split(",")[0].split("(")[0].strip() + (", no AVX-512" if "no AVX-512" in meta["cpu"] else "")
    return meta


def run(args) -> dict:
    t_start = time.time()
    model = ensure_model(args.model)
    exe = ensure_guidellm(Path(args.guidellm_venv))
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    lock = _Lock(None if args.lock == "none" else args.lock)
    servers = {c: Server(c, model, CONFIGS[c], args, logs / f"server-{c}.log") for c in args.configs}
    rows: dict[str, dict[int, dict]] = {c: {} for c in args.configs}
    errors: dict[str, str] = {}
    meta = run_meta(args, model)
    print(f"CPU: {meta['cpu']}; kernel path {meta['kernel_path']}; logs in {logs}", flush=True)
    try:
        with lock.hold(exclusive=False):  # starting servers is heavy work, not a timing run
            for s in servers.values():
                s.start()
            for s in servers.values():
                t = time.time()
                s.wait_healthy(args.startup_timeout)
                warm_up(s, model, min(max(args.streams), 8), 48)
                print(f"server {s.name}: healthy and warmed up on port {s.port} ({time.time() - t:.0f} s)", flush=True)
        runs = [(streams, requests, c) for i, (streams, requests) in enumerate(zip(args.streams, args.requests))
                for c in args.configs[i % len(args.configs):] + args.configs[:i % len(args.configs)]]
        for streams, requests, c in runs:
            t = time.time()
            try:
                with lock.hold(exclusive=True):
                    r = run_guidellm(args, exe, servers[c], model, streams, requests, logs)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                errors[f"{c}@{streams}"] = str(e).splitlines()[0][:200]
                print(f"{c} @ {streams} streams: FAILED: {e}", file=sys.stderr, flush=True)
                continue
            except (KeyboardInterrupt, SystemExit):  # keep and report what was measured
                errors[f"{c}@{streams}"] = "interrupted"
                print("interrupted: reporting the runs done so far", file=sys.stderr, flush=True)
                break
            rows[c][streams] = r
            # written after every run, so that a crash leaves something for --render
            (logs / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors}, indent=1))
            print(f"{c:8s} @ {streams:2d} streams: {r['output_tok_s']:7.1f} out tok/s, TTFT med "
                  f"{_f(r['ttft_ms_median'], '{:.0f}')} ms, ITL med {_f(r['itl_ms_median'])} ms, "
                  f"{r['successful']} ok / {r['errored'] + r['incomplete']} not "
                  f"({time.time() - t:.0f} s)", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    meta["wall_s"] = time.time() - t_start
    return {"meta": meta, "rows": rows, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_plot"]:
        plot(json.loads(Path(argv[1]).read_text()), Path(argv[2]))
        return 0
    args = parse_args(argv)
    args.argv = list(argv)
    args.client_cpu_list = None if args.client_cpus == "all" else parse_cpus(args.client_cpus)
    if args.logs is None:
        args.logs = f"/tmp/bench_serve-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    if args.render:
        summary = json.loads(Path(args.render).read_text())
    elif args.from_logs:
        model = ensure_model(args.model)
        summary = {"meta": run_meta(args, model), "rows": rows_from_logs(Path(args.from_logs)), "errors": {}}
    else:
        summary = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print("\n" + render(summary))
    if not args.no_write:
        write_outputs(summary, args)
        print(f"\nwrote the '{SECTION}' section of {ROOT / 'benchmarks' / 'RESULTS.md'} and {PLOT}")
    print(f"total {summary['meta'].get('wall_s', 0) / 60:.1f} min; logs in {args.logs}")
    failed = [k for k in summary.get("errors", {})]
    return 1 if failed else 0


if __name__ == "__main__":
    # SIGTERM (e.g. timeout) -> KeyboardInterrupt-like exit, so the finally blocks stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
