"""FP8 KV-cache op surface: paged cache write and paged attention (torch.ops.fp8_backend.*).

The C++ CPU kernels (csrc/cpu/attention*.cpp) implement numerics.paged_kv_write and
numerics.paged_attention. Caches are [num_blocks, num_kv_heads, block_size, head_size] (any
strides with a contiguous last dim, so vLLM's CPU layout [num_blocks, kv_heads, 2 * block_size,
head_size] split into K and V halves works as is), uint8 or float8 for FP8, or bf16/fp16/fp32.
The attention kernel (:func:`attention_path`: ``amx``, ``avx512``, ``avx2`` or ``portable``)
follows from the head size, the cache dtype and the CPU code path every op shares
(``fp8_backend.kernels.cpu_isa`` / ``set_cpu_isa``, ``FP8_BACKEND_CPU_ISA``); the rule is the C++
one the op runs (csrc/cpu/attention.h).
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.fp8_backend)

#: kv_cache_dtype strings the kernels take; "auto" means a 16/32-bit cache.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@torch.library.register_fake("fp8_backend::kv_cache_write")
def _kv_cache_write_fake(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    return None


@torch.library.register_fake("fp8_backend::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, out, query_start_loc, seq_lens, block_table,
                          softmax_scale, sliding_window, kv_cache_dtype, k_scale, v_scale):
    return None


def attention_path(head_size: int, cache_dtype: torch.dtype) -> str:
    """The kernel paged attention runs for this head size and cache element dtype (uint8 / float8
    for FP8, bfloat16, float16, float32) on the selected CPU code path: ``amx`` (AMX CPUs, FP8 /
    bf16 caches, head size a multiple of 32 up to 256), ``avx512`` (AVX-512 CPUs, multiples of
    16), ``avx2`` (AVX2 CPUs, multiples of 8), else ``portable``."""
    return _C.attention_path(int(head_size), str(cache_dtype).removeprefix("torch."))


def _scale(s: torch.Tensor | float) -> torch.Tensor:
    return s if isinstance(s, torch.Tensor) else torch.tensor([float(s)], dtype=torch.float32)


def kv_cache_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "fp8",
    k_scale: torch.Tensor | float = 1.0,
    v_scale: torch.Tensor | float = 1.0,
) -> None:
    """Store key/value [num_tokens, kv_heads, head_size] at ``slot_mapping`` (block * block_size +
    offset; -1 skips). FP8: q = saturate(round_half_even(x / scale)), scales per tensor (1 element)
    or per kv head; NaN stays NaN. Scales must be finite and > 0."""
    torch.ops.fp8_backend.kv_cache_write(key, value, key_cache, value_cache, slot_mapping,
                                         kv_cache_dtype, _scale(k_scale), _scale(v_scale))


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                    softmax_scale: float, kv_cache_dtype: str = "fp8", k_scale: torch.Tensor | float = 1.0,
                    v_scale: torch.Tensor | float = 1.0, sliding_window: int = -1,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention (decode and prefill over a cached prefix, GQA, sliding window),
    reading FP8 blocks directly: numerics.paged_attention. k/v scales apply to FP8 caches only
    (16/32-bit caches hold unscaled values). block_table is int32; returns ``out``
    [num_tokens, num_heads, head_size] in query.dtype."""
    if out is None:
        out = torch.empty_like(query)
    torch.ops.fp8_backend.paged_attention(query, key_cache, value_cache, out, query_start_loc, seq_lens,
                                          block_table, float(softmax_scale), int(sliding_window),
                                          kv_cache_dtype, _scale(k_scale), _scale(v_scale))
    return out
