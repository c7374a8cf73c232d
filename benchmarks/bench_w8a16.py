"""W8A16 GEMM on CPU: fp8-backend's kernel vs the 16-bit GEMMs a vLLM user would otherwise get.

    .venv/bin/python -m pytest benchmarks/bench_w8a16.py --benchmark-only -q

Rewrites the "w8a16" section of benchmarks/RESULTS.md (AVX-512 CPUs) or "w8a16_avx2" (CPUs
without AVX-512). Environment (partial runs, which write JSON instead of RESULTS.md):
BENCH_W8A16_SHAPES="4096x4096,...", BENCH_W8A16_MS="1,4", BENCH_W8A16_IMPLS="fp8_backend,F.linear",
BENCH_W8A16_SECONDS (time per measurement, default 1), BENCH_W8A16_JSON=path (results as JSON);
an M list alone still writes RESULTS.md. Compared, in one run, at the threads
vLLM would use (torch.get_num_threads()):
  * fp8_backend   torch.ops.fp8_backend.w8a16_linear, FP8 weights, bf16 activations (the kernel
                  path is FP8_BACKEND_CPU_ISA's, default the best this CPU has)
  * F.linear      torch bf16 F.linear (what a plain torch model runs)
  * vllm_onednn   the bf16 GEMM vLLM's CPU build really uses for unquantized layers: weights
                  prepacked once by ops.create_onednn_mm, run by ops.onednn_mm
                  (vllm/model_executor/layers/utils.py dispatch_cpu_unquantized_gemm). On CPUs
                  without AVX512-BF16 create_onednn_mm fails and vLLM falls back to F.linear in
                  bf16: there F.linear IS vLLM's baseline (the "vLLM bf16" column says which)
  * vllm_fp8      vLLM's own CPU FP8 W8A16 op _C.fp8_scaled_mm_cpu (128x128 block scales), where
                  this CPU's vLLM build has it (it only ships in the AVX512-BF16 build)
Each timed call uses the next weight of a pool larger than 2x the last-level cache, so weights
come from memory as in a real forward pass. fp8_backend's weights go through w8a16_prepack as
in the plugin (on CPU: transparent huge pages, fp8_backend/kernels/huge_pages.py); the others
are allocated as torch / vLLM allocate them. The machine's streaming read bandwidth is measured
in the same run (fp8_backend._C.stream_read: every byte of a 1 GiB buffer, same threads), from
ordinary 4 KiB pages and from huge pages; the higher of the two is the reference.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from fp8_backend import _C, kernels, numerics

from results_md import machine, update_section

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
MS = [1, 4, 16, 64, 512]
IMPLS = ["fp8_backend", "F.linear", "vllm_onednn", "vllm_fp8"]
_env = {k: os.environ.get(f"BENCH_W8A16_{k}", "").strip() for k in ("SHAPES", "MS", "IMPLS", "SECONDS", "JSON")}
PARTIAL = any(_env[k] for k in ("SHAPES", "IMPLS"))
if _env["SHAPES"]:
    SHAPES = [tuple(int(v) for v in s.split("x")) for s in _env["SHAPES"].split(",")]
if _env["MS"]:
    MS = [int(v) for v in _env["MS"].split(",")]
if _env["IMPLS"]:
    IMPLS = _env["IMPLS"].split(",")
POOL_BYTES = 1 << 30  # per implementation: > 2x the largest L3 measured on (480 MiB)
TARGET_SECONDS = float(_env["SECONDS"] or 1.0)  # per measurement
AVX512 = _C.cpu_isa_supported("avx512")
SECTION = "w8a16" if AVX512 else "w8a16_avx2"

RESULTS: dict[tuple, float] = {}  # (N, K, M, impl) -> median seconds
BANDWIDTH: list[float] = []  # GB/s, measured at start and end
UNAVAILABLE: dict[str, str] = {}
_pools: dict[tuple, list] = {}


def _vllm_ops():
    from vllm import _custom_ops as ops  # loads vLLM's CPU kernel library for this CPU

    return ops


def pool(n: int, k: int, impl: str) -> list:
    """Weights for one implementation, enough of them to overflow the caches."""
    key = (n, k, impl)
    if key not in _pools:
        for other in [p for p in _pools if p[:2] != (n, k)]:
            del _pools[other]  # one shape at a time keeps memory modest
        bytes_per = n * k * (1 if impl in ("fp8_backend", "vllm_fp8") else 2)
        count = max(2, -(-POOL_BYTES // bytes_per))
        gen = torch.Generator().manual_seed(n + k)
        ws = []
        for _ in range(count):
            w = torch.randn(n, k, generator=gen) * 0.02
            if impl == "fp8_backend":
                q, s = numerics.quantize_per_tensor(w)
                ws.append((kernels.w8a16_prepack(q), s.reshape(1)))
            elif impl == "vllm_fp8":
                q, s = numerics.quantize_block(w)
                ws.append((q, s))
            elif impl == "F.linear":
                ws.append(w.to(torch.bfloat16))
            else:
                try:
                    ws.append(_vllm_ops().create_onednn_mm(w.to(torch.bfloat16).t(), 32))
                except RuntimeError as e:
                    UNAVAILABLE[impl] = (
                        f"create_onednn_mm fails on this CPU ({str(e).splitlines()[0][:80]}); vLLM's "
                        "dispatch_cpu_unquantized_gemm then runs torch F.linear in bf16, so the F.linear "
                        "column is vLLM's bf16 baseline here"
                    )
                    ws = []
                    break
        _pools[key] = ws
    return _pools[key]


def runner(n: int, k: int, m: int, impl: str):
    ws = pool(n, k, impl)
    if not ws:
        return None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(ws)
        return ws[state["i"]]

    if impl == "fp8_backend":
        return lambda: kernels.w8a16_linear(x, *nxt())
    if impl == "F.linear":
        return lambda: F.linear(x, nxt())
    if impl == "vllm_fp8" and not AVX512:
        UNAVAILABLE[impl] = "not in this CPU's vLLM build (it needs AVX512-BF16)"
        return None
    ops = _vllm_ops()
    if impl == "vllm_onednn":
        if "vllm_onednn" in UNAVAILABLE:
            return None
        return lambda: ops.onednn_mm(nxt(), x, None)
    if not hasattr(torch.ops._C, "fp8_scaled_mm_cpu"):
        UNAVAILABLE[impl] = (
            "not in this CPU's vLLM build: vLLM loads vllm._C_AVX512 on AVX-512 CPUs without "
            "AVX512-BF16, and fp8_scaled_mm_cpu exists only in the AVX512-BF16 build (vllm._C)"
        )
        return None

    def run():
        q, s = nxt()
        return torch.ops._C.fp8_scaled_mm_cpu(x, q, s, [128, 128], None, torch.bfloat16, False)

    return run


BANDWIDTH_4K: list[float] = []  # GB/s from ordinary pages, for the record


def _stream_gbs(buf: torch.Tensor, rounds: int = 7) -> float:
    _C.stream_read(buf)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        _C.stream_read(buf)
        times.append(time.perf_counter() - t)
    return buf.numel() / statistics.median(times) / 1e9


def measure_bandwidth(benchmark) -> float:
    plain = torch.empty(1 << 30, dtype=torch.uint8).fill_(1)
    BANDWIDTH_4K.append(_stream_gbs(plain))
    del plain
    buf = _C.huge_page_empty(1 << 30).fill_(1)
    benchmark.extra_info.update(bytes=buf.numel(), threads=torch.get_num_threads())
    benchmark.pedantic(_C.stream_read, args=(buf,), rounds=7, iterations=1, warmup_rounds=1)
    return max(buf.numel() / benchmark.stats.stats.median / 1e9, BANDWIDTH_4K[-1])


def test_read_bandwidth_start(benchmark):
    BANDWIDTH.append(measure_bandwidth(benchmark))


CASES = [(n, k, m, impl) for (n, k) in SHAPES for m in MS for impl in IMPLS]


@pytest.mark.parametrize("n,k,m,impl", CASES, ids=[f"N{n}-K{k}-M{m}-{i}" for n, k, m, i in CASES])
def test_gemm(benchmark, n, k, m, impl):
    fn = runner(n, k, m, impl)
    if fn is None:
        pytest.skip(UNAVAILABLE[impl])
    t = time.perf_counter()
    fn()  # warm-up (oneDNN builds its primitive on first use)
    est = time.perf_counter() - t
    rounds = int(min(200, max(3, TARGET_SECONDS / max(est, 1e-6))))
    benchmark.extra_info.update(n=n, k=k, m=m, impl=impl, threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    RESULTS[(n, k, m, impl)] = benchmark.stats.stats.median


def _baseline(r: dict) -> tuple[float | None, str]:
    """vLLM's bf16 linear on this CPU: oneDNN where it runs, else torch F.linear in bf16."""
    if r.get("vllm_onednn"):
        return r["vllm_onednn"], "oneDNN"
    return r.get("F.linear"), "F.linear"


