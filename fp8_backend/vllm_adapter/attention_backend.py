"""fp8-backend's CPU attention backend: FP8 KV cache written and read by this project's kernels.

A subclass of vLLM's CPU_ATTN backend with the same KV-cache layout ([num_blocks, kv_heads,
block_size, 2 * head_size], K then V per block), registered under vLLM's ``CPU_ATTN`` name (the
CPU platform always asks for that name) and under ``CUSTOM``. Which kernels a run uses is one
decision for the whole engine (:func:`own_kernels`):
- ``FP8_BACKEND_ATTENTION=auto`` (default): this project's kernels when kv_cache_dtype is fp8 /
  fp8_e4m3 / fp8_e5m2 (RNE cache write, FP8 read in registers, per-head scales), vLLM's own
  CPU_ATTN kernels for 16-bit caches;
- ``all`` (or ``attention_config={"backend": "CUSTOM"}``): this project's kernels for every cache;
- ``vllm``: vLLM's kernels for everything (for comparisons).
Encoder / cross attention always stays with vLLM's kernels; ALiBi, soft-capping and sinks are
refused at engine start when this project's kernels are in use.
"""

from __future__ import annotations

import logging
import os

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

logger = logging.getLogger("vllm.fp8_backend")

MODE_ENV = "FP8_BACKEND_ATTENTION"
MODES = ("auto", "all", "vllm")
FP8_KV_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")


def attention_mode(vllm_config: VllmConfig | None = None) -> str:
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto" and vllm_config is not None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if getattr(vllm_config.attention_config, "backend", None) == AttentionBackendEnum.CUSTOM:
            mode = "all"
    return mode


def own_kernels(vllm_config: VllmConfig) -> bool:
    """Whether this engine's decoder attention runs on fp8-backend's kernels."""
    mode = attention_mode(vllm_config)
    if mode == "all":
        return True
    return mode == "auto" and str(vllm_config.cache_config.cache_dtype) in FP8_KV_DTYPES


def _split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, h, bs, _ = kv_cache.shape
    return kv_cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)


class Fp8CpuAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU builder, minus its scheduler metadata (and ISA checks) when our kernels run."""

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        self.own = own_kernels(vllm_config) and not isinstance(
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
        self.own = own_kernels(get_current_vllm_config()) and attn_type == AttentionType.DECODER
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
        """Element dtype of the cache (uint8 for FP8; the model dtype for "auto")."""
        if kv_cache_dtype in FP8_KV_DTYPES:
            return torch.uint8
        if kv_cache_dtype == "auto":
            model = get_current_vllm_config().model_config
            return model.dtype if model is not None else torch.bfloat16
        return getattr(torch, kv_cache_dtype)

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
                raise NotImplementedError("per-head KV-cache scales need fp8-backend's attention kernels")
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
