"""Activation quantization to FP8 e4m3fn in Triton (numerics.quantize_per_tensor / _per_token /
quantize_group semantics).

Outputs are float8_e4m3fn tensors (written as uint8 bit patterns by fp8_math.e4m3_encode) and
fp32 inverse scales (x ≈ q * scale). Divisions use div_rn (IEEE round-to-nearest) so that
x / scale is bit-identical to torch's fp32 division, as the spec requires. NaN in a row (or
tensor) makes its amax, hence its scale and outputs, NaN, like torch.amax in numerics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ... import numerics
from .fp8_math import e4m3_encode

SCALE_FLOOR = numerics.scale_floor(numerics.E4M3)


@triton.jit
def _block_amax(x):
    """max |x| of a block; NaN if the block holds a NaN (tl.max alone would drop it)."""
    amax = tl.max(tl.abs(x), axis=0)
    has_nan = tl.max((x != x).to(tl.int32), axis=0)
    return tl.where(has_nan > 0, float("nan"), amax)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scale_of(amax, scale_floor):
    """scale = max(amax / 448, floor); NaN stays NaN (as torch.clamp)."""
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    return tl.where(s != s, s, tl.maximum(s, scale_floor))


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, scale_ub, scale_floor,
                      HAS_UB: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: pass 1 amax over the row, pass 2 quantize with its scale."""
    row = tl.program_id(0)
    amax = tl.zeros((), tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = _nan_max(amax, _block_amax(x))
    if HAS_UB:
        amax = tl.minimum(amax, scale_ub, propagate_nan=tl.PropagateNan.ALL)
    scale = _scale_of(amax, scale_floor)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + offs, e4m3_encode(tl.math.div_rn(x, scale + tl.zeros_like(x))),
                 mask=offs < K)


@triton.jit
def _group_kernel(x_ptr, q_ptr, scale_ptr, K, n_groups, stride_x, stride_q, scale_floor,
                  GROUP: tl.constexpr):
    """One program per (row, group of GROUP columns); the last group may be partial."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
    scale = _scale_of(_block_amax(x), scale_floor)
    tl.store(scale_ptr + row * n_groups + g, scale)
    tl.store(q_ptr + row * stride_q + offs, e4m3_encode(tl.math.div_rn(x, scale + tl.zeros_like(x))),
             mask=offs < K)


@triton.jit
def _partial_amax_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    """Pass 1 of dynamic per-tensor: amax of each BLOCK-sized chunk of the flat tensor."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, _block_amax(x))


@triton.jit
def _per_tensor_kernel(x_ptr, q_ptr, scale_ptr, partial_ptr, n, n_partial, scale_floor,
                       DYNAMIC: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    """Pass 2: each program reduces the partial amaxes (dynamic) or reads the static scale,
    then quantizes its chunk; program 0 writes the dynamic scale."""
    pid = tl.program_id(0)
    if DYNAMIC:
        amax = tl.zeros((), tl.float32)
        for p0 in range(0, n_partial, PBLOCK):
            po = p0 + tl.arange(0, PBLOCK)
            amax = _nan_max(amax, _block_amax(tl.load(partial_ptr + po, mask=po < n_partial, other=0.0)))
        scale = _scale_of(amax, scale_floor)
        if pid == 0:
            tl.store(scale_ptr, scale)
    else:
        scale = tl.load(scale_ptr)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(q_ptr + offs, e4m3_encode(tl.math.div_rn(x, scale + tl.zeros_like(x))), mask=offs < n)


def _check_input(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: expected fp32/fp16/bf16 activations, found {x.dtype}")
    return x.contiguous()


def quantize_per_token(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row quantization of x [..., K]; scale [..., 1] fp32."""
    x = _check_input(x, "quantize_per_token: x")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(1024, triton.next_power_of_2(max(k, 16)))
        _per_token_kernel[(m,)](x2, q, scale, k, x2.stride(0), q.stride(0),
                                float(scale_ub) if scale_ub is not None else 0.0, SCALE_FLOOR,
                                HAS_UB=scale_ub is not None, BLOCK=block)
    return q.view(numerics.E4M3).reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_group(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1 x group_size groups along K (power of two); scale [..., ceil(K/group_size)]."""
    x = _check_input(x, "quantize_group: x")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"quantize_group: expected a power-of-two group_size >= 16, found {group_size}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m, ng = x2.shape[0], math.ceil(k / group_size)
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, ng), dtype=torch.float32, device=x.device)
    if m and ng:
        _group_kernel[(m, ng)](x2, q, scale, k, ng, x2.stride(0), q.stride(0), SCALE_FLOOR, GROUP=group_size)
    return q.view(numerics.E4M3).reshape(x.shape), scale.reshape(*x.shape[:-1], ng)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | None = None,
                        block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization: static with ``scale`` (1 element), else dynamic (two passes:
    chunk amaxes, then reduce + quantize). Returns (q, 0-d fp32 scale)."""
    x = _check_input(x, "quantize_per_tensor: x")
    n = x.numel()
    flat = x.reshape(-1)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    grid = (max(1, triton.cdiv(n, block)),)
    if scale is not None:
        if scale.numel() != 1:
            raise ValueError(f"quantize_per_tensor: expected a 1-element static scale, found shape {tuple(scale.shape)}")
        numerics.check_scale(scale, "quantize_per_tensor: scale")
        s = scale.to(device=x.device, dtype=torch.float32).reshape(1).contiguous()
        _per_tensor_kernel[grid](flat, q, s, s, n, 0, SCALE_FLOOR, DYNAMIC=False, BLOCK=block, PBLOCK=16)
    else:
        partial = torch.empty(grid[0], dtype=torch.float32, device=x.device)
        s = torch.empty(1, dtype=torch.float32, device=x.device)
        _partial_amax_kernel[grid](flat, partial, n, BLOCK=block)
        _per_tensor_kernel[grid](flat, q, s, partial, n, grid[0], SCALE_FLOOR, DYNAMIC=True, BLOCK=block,
                                 PBLOCK=min(1024, triton.next_power_of_2(grid[0])))
    return q.view(numerics.E4M3).reshape(x.shape), s.reshape(())
