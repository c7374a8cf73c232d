"""fp8-backend's CPU attention backend: FP8 KV cache written and read by this project's kernels.

A subclass of vLLM's CPU_ATTN backend with the same KV-cache layout ([num_blocks, kv_heads,
block_size, 2 * head_size], K then V per block), registered under vLLM's ``CPU_ATTN`` name (the
CPU platform always asks for that name) and under ``CUSTOM``. Which kernels a run uses is one
decision for the whole engine, taken by one rule (:func:`choose_attention_kernel`; the write and
the read must agree, as the two kernel families lay the cache out differently):
- ``FP8_BACKEND_ATTENTION=auto`` (default): this project's kernels for an FP8 cache (fp8 /
  fp8_e4m3 / fp8_e5m2: RNE cache write, FP8 read in registers, per-head scales) where they are
  measured faster than vLLM's CPU_ATTN on the same cache, or where vLLM's CPU_ATTN cannot read an
  FP8 cache at all (x86 without AVX-512, head sizes not a multiple of 32); vLLM's own CPU_ATTN
  kernels for 16-bit caches and for the FP8 regimes where its kernel is the faster one;
- ``all`` (or ``attention_config={"backend": "CUSTOM"}``): this project's kernels for every cache;
- ``vllm``: vLLM's kernels for everything (for comparisons).
Encoder / cross attention always stays with vLLM's kernels; ALiBi, soft-capping and sinks are
refused at engine start when this project's kernels are in use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, CrossAttentionSpec, EncoderOnlyAttentionSpec

from ..numerics import KV_CACHE_FP8_DTYPES
from . import settings

logger = logging.getLogger("vllm.fp8_backend")

MODE_ENV = settings.ATTENTION_ENV
FP8_KV_DTYPES = tuple(KV_CACHE_FP8_DTYPES)  # the FP8 cache dtypes (numerics owns the list)


def attention_mode(vllm_config: VllmConfig | None = None) -> str:
    mode = settings.attention_mode()
    if mode == "auto" and vllm_config is not None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if getattr(vllm_config.attention_config, "backend", None) == AttentionBackendEnum.CUSTOM:
            mode = "all"
    return mode


@dataclass(frozen=True)
class AttentionChoice:
    """Which kernels run an engine's decoder attention (``fp8_backend`` or ``vllm``) and why."""

    kernel: str
    reason: str


def choose_attention_kernel(mode: str, kv_cache_dtype: str, path: str, vllm_reads_fp8: bool,
                            per_head_scales: bool = False) -> AttentionChoice:
    """THE rule (pure; unit-tested case by case in tests/unit/test_attention_rule.py).

    mode: ``auto`` / ``all`` / ``vllm`` (:func:`attention_mode`); kv_cache_dtype: vLLM's cache
    dtype string; path: the code path fp8-backend's kernels would take for this head size and
    cache (``amx``, ``avx512``, ``avx2``, ``portable``: kernels.attention.attention_path); vllm_reads_fp8:
    whether vLLM's CPU_ATTN can read an FP8 cache here (x86 with AVX-512 or AMX, head size a
    multiple of 32: vLLM's _get_attn_isa raises otherwise); per_head_scales: the checkpoint declares
    one KV scale per kv head (compressed-tensors attn_head), which only fp8-backend's kernels
    apply. Measurements behind each case are in
    benchmarks/RESULTS.md, "Decode attention".
    """
    if mode == "vllm":
        why = f"{MODE_ENV}=vllm"
        if kv_cache_dtype in FP8_KV_DTYPES and not vllm_reads_fp8:
            why += " (vLLM's CPU_ATTN cannot read an FP8 cache on this CPU / head size: it will refuse)"
        return AttentionChoice("vllm", why)
    if mode == "all":
        return AttentionChoice("fp8_backend", f"{MODE_ENV}=all or the CUSTOM attention backend")
    if kv_cache_dtype not in FP8_KV_DTYPES:
        return AttentionChoice("vllm", "16-bit KV cache: vLLM's CPU_ATTN kernels (fp8-backend adds nothing there)")
    if not vllm_reads_fp8:
        why = (f"vLLM's CPU_ATTN cannot read an FP8 cache on this CPU / head size; fp8-backend's {path} "
               "kernel is the only FP8 reader")
        if path == "portable":
            why += (" (the portable path is many times slower than vLLM's kernel on a 16-bit cache: "
                    "kv_cache_dtype=auto is faster where memory allows)")
        return AttentionChoice("fp8_backend", why)
    if per_head_scales:
        return AttentionChoice("fp8_backend", "per-head KV-cache scales: only fp8-backend's kernels apply them")
    if path == "amx":
        return AttentionChoice("fp8_backend", "amx decode kernel: 1.27-1.52x vLLM's CPU_ATTN on the same FP8 cache "
                                              "with K/V from memory (Sapphire Rapids, 1 thread)")
    return AttentionChoice("vllm", f"fp8-backend's {path} path is not measured faster than vLLM's CPU_ATTN on an "
                                   "FP8 cache on this CPU class: vLLM's kernels (cache write and read)")


