"""Load-time repacking of FP8 weights for the Marlin-style W8A16 kernel (plain torch, no Triton).

Layout: the [N, K] e4m3 weight is transposed and cut into [BK, BN] tiles stored contiguously,
tile (kt, nt) at ``tiles[kt, nt]`` (shape [K/BK, N/BN, BK, BN], zero-padded to whole tiles), so
each program of the kernel reads its weight tile per K step as one contiguous run of BK*BN bytes
(coalesced, no masks on weights). Weights stay bytes: read once, decoded in registers.

Scales are folded into ``scales`` [G, N_pad] fp32, one per output column and K group, times
2^8 (the kernel's bit-decode yields value * 2^-8, fp8_math.e4m3_to_f16_scaled):
- per-tensor (1 scale) and per-channel (N scales) -> G = 1;
- block scales [ceil(N/bn), ceil(K/bk)] -> G = ceil(K/bk) groups of ``group_size`` = bk along K,
  each column n taking the scale of its block row n // bn (any bn, partial blocks included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import numerics

TILE_K = 64
TILE_N = 64
DECODE_CORRECTION = 256.0  # 2^8, see module docstring


@dataclass
class PackedW8A16:
    tiles: torch.Tensor  # uint8 [K_pad/TILE_K, N_pad/TILE_N, TILE_K, TILE_N]
    scales: torch.Tensor  # fp32 [G, N_pad], 2^8 folded in
    n: int
    k: int
    group_size: int  # K extent of one scale group; 0 = one group (per-channel)


def fold_scales(scale: torch.Tensor, n: int, k: int, block_size: tuple[int, int] | None) -> tuple[torch.Tensor, int]:
    """Per-tensor / per-channel / block scales -> ([G, N] fp32 per-column-per-K-group, group_size)."""
    numerics.check_scale(scale, "weight_scale")
    s = scale.float()
    if block_size is not None:
        bn, bk = block_size
        want = (math.ceil(n / bn), math.ceil(k / bk))
        if tuple(s.shape) != want:
            raise ValueError(f"weight_scale: expected block scale shape {want} for a [{n}, {k}] weight "
                             f"with blocks {bn}x{bk}, found {tuple(s.shape)}")
        if bk % TILE_K:
            raise ValueError(f"weight_scale: block K size {bk} is not a multiple of the W8A16 tile K {TILE_K}")
        return s.repeat_interleave(bn, 0)[:n].T.contiguous(), bk
    if s.numel() == 1:
        return s.reshape(1, 1).expand(1, n).contiguous(), 0
    if s.numel() == n:
        return s.reshape(1, n).contiguous(), 0
    raise ValueError(f"weight_scale: expected 1 or N={n} scales (or block_size), found shape {tuple(s.shape)}")


def repack(w: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None = None) -> PackedW8A16:
    """FP8 weight [N, K] + its scales -> PackedW8A16 (see module docstring)."""
    if w.dtype != numerics.E4M3 or w.dim() != 2:
        raise ValueError(f"weight: expected a 2-D float8_e4m3fn [N, K] tensor, found {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    folded, group = fold_scales(scale, n, k, block_size)
    kp, np_ = math.ceil(k / TILE_K) * TILE_K, math.ceil(n / TILE_N) * TILE_N
    wt = torch.zeros((kp, np_), dtype=torch.uint8, device=w.device)
    wt[:k, :n] = w.view(torch.uint8).T
    tiles = wt.reshape(kp // TILE_K, TILE_K, np_ // TILE_N, TILE_N).permute(0, 2, 1, 3).contiguous()
    scales = torch.ones((folded.shape[0], np_), dtype=torch.float32, device=w.device)
    scales[:, :n] = folded * DECODE_CORRECTION
    return PackedW8A16(tiles, scales, n, k, group)


def unpack(p: PackedW8A16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse view for tests: (e4m3 weight [N, K], per-element fp32 scale [N, K])."""
    kt, nt, tk, tn = p.tiles.shape
    wt = p.tiles.permute(0, 2, 1, 3).reshape(kt * tk, nt * tn)
    w = wt[: p.k, : p.n].T.contiguous().view(numerics.E4M3)
    s = p.scales[:, : p.n] / DECODE_CORRECTION
    s = s.repeat_interleave(p.group_size, 0)[: p.k] if p.group_size else s.expand(p.k, p.n)
    return w, s.T.contiguous()
