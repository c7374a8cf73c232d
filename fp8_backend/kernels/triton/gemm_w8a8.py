"""W8A8 FP8 GEMM for sm_89 / sm_90 (FP8 tensor cores): y = (A_q * sa) @ (B_q * sb)^T + bias.

A is e4m3 [M, K] (activations quantized by quant.py), B is e4m3 [N, K] (the checkpoint's weight,
no repacking). Scales:
- "tensor_or_channel": sa has 1 or M elements, sb 1 or N; they factor out of the dot product and
  are applied once to the fp32 accumulator (per-tensor x per-tensor, per-token x per-channel).
- "block": sa [M, ceil(K/g)] (1 x g activation groups), sb [ceil(N/bn), ceil(K/g)] (bn x g weight
  blocks, partial last blocks included); applied per K tile, whose size divides g.
fp32 accumulation; output bf16, fp16 or fp32. Not for sm_80 (no FP8 MMA): the adapter's
linear_paths.py sends Ampere to the W8A16 kernel instead.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fp8_math import store_out, tile_m


@triton.jit
def w8a8_gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, sa_ptr, sb_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm, stride_sa_m, stride_sa_k, stride_sb_n, stride_sb_k,
                     HAS_BIAS: tl.constexpr, BLOCK_SCALES: tl.constexpr, GROUP_K: tl.constexpr,
                     GROUP_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + (k0 + rk)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0)
        # uint8 bit patterns -> e4m3 operands of the FP8 tensor-core MMA (no value conversion)
        part = tl.dot(a.to(tl.float8e4nv, bitcast=True), b.to(tl.float8e4nv, bitcast=True))
        if BLOCK_SCALES:
            g = k0 // GROUP_K
            sa = tl.load(sa_ptr + rm * stride_sa_m + g * stride_sa_k, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptr + (rn // GROUP_N) * stride_sb_n + g * stride_sb_k, mask=n_ok, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        else:
            acc += part
    if not BLOCK_SCALES:
        sa = tl.load(sa_ptr + rm * stride_sa_m, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + rn * stride_sb_n, mask=n_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    store_out(acc, c_ptr, bias_ptr, rm, rn, m_ok, n_ok, stride_cm, HAS_BIAS)


def w8a8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """C [M, N] = dequant(a, sa) @ dequant(b, sb)^T + bias (see module docstring for scales).

    ``block_size`` = (bn, g) selects block scales; otherwise sa has 1 or M elements, sb 1 or N.
    """
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise ValueError(f"w8a8_gemm: expected float8_e4m3fn a and b, found {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"w8a8_gemm: expected a [M, K] and b [N, K], found {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    a, b = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    sa, sb = sa.float().contiguous(), sb.float().contiguous()
    if block_size is not None:
        bn, g = block_size
        bk = min(g, 128)
        if g % bk or bk < 16 or bk & (bk - 1):
            raise ValueError(f"w8a8_gemm: block K size {g} cannot be tiled (power of two >= 16 needed)")
        want_a, want_b = (m, math.ceil(k / g)), (math.ceil(n / bn), math.ceil(k / g))
        if tuple(sa.shape) != want_a or tuple(sb.shape) != want_b:
            raise ValueError(f"w8a8_gemm: block scales: expected sa {want_a} and sb {want_b}, "
                             f"found {tuple(sa.shape)} and {tuple(sb.shape)}")
        strides = (sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1))
        group_k, group_n = g, bn
    else:
        bk, group_k, group_n = 64, 1, 1
        if sa.numel() not in (1, m) or sb.numel() not in (1, n):
            raise ValueError(f"w8a8_gemm: expected sa with 1 or M={m} and sb with 1 or N={n} elements, "
                             f"found {sa.numel()} and {sb.numel()}")
        strides = (0 if sa.numel() == 1 else 1, 0, 0 if sb.numel() == 1 else 1, 0)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    bm, bnt = tile_m(m), 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bnt))
    if m and n:
        w8a8_gemm_kernel[grid](a, b, c, bias if bias is not None else c, sa, sb, m, n, k,
                               a.stride(0), b.stride(0), c.stride(0), *strides,
                               HAS_BIAS=bias is not None, BLOCK_SCALES=block_size is not None,
                               GROUP_K=group_k, GROUP_N=group_n, BM=bm, BN=bnt, BK=bk)
    return c
