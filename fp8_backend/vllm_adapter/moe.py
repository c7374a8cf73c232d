"""Mixture-of-experts layers delegated to vLLM's own method, and the expert-tensor checks.

* Delegated (FP8 checkpoints where vLLM's own MoE method runs): the method vLLM alone would
  build, from vLLM's own config class and the same ``quantization_config``, so the layer is
  created, loaded and run exactly as without the plugin. fp8-backend only adds its checks on the
  expert tensors as they load (an expert weight that is not FP8, a non-finite scale, an expert
  missing from the checkpoint): vLLM's loader would copy a 16-bit tensor into an FP8 parameter,
  or leave a scale at its initial value, without a word.
* fp8-backend's own method (moe_method.Fp8FusedMoEMethod) gets the same checks, through the
  same wrapper, for checkpoints; online ``quantization="fp8"`` quantizes experts as they load.
* Anything else is refused at load with the rule's sentence.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..formats.checkpoint import CheckpointFormatError
from ..formats.layer_tensors import check_fp8_weight, check_scale
from .layer_owner import UnsupportedLayerError

logger = logging.getLogger("vllm.fp8_backend")


def vllm_config_for(fmt: str, quantization_config: dict[str, Any]):
    """vLLM's own QuantizationConfig for a checkpoint's ``quantization_config``."""
    if fmt == "fp8":
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config

        return Fp8Config.from_config(quantization_config)
    if fmt == "compressed-tensors":
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )

        return CompressedTensorsConfig.from_config(quantization_config)
    raise ValueError(f"vllm_config_for: no vLLM config for format {fmt!r}")


def check_vllm_cpu_moe_parallelism(layer: torch.nn.Module, prefix: str, what: str) -> None:
    """Refuse, naming the layer, to hand an MoE layer to vLLM's own CPU experts under expert
    parallelism: vLLM 0.32's CPU MoE kernels (cpu_fused_moe, CPUExpertsFp8) are given the
    global expert ids and no expert map, and read past the rank's experts (a segfault at the
    first forward). fp8-backend's FP8 MoE method maps the ids and serves expert parallelism."""
    from .config import platform_name

    parallel = getattr(getattr(layer, "moe_config", None), "moe_parallel_config", None)
    if getattr(parallel, "use_ep", False) and platform_name() == "cpu":
        raise UnsupportedLayerError(
            f"{prefix}: expert parallelism (enable_expert_parallel=True) on CPU: this layer would run "
            f"vLLM's own CPU MoE ({what}), which in vLLM 0.32 ignores the expert map and crashes; expected "
            f"FP8 experts served by fp8-backend (which supports expert parallelism) or no expert "
            f"parallelism, found {what}"
        )


def unquantized_moe_method(layer: torch.nn.Module, prefix: str):
    """vLLM's 16-bit MoE method for a layer left unquantized (checked as above)."""
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod

    check_vllm_cpu_moe_parallelism(layer, prefix, "16-bit experts: the layer is ignored or not quantized")
    return UnquantizedFusedMoEMethod(layer.moe_config)


def delegated_moe_method(vllm_config, layer: torch.nn.Module, prefix: str, fmt: str, fp8_dtype: torch.dtype):
    """vLLM's own method for MoE layer ``prefix``, with fp8-backend's tensor checks attached."""
    check_vllm_cpu_moe_parallelism(layer, prefix, f"vLLM's {fmt} MoE method")
    try:
        method = vllm_config.get_quant_method(layer, prefix)
    except (ValueError, NotImplementedError) as e:
        raise UnsupportedLayerError(
            f"{prefix}: vLLM's own {fmt} mixture-of-experts method cannot serve this layer here: {e}"
        ) from e
    if method is None:
        raise UnsupportedLayerError(f"{prefix}: vLLM's {fmt} config has no method for this layer")
    attach_expert_checks(method, prefix, fp8_dtype)
    return method


# Checkpoint tensor name suffixes, by what the loader fills: FP8 weights and their scales.
_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")


def attach_expert_checks(method, prefix: str, fp8_dtype: torch.dtype) -> None:
    """Wrap ``method``'s create_weights (so every expert tensor passes fp8-backend's checks as it
    loads, and which ones arrived is recorded) and process_weights_after_loading (so an expert
    tensor the checkpoint lacks is named before serving). ``method`` stays vLLM's object."""
    create = method.create_weights
    process = method.process_weights_after_loading
    seen: dict[int, dict[tuple[int, str], str]] = {}  # id(param) -> (expert, shard) -> tensor name

    def create_weights(layer, *args, **extra):
        loader = extra.get("weight_loader")
        if loader is not None:
            extra["weight_loader"] = _checked_expert_loader(loader, fp8_dtype, seen, layer)
        return create(layer, *args, **extra)

    def process_weights_after_loading(layer):
        _check_experts_complete(layer, prefix, seen)
        return process(layer)

    method.create_weights = create_weights
    method.process_weights_after_loading = process_weights_after_loading


