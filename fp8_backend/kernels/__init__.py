"""The kernel op surface: one thin Python function per torch op (as vLLM's ``_custom_ops.py``).

Ops live in the compiled extension ``fp8_backend._C`` (csrc/cpu) and are registered as
``torch.ops.fp8_backend.*`` with fake implementations here, so they trace under torch.compile.

One CPU code path serves every op (linear, mixture of experts, attention): the registry of
csrc/cpu/isa.h. It is chosen by CPUID; ``FP8_BACKEND_CPU_ISA=auto|amx|avx512_vbmi|avx512|avx2|portable``
(read by the registry on first use, that is when this module is imported) or :func:`set_cpu_isa`
forces one; a path the CPU lacks is an error naming the missing features, not a silent fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .. import _C  # noqa: F401  (registers torch.ops.fp8_backend)
from .huge_pages import to_huge_pages

#: Every CPU code path, most capable first (the names of csrc/cpu/isa.h).
ISAS = tuple(_C.cpu_isas())


@torch.library.register_fake("fp8_backend::w8a16_linear")
def _w8a16_linear_fake(x, w, scale, bias, block_size=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def cpu_isa() -> str:
    """The CPU code path every op runs now."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Select the CPU code path of every op (``auto`` = best this CPU supports) and return it;
    raises, naming the path and the missing CPU features, if this CPU cannot run it."""
    return _C.set_cpu_isa(name)


def supported_cpu_isas() -> list[str]:
    """The paths this CPU can run, most capable first (the last is always ``portable``)."""
    return [name for name in ISAS if _C.cpu_isa_supported(name)]


@contextlib.contextmanager
def using_cpu_isa(name: str) -> Iterator[str]:
    """Run a block on one CPU code path, restoring the previous one after (tests, benchmarks)."""
    before = cpu_isa()
    try:
        yield set_cpu_isa(name)
    finally:
        set_cpu_isa(before)


def w8a16_prepack(w: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """An FP8 weight [N, K] in the layout the kernels read: contiguous float8_e4m3fn rows, on CPU
    in transparent huge pages (huge_pages.py). Values are the loader's to check (formats'
    check_fp8_weight refuses NaN encodings as each checkpoint tensor arrives)."""
    if w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: expected float8_e4m3fn, found {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] weight, found shape {tuple(w.shape)}")
    return to_huge_pages(w) if w.device.type == "cpu" else w.contiguous()


def w8a16_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: list[int] | None = None,
) -> torch.Tensor:
    """y = x @ dequant(w, scale)^T + bias with x bf16/fp16 [..., K], w float8_e4m3fn [N, K] and
    fp32 scales: 1 or N elements, or with ``block_size`` [bn, bk] a [ceil(N/bn), ceil(K/bk)]
    grid (partial last blocks included). fp32 accumulation, output in x.dtype
    (numerics.w8a16_linear)."""
    return torch.ops.fp8_backend.w8a16_linear(x, w, scale, bias, block_size)


cpu_isa()  # the registry reads FP8_BACKEND_CPU_ISA now: a bad value fails the import, naming it


@torch.library.register_fake("fp8_backend::fused_moe_w8a16")
def _fused_moe_w8a16_fake(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block_size=None):
    return x.new_empty((x.shape[0], w2.shape[1]))


def fused_moe_w8a16(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                    w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    block_size: list[int] | None = None) -> torch.Tensor:
    """W8A16 mixture of experts with SiLU-and-mul experts (numerics.fused_moe_w8a16): x [T, H]
    bf16/fp16, w13 [E, 2I, H] (gate rows, then up) and w2 [E, H, I] float8_e4m3fn, fp32 scales
    per channel or per ``block_size`` [bn, bk] block (numerics.moe_scale_shapes), topk_weights /
    topk_ids [T, k]. Tokens grouped per expert, FP8 decoded in registers / once per panel, the
    top-k weighting and reduction in fp32, one final rounding to x.dtype. The CPU kernel path is
    the one linear layers use (cpu_isa())."""
    return torch.ops.fp8_backend.fused_moe_w8a16(
        x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
        list(block_size) if block_size is not None else None,
    )
