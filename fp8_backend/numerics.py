"""The FP8 specification, in plain torch.

Every kernel of this project (C++, CUDA, Triton) is tested against these functions. They are
written for clarity, not speed, and import neither vLLM nor the kernels.

Conventions (those of AutoFP8, llm-compressor and vLLM):
- ``scale`` is the *inverse* scale: ``x ≈ q * scale`` with ``scale = amax / fp8_max``.
- Quantization computes ``x / scale`` in fp32, saturates to ``±fp8_max`` and rounds to nearest,
  ties to even. NaN stays NaN; ±Inf saturates to ±fp8_max (callers that must reject non-finite
  input, such as weight loading, check first with :func:`check_finite`).
- A scale is never 0: amax = 0 (all-zero input) gives :data:`SCALE_FLOOR`-based scale.
- Dot products accumulate in fp32; per-tensor and per-channel scales are applied once to the
  fp32 sum (they factor out of the dot product), block scales per K block.
"""

from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3FNUZ = torch.float8_e4m3fnuz

FP8_DTYPES = (E4M3, E5M2, E4M3FNUZ)

#: Largest finite magnitude of each FP8 format.
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0, E4M3FNUZ: 240.0}

#: Default block shape of block-wise (DeepSeek-style) weight quantization: [N block, K block].
BLOCK_SIZE = (128, 128)


def fp8_max(dtype: torch.dtype) -> float:
    if dtype not in FP8_MAX:
        raise ValueError(f"unsupported FP8 dtype: expected one of {list(FP8_MAX)}, found {dtype}")
    return FP8_MAX[dtype]


def scale_floor(dtype: torch.dtype = E4M3) -> float:
    """Smallest scale ever produced: 1 / (fp8_max * 512), vLLM's MIN_SCALING_FACTOR.

    It only matters for all-zero (or nearly all-zero) tensors, whose scale would otherwise be 0
    and turn dequantization into 0 * inf = NaN downstream.
    """
    return 1.0 / (fp8_max(dtype) * 512.0)


