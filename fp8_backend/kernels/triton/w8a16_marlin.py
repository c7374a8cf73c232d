"""Marlin-style W8A16 GEMM for sm_80 / sm_86 (no FP8 tensor cores): y = x @ dequant(W)^T + bias.

Weights come from w8a16_repack.repack: contiguous uint8 [TILE_K, TILE_N] tiles, read once as bytes,
decoded to fp16 in registers with integer bit operations (fp8_math.e4m3_to_f16_scaled, exact for all
e4m3 values, 2^-8 folded into the scales), converted to the activation dtype (exact: e4m3 * 2^-8
fits fp16 and bf16) and multiplied on the fp16/bf16 tensor cores with fp32 accumulation. Scales per
column (and per K group for block checkpoints) multiply the fp32 partial sums. Any M (1 to
thousands), K and N (activations and output masked; weights padded at repack time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_math import e4m3_to_f16_scaled, store_out, tile_m
from .w8a16_repack import TILE_K, TILE_N, PackedW8A16


@triton.jit
def w8a16_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, n_tiles_n, stride_xm, stride_ym, stride_s,
                 HAS_BIAS: tl.constexpr, GROUP_K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)  # < N_pad: scales are padded, no mask needed
    rk = tl.arange(0, BK)
    m_ok = rm < M
    tile = rk[:, None] * BN + tl.arange(0, BN)[None, :]  # offsets inside one contiguous tile
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BK)):
        k = kt * BK + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        wq = tl.load(w_ptr + (kt * n_tiles_n + pid_n) * (BK * BN) + tile)
        w = e4m3_to_f16_scaled(wq).to(x.dtype)
        part = tl.dot(x, w)
        if GROUP_K > 0:
            acc += part * tl.load(s_ptr + ((kt * BK) // GROUP_K) * stride_s + rn)[None, :]
        else:
            acc += part
    if GROUP_K == 0:
        acc = acc * tl.load(s_ptr + rn)[None, :]
    store_out(acc, y_ptr, bias_ptr, rm, rn, m_ok, rn < N, stride_ym, HAS_BIAS)


def w8a16_linear(x: torch.Tensor, p: PackedW8A16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] in x.dtype (fp16/bf16) = x [..., K] @ dequant(W)^T + bias (numerics.w8a16_linear)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w8a16_linear: expected fp16/bf16 x, found {x.dtype}")
    if x.shape[-1] != p.k:
        raise ValueError(f"w8a16_linear: x has K={x.shape[-1]}, weight has K={p.k}")
    x2 = x.reshape(-1, p.k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, p.n), dtype=x.dtype, device=x.device)
    if m and p.n:
        bm = tile_m(m)
        grid = (triton.cdiv(m, bm), p.tiles.shape[1])
        w8a16_kernel[grid](x2, p.tiles, p.scales, bias if bias is not None else y, y, m, p.n, p.k,
                           p.tiles.shape[1], x2.stride(0), y.stride(0), p.scales.stride(0),
                           HAS_BIAS=bias is not None, GROUP_K=p.group_size, BM=bm, BN=TILE_N, BK=TILE_K)
    return y.reshape(*x.shape[:-1], p.n)