def vllm_reads_fp8_cache(head_size: int) -> bool:
    """vLLM's CPU_ATTN FP8 condition (vllm.v1.attention.backends.cpu_attn._get_attn_isa)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or head_size % 32:
        return False
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def _cache_dtype(kv_cache_dtype: str, vllm_config: VllmConfig | None) -> torch.dtype:
    """Element dtype of the cache (uint8 for FP8; the model dtype for "auto")."""
    if kv_cache_dtype in FP8_KV_DTYPES:
        return torch.uint8
    if kv_cache_dtype == "auto":
        model = vllm_config.model_config if vllm_config is not None else None
        return model.dtype if model is not None else torch.bfloat16
    return getattr(torch, kv_cache_dtype)


_logged: set[AttentionChoice] = set()


def attention_choice(vllm_config: VllmConfig, head_size: int, kv_cache_dtype: str | None = None) -> AttentionChoice:
    """choose_attention_kernel with this engine's mode, cache dtype, CPU and head size (logged
    once per distinct choice)."""
    from ..kernels import attention as ops

    kv = str(kv_cache_dtype if kv_cache_dtype is not None else vllm_config.cache_config.cache_dtype)
    path = ops.attention_path(head_size, _cache_dtype(kv, vllm_config))
    ckpt = getattr(getattr(vllm_config, "quant_config", None), "checkpoint", None)
    per_head = getattr(getattr(ckpt, "kv_cache", None), "strategy", None) == "head"
    choice = choose_attention_kernel(attention_mode(vllm_config), kv, path, vllm_reads_fp8_cache(head_size), per_head)
    if choice not in _logged:
        _logged.add(choice)
        logger.info("fp8-backend: decoder attention (kv_cache_dtype=%s, head size %d) on %s kernels: %s",
                    kv, head_size, "fp8-backend" if choice.kernel == "fp8_backend" else "vLLM's CPU_ATTN",
                    choice.reason)
    return choice


def own_kernels(vllm_config: VllmConfig, head_size: int, kv_cache_dtype: str | None = None) -> bool:
    """Whether this engine's decoder attention runs on fp8-backend's kernels (the rule above)."""
    return attention_choice(vllm_config, head_size, kv_cache_dtype).kernel == "fp8_backend"


def _split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, h, bs, _ = kv_cache.shape
    return kv_cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)


class Fp8CpuAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU builder, minus its scheduler metadata (and ISA checks) when our kernels run."""

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        self.own = own_kernels(vllm_config, kv_cache_spec.head_size) and not isinstance(
            kv_cache_spec, (CrossAttentionSpec, EncoderOnlyAttentionSpec)
        )
        if not self.own:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            return
        AttentionMetadataBuilder.__init__(self, kv_cache_spec, layer_names, vllm_config, device)
        self.kv_cache_spec = kv_cache_spec
        self.vllm_config = vllm_config
        self.block_size = kv_cache_spec.block_size
        self._warn_unscaled(layer_names)

    def _warn_unscaled(self, layer_names: list[str]) -> None:
        """Layers with an FP8 cache but no scale-loading method (a model without quantization
        config) run with scales 1.0: say so (the same single warning Fp8KVCacheMethod gives)."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        from .kv_cache import warn_default_scales

        layers = get_layers_from_vllm_config(self.vllm_config, Attention, layer_names)
        for name, layer in layers.items():
            if str(layer.kv_cache_dtype) in FP8_KV_DTYPES and not hasattr(layer, "_fp8b_loaded"):
                warn_default_scales(name)
                return

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CPUAttentionMetadata:
        if not self.own:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise NotImplementedError("fp8-backend attention: only causal decoder attention is supported")
        return CPUAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            query_start_loc=m.query_start_loc,
            max_seq_len=m.max_seq_len,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            scheduler_metadata=None,
            causal=True,
        )


class Fp8CpuAttentionImpl(CPUAttentionBackendImpl):
    """Cache write and paged attention on fp8_backend.kernels.attention (else vLLM's CPU_ATTN)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.own = (attn_type == AttentionType.DECODER
                    and own_kernels(get_current_vllm_config(), head_size, kv_cache_dtype))
        if not self.own:
            return
        unsupported = [n for n, v in (("ALiBi", alibi_slopes), ("attention sinks", sinks),
                                      ("logits soft-capping", logits_soft_cap or None)) if v is not None]
        if unsupported:
            raise NotImplementedError(
                f"fp8-backend attention does not support {', '.join(unsupported)}; run this model with "
                f"{MODE_ENV}=vllm (vLLM's CPU_ATTN kernels) or a 16-bit KV cache"
            )
        if kv_cache_dtype not in FP8_KV_DTYPES + ("auto", "bfloat16", "float16", "float32"):
            raise NotImplementedError(f"fp8-backend attention: kv_cache_dtype {kv_cache_dtype!r} is not supported")
        from ..kernels import attention as ops

        self._ops = ops
        logger.info(
            "fp8-backend: attention on fp8-backend kernels (kv_cache_dtype=%s, %s path, head size %d)",
            kv_cache_dtype, ops.attention_path(head_size, self._cache_dtype(kv_cache_dtype)), head_size,
        )

    @staticmethod
    def _cache_dtype(kv_cache_dtype: str) -> torch.dtype:
        return _cache_dtype(kv_cache_dtype, get_current_vllm_config())

    def _scales(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        k = getattr(layer, "_fp8b_k_heads", None)
        v = getattr(layer, "_fp8b_v_heads", None)
        if k is None:
            k = torch.tensor([layer._k_scale_float], dtype=torch.float32)
        if v is None:
            v = torch.tensor([layer._v_scale_float], dtype=torch.float32)
        return k, v

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if not self.own:
            if getattr(layer, "_fp8b_k_heads", None) is not None:
                raise NotImplementedError(
                    "per-head KV-cache scales need fp8-backend's attention kernels, which this engine does not "
                    f"use ({attention_choice(get_current_vllm_config(), self.head_size, self.kv_cache_dtype).reason}); "
                    f"set {MODE_ENV}=all to use them"
                )
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fp8-backend attention: fused output quantization is not supported")
        if attn_metadata is None:
            return output
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = _split_cache(kv_cache)
        k_scale, v_scale = self._scales(layer)
        self._ops.paged_attention(
            query[:n].view(n, self.num_heads, self.head_size), key_cache, value_cache,
            attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table,
            self.scale, self.kv_cache_dtype, k_scale, v_scale, self.sliding_window,
            out=output[:n].view(n, self.num_heads, self.head_size),
        )
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.own:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        key_cache, value_cache = _split_cache(kv_cache)
        n = min(key.shape[0], slot_mapping.shape[0])
        k_scale, v_scale = self._scales(layer)
        self._ops.kv_cache_write(key[:n], value[:n], key_cache, value_cache, slot_mapping[:n],
                                 self.kv_cache_dtype, k_scale, v_scale)


class Fp8CpuAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU_ATTN backend with fp8-backend's FP8 KV-cache kernels (same name and layout)."""

    @staticmethod
    def get_impl_cls() -> type[Fp8CpuAttentionImpl]:
        return Fp8CpuAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[Fp8CpuAttentionMetadataBuilder]:
        return Fp8CpuAttentionMetadataBuilder


BACKEND_PATH = f"{__name__}.{Fp8CpuAttentionBackend.__qualname__}"