def checkpoint_tensor_name(layer, weight_name: str, shard_id: str, expert_id: int) -> str:
    """The checkpoint's name of the expert tensor vLLM's loader calls ``weight_name``.

    vLLM's FusedMoE loader is handed the parameter's name with the layer's prefix
    ("model.layers.0.mlp.experts.w13_weight_scale_inv"); the tensor in the checkpoint is
    "model.layers.0.mlp.experts.17.gate_proj.weight_scale_inv" (the model's projection names:
    gate_proj / up_proj / down_proj, Mixtral's w1 / w3 / w2). Names that are not a parameter's
    are returned unchanged."""
    head, _, leaf = weight_name.rpartition(".")
    stem, _, suffix = leaf.partition("_")
    projs = {
        "w1": getattr(layer, "ckpt_gate_proj_name", None),
        "w3": getattr(layer, "ckpt_up_proj_name", None),
        "w2": getattr(layer, "ckpt_down_proj_name", None),
    }
    proj = projs.get(str(shard_id))
    if stem not in ("w13", "w2") or not suffix or not proj:
        return weight_name
    prefix = getattr(layer, "layer_name", None) or head
    return f"{prefix}.{int(expert_id)}.{proj}.{suffix}"


def moe_layer_ignored(layer, prefix: str, patterns, checkpoint_source: str | None = None) -> bool:
    """True if MoE layer ``prefix`` stays 16-bit under the ignore ``patterns`` (online ``ignore``,
    or the ignore list of a checkpoint in format ``checkpoint_source``): formats.scheme's rule
    over the checkpoint names of every expert's projections (``<prefix>.<e>.<gate|up|down>``).
    Patterns that name only some of them (one expert, one projection) are refused, naming the
    patterns and the layer (CheckpointFormatError for a checkpoint's list)."""
    from ..formats.scheme import moe_layer_ignored as rule

    patterns = list(patterns)
    if not patterns:
        return False
    moe = getattr(layer, "moe_config", None)
    n = int(getattr(moe, "num_logical_experts", 0) or getattr(layer, "global_num_experts", 0) or 0)
    projs = [getattr(layer, f"ckpt_{r}_proj_name", None) or f"{r}_proj" for r in ("gate", "up", "down")]
    names = [f"{prefix}.{e}.{p}" for e in range(n) for p in projs]
    if checkpoint_source is None:
        return rule(prefix, patterns, names)
    field = "quantization_config." + ("ignore" if checkpoint_source == "compressed-tensors" else "ignored_layers")
    try:
        return rule(prefix, patterns, names, field)
    except ValueError as e:
        raise CheckpointFormatError(str(e)) from None


def _checked_expert_loader(loader, fp8_dtype, seen, layer):
    def load(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs):
        name = checkpoint_tensor_name(layer, weight_name, shard_id, expert_id)
        if weight_name.endswith(_SCALE_SUFFIXES):
            check_scale(name, loaded_weight)
        elif param.dtype == fp8_dtype:
            check_fp8_weight(name, loaded_weight, fp8_dtype)
        seen.setdefault(id(param), {})[(int(expert_id), str(shard_id))] = name
        return loader(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs)

    return load


# The layer's FP8 expert weights and their weight scales: every expert must bring them.
_REQUIRED = ("_weight", "_weight_scale", "_weight_scale_inv")


def _check_experts_complete(layer, prefix, seen) -> None:
    """Every expert's weight and weight scale, for every shard vLLM loads into them, came from
    the checkpoint; names the first one that did not. Under expert parallelism each rank's
    loader is still handed every expert's tensors (vLLM drops other ranks' experts inside its
    loader, after the wrappers here recorded them), so every global expert is expected."""
    num_experts = int(getattr(layer, "global_num_experts", 0) or getattr(layer, "local_num_experts", 0))
    for name, p in layer.named_parameters(recurse=False):
        if not name.endswith(_REQUIRED):
            continue
        got = seen.get(id(p))
        if not got:
            raise CheckpointFormatError(
                f"{prefix}.{name}: no expert tensor of the checkpoint was loaded into it (expected "
                f"one per expert and shard for {num_experts} experts, dtype {p.dtype})"
            )
        shards = sorted({s for _, s in got})
        for expert in range(num_experts):
            for shard in shards:
                if (expert, shard) in got:
                    continue
                other, example = next((e, n) for (e, s), n in got.items() if s == shard)
                head, _, tail = example.rpartition(f".{other}.")  # the expert index comes last
                missing = f"{head}.{expert}.{tail}"
                raise CheckpointFormatError(
                    f"{missing}: missing from the checkpoint (expected for every one of the "
                    f"{num_experts} experts of {prefix}, as e.g. {example}; found none for expert {expert})"
                )