def compute_scale(amax: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """scale = amax / fp8_max in fp32, floored at :func:`scale_floor`."""
    amax = amax.float()
    return torch.clamp(amax / fp8_max(dtype), min=scale_floor(dtype))


def round_to_fp8(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Saturate to ±fp8_max, then round to nearest even into ``dtype``.

    torch's float->float8 conversion rounds to nearest even but turns out-of-range values into
    NaN (e4m3fn) or Inf (e5m2); the clamp makes it saturating. clamp keeps NaN as NaN.
    """
    m = fp8_max(dtype)
    return torch.clamp(x.float(), -m, m).to(dtype)


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` if ``t`` holds NaN or Inf."""
    if t.is_floating_point() and t.dtype not in FP8_DTYPES:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise ValueError(
                f"{name}: expected finite values, found {n_nan} NaN and {n_inf} Inf "
                f"(of {t.numel()} elements, shape {tuple(t.shape)})"
            )


def check_scale(scale: torch.Tensor, name: str) -> None:
    """A usable scale is finite and strictly positive."""
    s = scale.float()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name}: expected finite scales, found {s[~torch.isfinite(s)][:4].tolist()}")
    if not bool((s > 0).all()):
        raise ValueError(f"{name}: expected scales > 0, found {s[s <= 0][:4].tolist()}")


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """q = saturate(round_half_even(x / scale)); ``scale`` broadcasts against ``x``."""
    return round_to_fp8(x.float() / scale.float(), dtype)


def per_tensor_scale(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """The dynamic per-tensor scale of ``x`` (0-d fp32): amax / fp8_max, floored; an empty
    tensor gets the floor."""
    amax = x.abs().amax() if x.numel() else torch.zeros((), device=x.device)
    return compute_scale(amax, dtype).reshape(())


def quantize_per_tensor(
    x: torch.Tensor, dtype: torch.dtype = E4M3, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor (0-d fp32). Static when ``scale`` is given."""
    if scale is None:
        scale = per_tensor_scale(x, dtype)
    scale = scale.float().reshape(())
    return quantize_with_scale(x, scale, dtype), scale


def quantize_per_channel(w: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per output row of a [N, K] weight; scale shape [N, 1] (compressed-tensors)."""
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = compute_scale(amax, dtype)
    return quantize_with_scale(w, scale, dtype), scale


def quantize_per_token(
    x: torch.Tensor, dtype: torch.dtype = E4M3, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) activation quantization; scale shape [..., 1].

    ``scale_ub`` caps each row's amax before the scale is computed (vLLM's activation upper
    bound), so outliers saturate instead of stretching the scale.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if scale_ub is not None:
        amax = torch.clamp(amax, max=scale_ub)
    scale = compute_scale(amax, dtype)
    return quantize_with_scale(x, scale, dtype), scale


def _pad_to_blocks(t: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = t.shape
    pn, pk = (-n) % bn, (-k) % bk
    return torch.nn.functional.pad(t, (0, pk, 0, pn)) if (pn or pk) else t


def _blocks(t: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """A 2-D tensor zero-padded to whole blocks, as [row blocks, bn, col blocks, bk]."""
    bn, bk = block_size
    p = _pad_to_blocks(t, bn, bk)
    return p.reshape(p.shape[0] // bn, bn, p.shape[1] // bk, bk)


def block_amax(w: torch.Tensor, block_size: tuple[int, int] = BLOCK_SIZE) -> torch.Tensor:
    """amax of each [bn, bk] block of a 2-D tensor; a partial last block covers what is left.
    [N, K] blocks give one amax (per tensor), [1, K] one per row (per channel / token)."""
    return _blocks(w.float().abs(), block_size).amax(dim=(1, 3))  # zero padding never raises an amax


def block_sum(t: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Sum of each [bn, bk] block of a 2-D tensor (zero padding adds nothing)."""
    return _blocks(t, block_size).sum(dim=(1, 3))


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """Blow a [ceil(N/bn), ceil(K/bk)] scale grid up to one scale per element of ``shape``."""
    bn, bk = block_size
    n, k = shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    if tuple(scale.shape) != (nb, kb):
        raise ValueError(
            f"block scale: expected shape ({nb}, {kb}) for a [{n}, {k}] tensor with blocks "
            f"{bn}x{bk}, found {tuple(scale.shape)}"
        )
    s = scale.float()
    # a block spanning a whole dim is a broadcast view there (per tensor / row: no [N, K] copy)
    s = s.expand(n, kb) if nb == 1 else s.repeat_interleave(bn, 0)[:n]
    return s.expand(n, k) if kb == 1 else s.repeat_interleave(bk, 1)[:, :k]


def quantize_block(
    w: torch.Tensor, dtype: torch.dtype = E4M3, block_size: tuple[int, int] = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block scales (``weight_scale_inv`` of DeepSeek / FP8_BLOCK checkpoints)."""
    scale = compute_scale(block_amax(w, block_size), dtype)
    q = quantize_with_scale(w, expand_block_scale(scale, tuple(w.shape), block_size), dtype)
    return q, scale


def fake_quantize(x: torch.Tensor, block_size: tuple[int, int], scale: torch.Tensor | None = None,
                  dtype: torch.dtype = E4M3) -> torch.Tensor:
    """``x`` (2-D) rounded to the FP8 grid and scaled back, in fp32: dynamic scales, one per
    [bn, bk] block (``[1, K]`` per token, ``[1, 128]`` groups, ``[M, K]`` per tensor), or the
    static ``scale`` (one element) when given. What a W8A8 path's activation quantization
    does to the values it multiplies."""
    if scale is not None:
        full = scale.float().reshape(())
    else:
        full = expand_block_scale(compute_scale(block_amax(x, block_size), dtype), tuple(x.shape), block_size)
    return quantize_with_scale(x, full, dtype).float() * full


def quantize_group(x: torch.Tensor, group_size: int = 128, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token groups of ``group_size`` along the last dim (activations of block
    checkpoints); scale shape [..., ceil(K/group_size)]."""
    k = x.shape[-1]
    ng = math.ceil(k / group_size)
    pad = ng * group_size - k
    xp = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    g = xp.reshape(*x.shape[:-1], ng, group_size)
    scale = compute_scale(g.abs().amax(dim=-1), dtype)
    q = round_to_fp8(g / scale.unsqueeze(-1), dtype).reshape(*x.shape[:-1], ng * group_size)[..., :k]
    return q, scale


# ----------------------------------------------------------------------------------------------
# Dequantization
# ----------------------------------------------------------------------------------------------


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """fp32 values of ``q``: per-tensor ([] or [1]), per-channel ([N, 1] or [N]) or block scales."""
    qf = q.float()
    s = scale.float()
    if block_size is not None:
        return qf * expand_block_scale(s, tuple(q.shape), block_size)
    if s.numel() == 1:
        return qf * s.reshape(())
    if q.dim() == 2 and s.numel() == q.shape[0]:
        return qf * s.reshape(-1, 1)
    return qf * s


def e4m3fnuz_to_e4m3fn(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode an AMD e4m3fnuz tensor (bias 8, max 240, 0x80 = NaN) as e4m3fn with the same scale.

    Every fnuz value of magnitude >= 2**-6 is exactly representable in e4m3fn (range 448), so
    decoding and re-rounding keeps all of them; only fnuz values below 2**-6 (fnuz units) are
    rounded to e4m3fn's subnormal grid (error <= 2**-10 * scale). Reinterpreting the bits and
    halving the scale instead would turn the fnuz maximum (0x7F = 240) into e4m3fn's NaN.
    """
    if q.dtype == torch.uint8:
        q = q.view(E4M3FNUZ)
    if q.dtype != E4M3FNUZ:
        raise ValueError(f"e4m3fnuz_to_e4m3fn: expected float8_e4m3fnuz or uint8, found {q.dtype}")
    v = q.float()
    if bool(torch.isnan(v).any()):
        raise ValueError("e4m3fnuz_to_e4m3fn: tensor holds the fnuz NaN encoding 0x80")
    return round_to_fp8(v, E4M3), scale.float()


# ----------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------


def w8a16_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reference W8A16 linear: y = x @ dequant(q, scale)^T + bias, in ``x.dtype``.

    fp32 accumulation. Per-tensor / per-channel scales multiply the fp32 dot product of x with
    the raw FP8 values (mathematically the same as dequantizing first, and what kernels do);
    block scales dequantize per block.
    """
    n, k = q.shape
    if x.shape[-1] != k:
        raise ValueError(f"w8a16_linear: x has K={x.shape[-1]}, weight has K={k}")
    xf = x.float().reshape(-1, k)
    if block_size is not None:
        y = xf @ dequantize(q, scale, block_size).T
    else:
        s = scale.float().reshape(-1)
        if s.numel() not in (1, n):
            raise ValueError(f"w8a16_linear: expected 1 or N={n} scales, found {s.numel()}")
        y = (xf @ q.float().T) * s.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def w8a8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    w_scale: torch.Tensor,
    act_block: tuple[int, int] = (1, 0),
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = E4M3,
) -> torch.Tensor:
    """Reference W8A8 with per-tensor or per-channel weight scales: quantize activations
    (static per tensor with ``input_scale``; else dynamic, one scale per ``act_block`` of the
    [M, K] input, 0 = the whole dim: [1, 0] per token, [0, 0] per tensor), multiply FP8 x FP8
    in fp32, apply both scales to the sums."""
    k = q.shape[1]
    x2 = x.reshape(-1, k)
    if input_scale is not None:
        xq, xs = quantize_per_tensor(x2, dtype, input_scale)
        xs = xs.reshape(1, 1)
    else:
        if act_block[1] not in (0, k):
            raise ValueError(f"w8a8_linear: act_block: expected whole rows [m, 0], found {list(act_block)}")
        block = (act_block[0] or max(x2.shape[0], 1), k)
        grid = compute_scale(block_amax(x2, block), dtype)
        xq = quantize_with_scale(x2, expand_block_scale(grid, tuple(x2.shape), block), dtype)
        xs = grid.repeat_interleave(block[0], 0)[: x2.shape[0]]
    y = (xq.float() @ q.float().T) * xs * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------


def moe_scale_shapes(
    num_experts: int, intermediate: int, hidden: int, block_size: tuple[int, int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Expected (w13_scale, w2_scale) shapes of :func:`fused_moe_w8a16`.

    Per-channel: [E, 2I] and [E, H]. Blocks [bn, bk]: gate and up keep a grid each, stacked along
    rows, so an intermediate size that is not a multiple of bn stays exact:
    [E, 2*ceil(I/bn), ceil(H/bk)] and [E, ceil(H/bn), ceil(I/bk)].
    """
    e, i, h = num_experts, intermediate, hidden
    if block_size is None:
        return (e, 2 * i), (e, h)
    bn, bk = block_size
    return (e, 2 * math.ceil(i / bn), math.ceil(h / bk)), (e, math.ceil(h / bn), math.ceil(i / bk))


def fused_moe_w8a16(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reference W8A16 mixture of experts with SiLU-and-mul experts, in ``x.dtype``.

    x [T, H] bf16/fp16; w13 [E, 2I, H] FP8, rows [0, I) the gate and [I, 2I) the up projection;
    w2 [E, H, I] FP8; scales fp32 as :func:`moe_scale_shapes` (a per-tensor checkpoint scale is
    the per-channel case with equal rows). topk_weights [T, k], topk_ids [T, k] (a token may name
    the same expert twice: both terms count). For token t::

        out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]

    Rounding points (those of vLLM's 16-bit MoE): gate and up as :func:`w8a16_linear` (fp32 sums
    rounded to x.dtype); silu(g) * u in fp32, rounded to x.dtype as the down projection's input;
    the down projection, the top-k weighting and the sum over j in fp32; one final rounding.
    """
    t, h = x.shape
    e, two_i, h13 = w13.shape
    i = two_i // 2
    if h13 != h or two_i % 2 or tuple(w2.shape) != (e, h, i):
        raise ValueError(
            f"fused_moe_w8a16: expected x [T, H], w13 [E, 2I, H], w2 [E, H, I]; found x "
            f"{tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    s13, s2 = moe_scale_shapes(e, i, h, block_size)
    if tuple(w13_scale.shape) != s13 or tuple(w2_scale.shape) != s2:
        raise ValueError(
            f"fused_moe_w8a16: expected w13_scale {s13} and w2_scale {s2}, found "
            f"{tuple(w13_scale.shape)} and {tuple(w2_scale.shape)}"
        )
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != t:
        raise ValueError(
            f"fused_moe_w8a16: expected topk_weights and topk_ids of shape [T={t}, k], found "
            f"{tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}"
        )
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= e):
        raise ValueError(f"fused_moe_w8a16: topk_ids must lie in [0, {e}), found {topk_ids.min()}..{topk_ids.max()}")
    half = s13[1] // 2  # scale rows of the gate half
    out = torch.zeros(t, h, dtype=torch.float32)
    for ex in torch.unique(topk_ids).tolist():
        tok, slot = (topk_ids == ex).nonzero(as_tuple=True)
        xe = x[tok]
        g = w8a16_linear(xe, w13[ex, :i], w13_scale[ex, :half], None, block_size)
        u = w8a16_linear(xe, w13[ex, i:], w13_scale[ex, half:], None, block_size)
        a = (torch.nn.functional.silu(g.float()) * u.float()).to(x.dtype)
        if block_size is not None:
            d = a.float() @ dequantize(w2[ex], w2_scale[ex], block_size).T
        else:
            d = (a.float() @ w2[ex].float().T) * w2_scale[ex].float().reshape(1, -1)
        out.index_add_(0, tok, d * topk_weights[tok, slot].float().reshape(-1, 1))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# FP8 KV cache and paged attention
# ----------------------------------------------------------------------------------------------

#: vLLM's kv_cache_dtype strings for FP8 caches -> the FP8 dtype stored.
KV_CACHE_FP8_DTYPES = {"fp8": E4M3, "fp8_e4m3": E4M3, "fp8_e5m2": E5M2}


def kv_scale_per_head(scale: torch.Tensor | float, num_kv_heads: int, name: str = "kv scale") -> torch.Tensor:
    """A k/v scale as an fp32 vector of ``num_kv_heads`` (per-tensor scales are broadcast)."""
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if s.numel() == 1:
        s = s.expand(num_kv_heads)
    if s.numel() != num_kv_heads:
        raise ValueError(f"{name}: expected 1 or {num_kv_heads} (per kv head) scales, found {s.numel()}")
    check_scale(s, name)
    return s.contiguous()


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """FP8 K or V for the cache: x [tokens, kv_heads, head_size], scale per tensor or per kv head;
    q = saturate(round_half_even(x / scale)) (e4m3 ±448, e5m2 ±57344; NaN stays NaN)."""
    s = kv_scale_per_head(scale, x.shape[-2])
    return quantize_with_scale(x, s.reshape(-1, 1), dtype)


def paged_kv_write(
    x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, scale: torch.Tensor | float | None = None
) -> None:
    """Write x [tokens, kv_heads, head_size] into a paged cache [num_blocks, kv_heads, block_size,
    head_size] at slots ``slot_mapping`` (slot = block * block_size + offset; -1 skips the token).
    FP8 caches (float8 dtypes) quantize with ``scale``; 16/32-bit caches store x as is."""
    bs = cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    xs = x[keep]
    if cache.dtype in FP8_DTYPES:
        vals = quantize_kv(xs, 1.0 if scale is None else scale, cache.dtype)
    else:
        vals = xs.to(cache.dtype)
    cache[slots // bs, :, slots % bs, :] = vals


def gather_kv(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, [length, kv_heads, head_size], raw cache dtype."""
    bs = cache.shape[2]
    nblk = -(-length // bs)
    blocks = cache[block_row[:nblk].long()]  # [nblk, H, bs, D]
    return blocks.permute(0, 2, 1, 3).reshape(nblk * bs, cache.shape[1], cache.shape[3])[:length]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    softmax_scale: float,
    k_scale: torch.Tensor | float = 1.0,
    v_scale: torch.Tensor | float = 1.0,
    sliding_window: int = -1,
) -> torch.Tensor:
    """Reference causal paged attention over an FP8 (or 16/32-bit) paged KV cache.

    query [T, Hq, D]: sequence i owns rows query_start_loc[i]:query_start_loc[i+1] (its newest
    tokens, whose K/V are already in the cache), seq_lens[i] is its whole length (cached prefix +
    new tokens), so query row j of a sequence with n rows sits at position seq_len - n + j.
    Decode is n = 1; prefill with a cached prefix (chunked prefill) is n > 1. Caches are
    [num_blocks, Hkv, block_size, D]; Hq is a multiple of Hkv (GQA: query head h reads kv head
    h // (Hq / Hkv)). A query at position p attends keys t <= p, and with sliding_window w > 0 only
    keys with p - t < w. Softmax in fp32. NaN in an attended K or V makes the row NaN.

    k_scale folds into the softmax scale (scores = (q . k_fp8) * softmax_scale * k_scale) and
    v_scale into the output (out = (P @ v_fp8) * v_scale), per kv head: mathematically identical
    to dequantizing K and V first, since both scales are constant over the summed index.
    Output [T, Hq, D] in query.dtype.
    """
    T, Hq, D = query.shape
    Hkv = key_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"paged_attention: {Hq} query heads is not a multiple of {Hkv} kv heads")
    G = Hq // Hkv
    ks = kv_scale_per_head(k_scale, Hkv, "k_scale")
    vs = kv_scale_per_head(v_scale, Hkv, "v_scale")
    out = torch.empty(T, Hq, D, dtype=torch.float32)
    for i in range(len(seq_lens)):
        q0, q1 = int(query_start_loc[i]), int(query_start_loc[i + 1])
        n, L = q1 - q0, int(seq_lens[i])
        if n == 0:
            continue
        k = gather_kv(key_cache, block_table[i], L).float()  # [L, Hkv, D] raw FP8 values
        v = gather_kv(value_cache, block_table[i], L).float()
        q = query[q0:q1].float().reshape(n, Hkv, G, D)
        s = torch.einsum("nhgd,lhd->hgnl", q, k) * (softmax_scale * ks).reshape(Hkv, 1, 1, 1)
        pos = torch.arange(L - n, L).reshape(n, 1)
        t = torch.arange(L).reshape(1, L)
        mask = t <= pos
        if sliding_window > 0:
            mask &= (pos - t) < sliding_window
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)  # [Hkv, G, n, L]
        if bool(torch.isfinite(v).all()):
            o = torch.einsum("hgnl,lhd->nhgd", p, v)
        else:  # masked keys are never read: keep their NaN out of 0 * NaN
            pv = torch.where(mask.reshape(1, 1, n, L, 1), p.unsqueeze(-1) * v.permute(1, 0, 2).unsqueeze(1).unsqueeze(1), 0.0)
            o = pv.sum(dim=3).permute(2, 0, 1, 3)
        out[q0:q1] = (o * vs.reshape(1, Hkv, 1, 1)).reshape(n, Hq, D)
    return out.to(query.dtype)