def test_read_bandwidth_end_and_write_results(benchmark):
    BANDWIDTH.append(measure_bandwidth(benchmark))
    bw = statistics.mean(BANDWIDTH)
    isa = kernels.cpu_isa()
    if _env["JSON"]:
        with open(_env["JSON"], "w") as f:
            json.dump({"isa": isa, "threads": torch.get_num_threads(), "bandwidth": BANDWIDTH,
                       "bandwidth_4k": BANDWIDTH_4K, "unavailable": UNAVAILABLE,
                       "results": [[*key, v] for key, v in RESULTS.items()]}, f, indent=1)
    if PARTIAL:
        assert RESULTS, "no measurements"
        return
    lines = [
        "## W8A16 GEMM (CPU)" + ("" if AVX512 else ": CPUs without AVX-512 (avx2 path)"),
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python -m pytest benchmarks/bench_w8a16.py --benchmark-only -q` "
        f"(fp8_backend kernel path: {isa}).",
        f"Streaming read bandwidth, same run and threads (the higher of huge and 4 KiB pages; 4 KiB "
        f"pages alone: {', '.join(f'{v:.1f}' for v in BANDWIDTH_4K)}): {BANDWIDTH[0]:.1f} GB/s at start, "
        f"{BANDWIDTH[-1]:.1f} GB/s at end (mean {bw:.1f}).",
        "Median ms per call; weights rotate through a pool of > 1 GiB per implementation; "
        "fp8_backend's weights in transparent huge pages, as the plugin stores them; per-tensor FP8 "
        "weights. `kernel`: the fp8_backend kernel w8a16_plan picks. `vLLM bf16`: what vLLM runs for "
        "an unquantized layer on this CPU (oneDNN where create_onednn_mm works, else torch F.linear "
        "in bf16).",
        "",
        "| N x K | M | kernel | fp8_backend ms | F.linear bf16 ms | vLLM oneDNN bf16 ms | vLLM fp8_scaled_mm_cpu ms | fp8 vs vLLM bf16 | fp8 vs F.linear | fp8 vs vLLM fp8 | fp8 weight GB/s | % of read bw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for n, k in SHAPES:
        for m in MS:
            r = {i: RESULTS.get((n, k, m, i)) for i in IMPLS}
            if r.get("fp8_backend") is None:
                continue
            f8 = r["fp8_backend"]
            base, base_name = _baseline(r)

            def ms(v):
                return f"{v * 1e3:.3f}" if v else "n/a"

            def ratio(v):
                return f"{v / f8:.2f}x" if v else "n/a"

            gbs = n * k / f8 / 1e9
            kern = _C.w8a16_plan(isa, m, n, k, "bfloat16")
            lines.append(
                f"| {n} x {k} | {m} | {kern} | {ms(f8)} | {ms(r.get('F.linear'))} | {ms(r.get('vllm_onednn'))} | "
                f"{ms(r.get('vllm_fp8'))} | {ratio(base)} ({base_name}) | {ratio(r.get('F.linear'))} | "
                f"{ratio(r.get('vllm_fp8'))} | {gbs:.1f} | {100 * gbs / bw:.0f}% |"
            )
            if base and m == 1:
                checks.append(
                    f"- {n}x{k}, M=1: {base / f8:.2f}x vLLM bf16 ({base_name}; target >= "
                    f"{'1' if AVX512 else '1.5'}x), {100 * gbs / bw:.0f}% of read bandwidth "
                    f"(target >= {'80' if AVX512 else '85'}%)"
                )
            elif base:
                checks.append(f"- {n}x{k}, M={m}: {base / f8:.2f}x vLLM bf16 ({base_name}; target >= 1x)")
    lines += ["", "Targets:", *checks, ""]
    for impl, why in UNAVAILABLE.items():
        lines.append(f"- `{impl}`: {why}.")
    update_section(SECTION, "\n".join(lines))
    assert RESULTS, "no measurements"
