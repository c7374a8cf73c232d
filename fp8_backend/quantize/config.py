"""The ``quantization_config`` written into config.json, per output format.

AutoFP8 / vLLM "fp8" is a small dict; compressed-tensors is built with the compressed-tensors
library's own pydantic models (QuantizationConfig / QuantizationScheme / QuantizationArgs), so
the library's parser accepts what is written.
"""

from __future__ import annotations

from typing import Any

from .options import QuantizeOptions


def autofp8_config(opts: QuantizeOptions, ignored: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "quant_method": "fp8",
        "activation_scheme": "static" if opts.scheme == "static" else "dynamic",
        "ignored_layers": ignored,
    }
    if opts.scheme == "block":
        cfg["weight_block_size"] = list(opts.block_size)
    if opts.kv_cache:
        cfg["kv_cache_scheme"] = "static"  # AutoFP8's marker; tensors self_attn.k_scale / v_scale
    return cfg


def compressed_tensors_config(opts: QuantizeOptions, ignored: list[str]) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def fp8(**kw) -> QuantizationArgs:
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, **kw)

    if opts.scheme == "block":
        weights = fp8(strategy="block", block_structure=list(opts.block_size), dynamic=False)
        inputs = fp8(strategy="group", group_size=opts.block_size[1], dynamic=True)
    else:
        weights = fp8(strategy="channel" if opts.per_channel else "tensor", dynamic=False)
        if opts.scheme == "static":
            inputs = fp8(strategy="tensor", dynamic=False)  # preset FP8 (per-channel: FP8 + channel)
        else:
            inputs = fp8(strategy="token", dynamic=True)  # preset FP8_DYNAMIC style
    kv = fp8(strategy="tensor", dynamic=False) if opts.kv_cache else None
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)},
        format="float-quantized",
        quantization_status="compressed",
        ignore=ignored,
        kv_cache_scheme=kv,
    )
    return qc.model_dump(mode="json")


def quantization_config(opts: QuantizeOptions, ignored: list[str]) -> dict[str, Any]:
    """``ignored``: the module names left 16-bit (lm_head always among them)."""
    if opts.format == "autofp8":
        return autofp8_config(opts, ignored)
    return compressed_tensors_config(opts, ignored)
