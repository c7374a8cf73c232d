"""FP8 (e4m3) KV cache on GPU: cache write and paged decode attention, in Triton.

Cache layout (per layer, one tensor for K and one for V): float8_e4m3fn
[num_blocks, block_size, num_kv_heads, head_size], token slot s at block s // block_size, offset
s % block_size (vLLM's slot_mapping convention; slot -1 = padding token, not written).

Scales are inverse scales (x ≈ q * scale), per tensor (1 element) or per KV head (num_kv_heads).
- write: q = saturate(round_half_even(x / scale)) (numerics.quantize_with_scale).
- decode: softmax(q·k) with k = k_q * k_scale folds k_scale into the softmax scale; the output
  sum_j p_j v_j = v_scale * sum_j p_j v_q,j takes v_scale once at the end. FP8 is decoded with
  bit operations in registers (works on sm_80, which has no FP8 conversions).
GQA: one program per (sequence, KV head) serves the KV head's whole group of query heads, so each
cache block is read once per KV head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import numerics
from .fp8_math import cast_out, e4m3_encode, e4m3_to_f32


@triton.jit
def kv_cache_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
                          stride_kt, stride_vt, stride_cb, stride_ct,
                          BLOCK_SIZE: tl.constexpr, H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """One program per token: quantize its K and V rows [H, D] into its cache slot."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, H)
    d = tl.arange(0, D_PAD)
    mask = (d < D)[None, :] & ((tl.zeros((H, D_PAD), tl.int64) + slot) >= 0)
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    off = tl.maximum(slot, 0) % BLOCK_SIZE
    dst = blk * stride_cb + off * stride_ct + h[:, None] * D + d[None, :]
    ks = tl.load(ks_ptr + h)[:, None]
    vs = tl.load(vs_ptr + h)[:, None]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(kc_ptr + dst, e4m3_encode(tl.math.div_rn(k, ks + tl.zeros_like(k))), mask=mask)
    tl.store(vc_ptr + dst, e4m3_encode(tl.math.div_rn(v, vs + tl.zeros_like(v))), mask=mask)


@triton.jit
def paged_decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, ks_ptr, vs_ptr, o_ptr, sm_scale,
                        stride_qb, stride_qh, stride_ob, stride_oh, stride_bt, stride_cb, stride_ct,
                        GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        H_KV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """One program per (sequence b, KV head kvh): online softmax over the sequence's pages."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    tok = tl.arange(0, BLOCK_SIZE)
    g_ok = g < GROUP
    d_ok = d < D
    qh = kvh * GROUP + g  # query heads of this KV head
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qk_scale = sm_scale * tl.load(ks_ptr + kvh)  # k_scale folded into the softmax scale
    seq_len = tl.load(len_ptr + b)
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    for j in range(0, tl.cdiv(seq_len, BLOCK_SIZE)):
        page = tl.load(bt_ptr + b * stride_bt + j).to(tl.int64)
        t_ok = (j * BLOCK_SIZE + tok) < seq_len
        kv_off = page * stride_cb + tok[:, None] * stride_ct + kvh * D + d[None, :]
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = e4m3_to_f32(tl.load(kc_ptr + kv_off, mask=kv_mask, other=0))  # [BLOCK_SIZE, D_PAD]
        v = e4m3_to_f32(tl.load(vc_ptr + kv_off, mask=kv_mask, other=0))
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * qk_scale  # [G_PAD, BLOCK_SIZE]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    v_scale = tl.load(vs_ptr + kvh)
    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]  # empty sequence -> zeros
    tl.store(o_ptr + b * stride_ob + qh[:, None] * stride_oh + d[None, :], cast_out(out, o_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def _check_cache(cache: torch.Tensor, name: str) -> None:
    if cache.dtype != numerics.E4M3 or cache.dim() != 4 or not cache.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous float8_e4m3fn [num_blocks, block_size, num_kv_heads, "
                         f"head_size] tensor, found {cache.dtype} {tuple(cache.shape)}")
    bs = cache.shape[1]
    if bs & (bs - 1):
        raise ValueError(f"{name}: block_size must be a power of two, found {bs}")


def _scale_vec(scale: torch.Tensor, heads: int, name: str, device) -> torch.Tensor:
    """Per-tensor or per-KV-head scale -> fp32 [heads] (one scale per KV head)."""
    numerics.check_scale(scale, name)
    s = scale.to(device=device, dtype=torch.float32).reshape(-1)
    if s.numel() not in (1, heads):
        raise ValueError(f"{name}: expected 1 or num_kv_heads={heads} scales, found {s.numel()}")
    return s.expand(heads).contiguous()


def kv_cache_write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Quantize key/value [T, H_kv, D] into the FP8 caches at slot_mapping [T] (-1 = skip)."""
    _check_cache(key_cache, "key_cache")
    _check_cache(value_cache, "value_cache")
    t, h, d = key.shape
    if tuple(value.shape) != (t, h, d) or tuple(key_cache.shape[2:]) != (h, d) or key_cache.shape != value_cache.shape:
        raise ValueError(f"kv_cache_write: key {tuple(key.shape)}, value {tuple(value.shape)} and caches "
                         f"{tuple(key_cache.shape)} / {tuple(value_cache.shape)} do not match")
    if h & (h - 1):
        raise ValueError(f"kv_cache_write: num_kv_heads must be a power of two here, found {h}")
    if slot_mapping.numel() != t:
        raise ValueError(f"slot_mapping: expected {t} slots, found {slot_mapping.numel()}")
    ks = _scale_vec(k_scale, h, "k_scale", key.device)
    vs = _scale_vec(v_scale, h, "v_scale", key.device)
    key, value = key.contiguous(), value.contiguous()
    if t:
        kc, vc = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
        kv_cache_write_kernel[(t,)](key, value, kc, vc, slot_mapping.contiguous(), ks, vs,
                                    key.stride(0), value.stride(0), kc.stride(0), kc.stride(1),
                                    BLOCK_SIZE=key_cache.shape[1], H=h, D=d, D_PAD=triton.next_power_of_2(d))


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float,
                           k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """One decode step: query [B, H_q, D] attends over each sequence's seq_lens[b] cached tokens
    (pages block_tables[b, :]); returns [B, H_q, D] in query.dtype."""
    _check_cache(key_cache, "key_cache")
    _check_cache(value_cache, "value_cache")
    nb, hq, d = query.shape
    h_kv = key_cache.shape[2]
    if key_cache.shape[3] != d or hq % h_kv:
        raise ValueError(f"paged_decode_attention: query {tuple(query.shape)} does not fit cache "
                         f"{tuple(key_cache.shape)} (head_size equal, H_q a multiple of H_kv)")
    ks = _scale_vec(k_scale, h_kv, "k_scale", query.device)
    vs = _scale_vec(v_scale, h_kv, "v_scale", query.device)
    group = hq // h_kv
    out = torch.empty_like(query)
    if nb:
        kc, vc = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
        paged_decode_kernel[(nb, h_kv)](query, kc, vc, block_tables, seq_lens, ks, vs, out, float(sm_scale),
                                        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                                        block_tables.stride(0), kc.stride(0), kc.stride(1),
                                        GROUP=group, G_PAD=triton.next_power_of_2(group),
                                        BLOCK_SIZE=key_cache.shape[1], H_KV=h_kv, D=d, D_PAD=triton.next_power_of_2(d))
    return out
