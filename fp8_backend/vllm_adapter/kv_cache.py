"""Fp8KVCacheMethod: the attention layers' k/v scales from every checkpoint convention.

Sources, all ending in ``layer._k_scale`` / ``_v_scale`` (+ the ``*_float`` copies vLLM's
backends read, and ``layer._fp8b_k_heads`` / ``_fp8b_v_heads`` for per-head scales):
- ``self_attn.k_scale`` / ``v_scale`` (compressed-tensors, vLLM, ModelOpt; per tensor or per kv
  head for compressed-tensors ``attn_head``), ``k_proj.output_scale`` / ``v_proj.output_scale``
  (AutoFP8; mapped by Fp8Config.get_cache_scale_mapper), the deprecated ``kv_scale`` (both);
- kv_cache_scales.json (per TP rank, per layer; ``$FP8_BACKEND_KV_CACHE_SCALES`` or the model
  directory), which wins over tensors.
Absent scales are 1.0 with one warning per process; a loaded scale that is not finite or not
> 0 is refused at engine start, naming the layer.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

from ..formats.checkpoint import CheckpointFormatError, KVCacheScheme
from ..formats.kv_scales import find_kv_scales_file, load_kv_scales_json
from ..formats.layer_tensors import kv_scale_role, validate_kv_scale
from ..numerics import KV_CACHE_FP8_DTYPES
from . import settings

logger = logging.getLogger("vllm.fp8_backend")

_warned_default = False
_json_cache: dict[tuple[str, int], dict[int, float]] = {}


def _tp() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no distributed state (unit use)
        return 0, 1


def warn_default_scales(layer_name: str) -> None:
    """The one warning (per process) that an FP8 KV cache runs with the default scales 1.0."""
    global _warned_default
    if not _warned_default:
        logger.warning(
            "fp8-backend: no KV-cache scales in the checkpoint (self_attn.k_scale/v_scale, "
            "k_proj/v_proj.output_scale, kv_scale or kv_cache_scales.json): using 1.0 for "
            "%s and every other such layer",
            layer_name,
        )
        _warned_default = True


def _scale_name(layer: torch.nn.Module, name: str) -> str:
    """The checkpoint's name for a KV scale of attention layer ``layer`` ("model.layers.1.self_attn.
    k_scale"), and the parameter it loads into."""
    param = f"{getattr(layer, 'layer_name', '?')}.{name}"
    parent = param.rsplit(".", 2)[0] if param.count(".") >= 2 else param
    if name in ("k_scale", "v_scale"):
        return f"{parent}.{name} (or {parent}.{name[0]}_proj.output_scale; loaded into {param})"
    return param


def _stores_kv_scale(quant_config, attention: str) -> bool:
    """True if the checkpoint stores the deprecated one-for-both ``kv_scale`` of attention module
    ``attention`` (formats.kv_scale_role over the stored tensor names; True when they are not
    known)."""
    stored = getattr(quant_config, "tensor_names", None)
    if stored is None:
        return True
    return any(kv_scale_role(n) == (attention, "kv") for n in stored)


