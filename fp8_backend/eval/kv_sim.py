"""FP8 KV cache simulated in Hugging Face transformers, with the math of this plugin's attention kernels.

The plugin writes each token's post-RoPE key and value into an FP8 cache with
``numerics.quantize_kv`` (x / scale in fp32, saturate, round half to even; per tensor or per kv
head) and attends as ``numerics.paged_attention`` does: q . k_fp8 and P @ v_fp8 in fp32 with the
k/v scales folded in, softmax in fp32, output in the query's dtype (the C++ kernels split the
bf16/fp32 operands into exact bf16 parts, so only the summation order differs).
:func:`fp8_kv_attention` is that computation as a transformers attention function: it receives
the post-RoPE key/value states, fake-quantizes them (:func:`fake_quantize_kv`), and runs
scaled-dot-product attention in fp32 whatever the model's dtype.

    install(model, k_scales, v_scales, "fp8")   # model: a transformers causal LM (Llama-style)

Imports neither vLLM nor the kernels.
"""
from __future__ import annotations

import torch

from fp8_backend import numerics

ATTN_NAME = "fp8_kv_sdpa"


def fake_quantize_kv(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = numerics.E4M3) -> torch.Tensor:
    """x [batch, kv_heads, tokens, head_size] -> the fp32 values an FP8 cache with ``scale`` (one,
    or one per kv head) gives back: dequantize(quantize_kv(x, scale)). Exact in fp32 (an FP8 value
    times an fp32 scale rounds once, as the kernel's scale fold does)."""
    if x.dim() != 4:
        raise ValueError(f"fake_quantize_kv: expected x of shape [batch, kv_heads, tokens, head_size], found {tuple(x.shape)}")
    s = numerics.kv_scale_per_head(scale, x.shape[1])
    q = numerics.quantize_kv(x.transpose(1, 2), s, dtype)  # [B, T, Hkv, D], scale per kv head
    return (q.float() * s.reshape(-1, 1)).transpose(1, 2)


def fp8_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (AttentionInterface signature): causal attention over FP8
    fake-quantized key/value in fp32; ``module.fp8_kv`` = (k_scale, v_scale, fp8 dtype).
    Returns (output [batch, tokens, heads, head_size] in query.dtype, None)."""
    k_scale, v_scale, dtype = module.fp8_kv
    k = fake_quantize_kv(key, k_scale, dtype)
    v = fake_quantize_kv(value, v_scale, dtype)
    q = query.float()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # query head h reads kv head h // groups
    v = v.repeat_interleave(groups, dim=1)
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    causal = mask is None and q.shape[2] > 1
    if mask is None and q.shape[2] != k.shape[2]:
        raise ValueError(f"fp8_kv_attention: without a mask expected as many queries as keys, found {q.shape[2]} and {k.shape[2]}")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def register() -> str:
    """Register :func:`fp8_kv_attention` (and sdpa's mask builder) under :data:`ATTN_NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, fp8_kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def install(model, k_scales: dict[int, torch.Tensor | float], v_scales: dict[int, torch.Tensor | float],
            kv_cache_dtype: str = "fp8") -> int:
    """Make every attention layer of ``model`` (modules with ``layer_idx`` and ``k_proj``) attend
    over an FP8 cache of ``kv_cache_dtype`` ("fp8" / "fp8_e4m3" / "fp8_e5m2") with the scales of its
    layer index (missing: 1.0, as the plugin defaults). Returns the number of layers changed."""
    if kv_cache_dtype not in numerics.KV_CACHE_FP8_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {list(numerics.KV_CACHE_FP8_DTYPES)}, found {kv_cache_dtype!r}")
    dtype = numerics.KV_CACHE_FP8_DTYPES[kv_cache_dtype]
    n = 0
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "k_proj"):
            i = mod.layer_idx
            mod.fp8_kv = (torch.as_tensor(k_scales.get(i, 1.0), dtype=torch.float32),
                          torch.as_tensor(v_scales.get(i, 1.0), dtype=torch.float32), dtype)
            n += 1
    if n == 0:
        raise ValueError("install: expected attention modules with layer_idx and k_proj, found none")
    model.set_attn_implementation(register())
    return n
