"""FP8 KV-cache op surface: paged cache write and paged attention (torch.ops.fp8_backend.*).

The C++ CPU kernels (csrc/cpu/attention*.cpp) implement numerics.paged_kv_write and
numerics.paged_attention. Caches are [num_blocks, num_kv_heads, block_size, head_size] (any
strides with a contiguous last dim, so vLLM's CPU layout [num_blocks, kv_heads, 2 * block_size,
head_size] split into K and V halves works as is), uint8 or float8 for FP8, or bf16/fp16/fp32.
The attention code path (``amx`` for FP8 / bf16 caches with head sizes that are multiples of 32
up to 256, ``avx512`` for other multiples of 16, ``avx2`` for other multiples of 8 (for every
multiple of 8 on CPUs with AVX2 but no AVX-512), else ``portable``) is chosen by CPUID;
``FP8_BACKEND_CPU_ISA`` (shared with the linear kernels) or :func:`set_attention_isa` overrides it.
"""

from __future__ import annotations

import os

import torch

from . import ISA_ENV
from .. import _C  # noqa: F401  (registers torch.ops.fp8_backend)

ATTENTION_ISAS = ("portable", "avx2", "avx512", "amx")  # ascending speed; indices of the C++ op
#: kv_cache_dtype strings the kernels take; "auto" means a 16/32-bit cache.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@torch.library.register_fake("fp8_backend::kv_cache_write")
def _kv_cache_write_fake(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    return None


@torch.library.register_fake("fp8_backend::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, out, query_start_loc, seq_lens, block_table,
                          softmax_scale, sliding_window, kv_cache_dtype, k_scale, v_scale):
    return None


def attention_isa() -> str:
    """The attention code path in use for head sizes it can take (others run ``portable``)."""
    return ATTENTION_ISAS[torch.ops.fp8_backend.attention_isa()]


def set_attention_isa(name: str) -> str:
    """Select ``auto``, ``amx``, ``avx512``, ``avx2`` or ``portable``; raises if this CPU cannot run it."""
    return ATTENTION_ISAS[torch.ops.fp8_backend.attention_set_isa(name)]


def attention_path(head_size: int, cache_dtype: torch.dtype) -> str:
    """The path a cache of this element dtype (uint8 / float8 for FP8) and head size runs on."""
    isa = attention_isa()
    amx_ok = head_size % 32 == 0 and head_size <= 256 and cache_dtype not in (torch.float16, torch.float32)
    if isa == "amx" and amx_ok:
        return "amx"
    if isa in ("amx", "avx512") and head_size % 16 == 0:
        return "avx512"
    if isa != "portable" and head_size % 8 == 0:
        return "avx2"
    return "portable"


def supported_attention_isas() -> list[str]:
    """Paths this CPU can run (the first is always ``portable``)."""
    current = attention_isa()
    ok = ["portable"]
    for name in ATTENTION_ISAS[1:]:
        try:
            set_attention_isa(name)
            ok.append(name)
        except RuntimeError:
            pass
    set_attention_isa(current)
    return ok


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


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    softmax_scale: float,
    kv_cache_dtype: str = "fp8",
    k_scale: torch.Tensor | float = 1.0,
    v_scale: torch.Tensor | float = 1.0,
    sliding_window: int = -1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
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


_env = os.environ.get(ISA_ENV, "auto").strip() or "auto"
try:
    set_attention_isa(_env)
except RuntimeError as e:
    raise RuntimeError(f"{ISA_ENV}={_env!r}: {e}") from None