class Fp8KVCacheMethod(BaseKVCacheMethod):
    """vLLM's KV-scale parameters, with validation, per-head scales and kv_cache_scales.json."""

    def create_weights(self, layer: torch.nn.Module) -> None:
        super().create_weights(layer)
        layer._fp8b_loaded = set()
        for name in ("k_scale", "v_scale", "q_scale", "prob_scale"):
            param = getattr(layer, name)
            # vLLM creates these with torch's default dtype, which is the model dtype while the
            # model is built: a bf16 model would round its checkpoint's fp32 scales to bf16.
            param.data = torch.full((), -1.0, dtype=torch.float32)
            param.weight_loader = self._loader(layer, name)

    def _loader(self, layer: torch.nn.Module, name: str):
        def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
            where = _scale_name(layer, name)
            ckpt = getattr(self.quant_config, "checkpoint", None)
            kv = getattr(ckpt, "kv_cache", None) if name in ("k_scale", "v_scale") else None
            if kv is None and name in ("k_scale", "v_scale") and loaded.numel() > 1:
                kv = KVCacheScheme("head")  # undeclared per-head scales (vLLM's own convention)
            rank, world = _tp()
            heads = getattr(layer, "num_kv_heads", None)
            # dtype, finite and > 0, and shape: one scale, or one per kv head where declared.
            s = validate_kv_scale(where, loaded.detach(), kv, None if heads is None else heads * world)
            if s.dim() == 1:  # per kv head (compressed-tensors attn_head): this rank's heads
                n = s.numel() // world
                s = s[rank * n : (rank + 1) * n]
                setattr(layer, f"_fp8b_{name[0]}_heads_loaded", s.clone())
                param.data.copy_(s.max())
            else:
                param.data.copy_(s)
            layer._fp8b_loaded.add(name)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not hasattr(layer, "k_scale"):
            return super().process_weights_after_loading(layer)
        name = getattr(layer, "layer_name", "attention layer")
        loaded = getattr(layer, "_fp8b_loaded", set())
        if len(loaded & {"k_scale", "v_scale"}) == 1:
            # One of the pair. vLLM loads the deprecated kv_scale (one scale for both) into
            # k_scale, so a lone k_scale is fine when the checkpoint stores a kv_scale; anything
            # else lost its partner (served, v would silently take k's scale, or vLLM asserts).
            lost = ({"k_scale", "v_scale"} - loaded).pop()
            parent = getattr(layer, "layer_name", "?").rsplit(".", 1)[0]
            if lost == "k_scale" or not _stores_kv_scale(self.quant_config, parent):
                raise CheckpointFormatError(
                    f"{_scale_name(layer, lost)}: expected in the checkpoint with its partner, found "
                    f"only {(loaded & {'k_scale', 'v_scale'}).pop()} (and no deprecated {parent}.kv_scale)"
                )
        json_scale = self._json_scale(layer)
        fp8 = str(getattr(layer, "kv_cache_dtype", "auto")) in KV_CACHE_FP8_DTYPES
        k_heads = getattr(layer, "_fp8b_k_heads_loaded", None)
        v_heads = getattr(layer, "_fp8b_v_heads_loaded", None)
        if json_scale is not None:
            if loaded & {"k_scale", "v_scale"}:
                logger.info("fp8-backend: %s: kv_cache_scales.json overrides the checkpoint's k/v scales", name)
            with torch.no_grad():
                layer.k_scale.fill_(json_scale)
                layer.v_scale.fill_(json_scale)
            k_heads = v_heads = None
        elif fp8 and not (loaded & {"k_scale", "v_scale"}):
            warn_default_scales(name)
        elif "k_scale" in loaded and "v_scale" not in loaded:  # deprecated kv_scale -> both
            v_heads = k_heads
            with torch.no_grad():
                layer.v_scale.copy_(layer.k_scale)
        super().process_weights_after_loading(layer)
        # Per-head scales (only this project's attention backend reads them).
        layer._fp8b_k_heads = k_heads if fp8 else None
        layer._fp8b_v_heads = v_heads if fp8 else None

    @staticmethod
    def _json_scale(layer: torch.nn.Module) -> float | None:
        from vllm.config import get_current_vllm_config
        from vllm.model_executor.models.utils import extract_layer_index

        cfg = get_current_vllm_config()
        model_dir = getattr(cfg.model_config, "model", None) if cfg.model_config is not None else None
        path = find_kv_scales_file(model_dir, settings.kv_scales_file(), settings.KV_SCALES_ENV)
        if path is None:
            return None
        rank, _ = _tp()
        key = (str(path), rank)
        if key not in _json_cache:
            _json_cache[key] = load_kv_scales_json(path, rank)
            logger.info("fp8-backend: KV-cache scales from %s (rank %d)", path, rank)
        scales = _json_cache[key]
        idx = extract_layer_index(getattr(layer, "layer_name", ""))
        num_layers = getattr(cfg.model_config.hf_text_config, "num_hidden_layers", None)
        if num_layers is not None:  # the file must be for this model: no layer left out or extra
            load_kv_scales_json(path, rank, num_layers)
        if idx not in scales:
            raise ValueError(f"fp8-backend: {path}: no KV-cache scale for layer {idx} ({layer.layer_name}) on rank {rank}")
        return scales[idx]
