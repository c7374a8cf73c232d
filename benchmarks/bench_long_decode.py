"""End to end, long context: batch-1 decode tokens/s with an FP8 KV cache vs bf16 ("auto"), with
and without FP8 weights, and vLLM's KV block count for each at the same cache memory.

    .venv/bin/python benchmarks/bench_long_decode.py        # timing: run alone, pinned, e.g.
    flock /tmp/fp8_bench.lock taskset -c 0 .venv/bin/python benchmarks/bench_long_decode.py

Each configuration runs in a fresh single-process engine (benchmarks/long_decode_worker.py):
a LONG_PROMPT-token prompt (default 4096), LONG_NEW new tokens (default 256), greedy, enforce_eager,
prefix caching off, 1 OpenMP thread; every engine step timed (LLMEngine.step): decode tok/s =
1 / median decode step (robust to bursts of load on a shared machine; the mean rate is shown
beside it), the lowest median of LONG_REPEATS (default 2) requests. Rows: kv_cache_dtype auto /
fp8 (this plugin's kernels) / fp8 on vLLM's own CPU_ATTN kernels (FP8_BACKEND_ATTENTION=vllm; only
on CPUs where vLLM can read an FP8 cache),
each with bf16 and FP8 (quantization="fp8") weights. Rewrites the "long_decode" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from results_md import machine, update_section

ROOT = Path(__file__).resolve().parent.parent

MODEL = os.environ.get("LONG_MODEL", str(ROOT / "models" / "SmolLM2-135M-Instruct"))
PROMPT = int(os.environ.get("LONG_PROMPT", "4096"))
NEW = int(os.environ.get("LONG_NEW", "256"))
REPEATS = int(os.environ.get("LONG_REPEATS", "2"))
KV_MIB = int(os.environ.get("LONG_KV_MIB", "256"))
# (label, kv_cache_dtype, FP8_BACKEND_ATTENTION). The vLLM row runs only where vLLM's CPU_ATTN can
# read an FP8 cache (AVX-512); elsewhere fp8-backend's kernels are the only FP8 cache there is.
KV_ROWS = [("bf16 (auto)", "auto", "auto"), ("fp8, fp8-backend kernels", "fp8", "all"),
           ("fp8, vLLM CPU_ATTN kernels", "fp8", "vllm")]
WEIGHTS = [("bf16", None), ("fp8", "fp8")]


def run(kv: str, attn: str, quant: str | None) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               FP8_BACKEND_ATTENTION=attn, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "long_decode_worker.py"), "--model", MODEL,
           "--kv-cache-dtype", kv, "--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW),
           "--repeats", str(REPEATS), "--kv-cache-mib", str(KV_MIB)] + (["--quantization", quant] if quant else [])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed (rc={p.returncode}): {(p.stdout + p.stderr)[-3000:]}")


def main() -> None:
    if not (Path(MODEL) / "config.json").is_file():
        sys.exit(f"{MODEL} not found (scripts/get_smollm2.py converts it)")
    from fp8_backend.vllm_adapter.attention_backend import vllm_reads_fp8_cache

    head_size = json.loads((Path(MODEL) / "config.json").read_text())
    head_size = head_size.get("head_dim") or head_size["hidden_size"] // head_size["num_attention_heads"]
    rows = KV_ROWS if vllm_reads_fp8_cache(head_size) else KV_ROWS[:2]
    res: dict[tuple[str, str], dict] = {}
    for wl, quant in WEIGHTS:
        for label, kv, attn in rows:
            r = run(kv, attn, quant)
            res[(wl, label)] = r
            print(f"weights {wl}, KV {label}: {r['median_tok_s']:.2f} tok/s (median step; mean {r['decode_tok_s']:.2f}), "
                  f"prefill {r['prefill_s']:.2f} s, "
                  f"{r['num_kv_blocks']} KV blocks of {r['block_size']}", flush=True)
    load = os.getloadavg()
    lines = [
        f"## End to end, long context: {Path(MODEL).name}, FP8 vs bf16 KV cache",
        "",
        f"Regenerate: `flock /tmp/fp8_bench.lock taskset -c 0 .venv/bin/python benchmarks/bench_long_decode.py`. "
        f"Machine: {machine()}. Load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        f"Batch 1, {PROMPT}-token prompt, {NEW} new tokens (greedy, ignore_eos), enforce_eager, prefix caching "
        f"off, single-process engine, 1 OpenMP thread; every engine step timed: decode tok/s = 1 / median decode step "
        f"(mean rate in brackets), lowest median of {REPEATS} requests; prefill = the first step. KV cache: "
        f"kv_cache_memory_bytes = {KV_MIB} MiB for every row.",
        "",
        "| weights | KV cache | decode tok/s (mean) | vs bf16 KV, same weights | prefill s | KV blocks (block size) | tokens the cache holds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for wl, _ in WEIGHTS:
        base = res[(wl, KV_ROWS[0][0])]["median_tok_s"]
        for label, _, _ in rows:
            r = res[(wl, label)]
            lines.append(f"| {wl} | {label} | {r['median_tok_s']:.2f} ({r['decode_tok_s']:.2f}) | "
                         f"{r['median_tok_s'] / base:.2f}x | "
                         f"{r['prefill_s']:.2f} | {r['num_kv_blocks']} ({r['block_size']}) | "
                         f"{r['num_kv_blocks'] * r['block_size']} |")
    b16 = res[(WEIGHTS[0][0], KV_ROWS[0][0])]
    f8 = res[(WEIGHTS[0][0], KV_ROWS[1][0])]
    lines += ["", f"Capacity at the same {KV_MIB} MiB: FP8 {f8['num_kv_blocks']} blocks vs bf16 {b16['num_kv_blocks']} "
              f"= {f8['num_kv_blocks'] / b16['num_kv_blocks']:.2f}x (target 2x). Date: {datetime.date.today().isoformat()}."]
    text = "\n".join(lines)
    print("\n" + text)
    update_section("long_decode", text)


if __name__ == "__main__":
    main()
