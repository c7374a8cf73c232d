"""GPU linear kernels vs bf16 GEMM (needs a CUDA GPU; skipped without one).

    python benchmarks/bench_gpu.py          # or: python -m pytest benchmarks/bench_gpu.py -q

Times, in one run, at M in {1, 16, 128, 1024} and (N, K) in {(4096, 4096), (14336, 4096),
(4096, 14336)} with bf16 activations:
  * bf16        torch F.linear with bf16 weights (cuBLAS)
  * w8a8        fp8_backend triton_w8a8_linear: per-token activation quant + FP8 GEMM (sm_89+ only)
  * w8a8_block  the same with 1x128 activation groups and 128x128 weight blocks (sm_89+ only)
  * w8a16       fp8_backend triton_w8a16_linear: Marlin-style, weights repacked (any sm_80+)
  * w8a16_deq   dequantize-then-GEMM baseline (FP8 -> bf16 weight each call, then F.linear)
with CUDA events (median of repeats after warm-up) and rewrites the "gpu_linear" section of
benchmarks/RESULTS.md (via results_md.update_section). Each kernel's output is checked against
the bf16 reference before timing (relative Frobenius error printed), so a fast wrong kernel
cannot go unnoticed.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
MS = [1, 16, 128, 1024]
IMPLS = ["bf16", "w8a8", "w8a8_block", "w8a16", "w8a16_deq"]


def time_cuda(fn, repeats: int = 50) -> float:
    """Median milliseconds of fn() over CUDA events, after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run() -> dict:
    from fp8_backend import numerics as nm
    from fp8_backend.kernels import gpu_ops  # noqa: F401
    from fp8_backend.kernels.triton.w8a16_repack import repack

    cap = torch.cuda.get_device_capability()
    fp8_mma = cap >= (8, 9)
    res: dict[tuple, tuple[float, float]] = {}
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        wq, ws = nm.quantize_per_channel(w)
        wqb, wsb = nm.quantize_block(w)
        packed = repack(wq, ws.reshape(-1))
        wb = w.bfloat16()
        for m in MS:
            x = torch.randn(m, k, device="cuda").bfloat16()
            fns = {
                "bf16": lambda: F.linear(x, wb),
                "w8a16": lambda: torch.ops.fp8_backend.triton_w8a16_linear(
                    x, packed.tiles, packed.scales, None, packed.n, packed.k, packed.group_size),
                "w8a16_deq": lambda: F.linear(x, (wq.to(torch.bfloat16) * ws.to(torch.bfloat16))),
            }
            if fp8_mma:
                fns["w8a8"] = lambda: torch.ops.fp8_backend.triton_w8a8_linear(
                    x, wq, ws.reshape(-1), None, None, None)
                fns["w8a8_block"] = lambda: torch.ops.fp8_backend.triton_w8a8_linear(
                    x, wqb, wsb, None, None, [128, 128])
            ref = fns["bf16"]().float()
            for name, fn in fns.items():
                err = float((fn().float() - ref).norm() / ref.norm())
                res[(n, k, m, name)] = (time_cuda(fn), err)
                print(f"N={n} K={k} M={m} {name}: {res[(n, k, m, name)][0]:.4f} ms, rel err {err:.2e}", flush=True)
    return res


def write(res: dict) -> None:
    from results_md import update_section

    dev = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    lines = [
        "## GPU linear kernels (Triton) vs bf16 GEMM",
        "",
        f"`python benchmarks/bench_gpu.py` on {dev} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}. "
        "Median ms per call (CUDA events); relative error vs the bf16 GEMM in parentheses; "
        "'-' = not available on this GPU (W8A8 needs sm_89+).",
        "",
        "| N | K | M | " + " | ".join(IMPLS) + " |",
        "|---|---|---|" + "---|" * len(IMPLS),
    ]
    for n, k in SHAPES:
        for m in MS:
            cells = [f"{res[(n, k, m, i)][0]:.4f} ({res[(n, k, m, i)][1]:.1e})" if (n, k, m, i) in res else "-"
                     for i in IMPLS]
            lines.append(f"| {n} | {k} | {m} | " + " | ".join(cells) + " |")
    update_section("gpu_linear", "\n".join(lines))


def test_bench_gpu():
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: GPU kernels are compiled and interpreted in tests, not measured")
    write(run())


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU, nothing measured (RESULTS.md unchanged)")
        sys.exit(0)
    write(run())
