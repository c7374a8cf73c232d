"""Writing FP8 checkpoints: the ``quantization_config`` and tensor names a
:class:`~fp8_backend.formats.checkpoint.CheckpointScheme` stands for, the inverse of
:func:`~fp8_backend.formats.checkpoint.parse_quantization_config` (``parse(write(s)) == s``).

The producer (fp8_backend.quantize) writes through here, so what it writes is what the loader
parses: one place for the names ("weight_scale" or the "fp8" format's block "weight_scale_inv",
"input_scale", "k_scale" / "v_scale"), the scalar shape ([] in the "fp8" format, [1] in
compressed-tensors) and the config. No vLLM import; compressed-tensors is imported lazily.
"""

from __future__ import annotations

from typing import Any, Sequence

from .checkpoint import CheckpointFormatError, CheckpointScheme, KVCacheScheme

#: Producer format names -> CheckpointScheme.source.
WRITER_FORMATS = {"autofp8": "fp8", "compressed-tensors": "compressed-tensors"}


def producer_scheme(
    fmt: str,
    weight_strategy: str,
    activation_scheme: str,
    *,
    block_size: Sequence[int] = (128, 128),
    kv_cache: bool = False,
    ignore: Sequence[str] = (),
) -> CheckpointScheme:
    """The scheme of a checkpoint the producer writes: ``fmt`` "autofp8" (AutoFP8 / vLLM "fp8")
    or "compressed-tensors"; ``weight_strategy`` "tensor" | "channel" | "block";
    ``activation_scheme`` "static" (per-tensor input scales) or "dynamic" (per token; 1 x K-block
    groups with block weights). Equal to what the parser returns for the written config."""
    if fmt not in WRITER_FORMATS:
        raise CheckpointFormatError(f"format: expected one of {list(WRITER_FORMATS)}, found {fmt!r}")
    source = WRITER_FORMATS[fmt]
    if source == "fp8" and weight_strategy == "channel":
        raise CheckpointFormatError(
            "weight_strategy: the 'fp8' format stores one weight scale per tensor or 128x128 "
            "blocks; expected 'tensor' or 'block', found 'channel' (use compressed-tensors)"
        )
    block = tuple(block_size) if weight_strategy == "block" else None
    static = activation_scheme == "static"
    if block is not None:
        act_strategy, group = "group", block[1]
    else:
        act_strategy, group = ("tensor" if static else "token"), None
    return CheckpointScheme(
        source=source,
        storage_format="fp8" if source == "fp8" else "float-quantized",
        weight_strategy=weight_strategy,
        block_size=block,  # type: ignore[arg-type]
        activation_scheme=activation_scheme,
        activation_strategy=act_strategy,
        activation_group_size=group,
        ignore=tuple(ignore),
        kv_cache=KVCacheScheme("tensor") if kv_cache else None,
        weight_scale_name="weight_scale_inv" if source == "fp8" and block else "weight_scale",
        input_scale_name="input_scale" if static else None,
    )


def quantization_config(scheme: CheckpointScheme) -> dict[str, Any]:
    """The ``quantization_config`` dict (for config.json) that parses back to ``scheme``."""
    if scheme.source == "fp8":
        return _fp8_config(scheme)
    return _compressed_tensors_config(scheme)


def _fp8_config(s: CheckpointScheme) -> dict[str, Any]:
    if s.weight_strategy == "channel" or s.activation_scheme == "none":
        raise CheckpointFormatError(
            f"the 'fp8' format: expected per-tensor or block weights with static or dynamic "
            f"activations, found {s.weight_strategy} weights, {s.activation_scheme} activations"
        )
    cfg: dict[str, Any] = {
        "quant_method": "fp8",
        "activation_scheme": s.activation_scheme,
        "ignored_layers": list(s.ignore),
    }
    if s.block_size is not None:
        cfg["weight_block_size"] = list(s.block_size)
    if s.kv_cache is not None:
        cfg["kv_cache_scheme"] = "static"  # AutoFP8's marker; tensors self_attn.k_scale / v_scale
    return cfg


def _compressed_tensors_config(s: CheckpointScheme) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def fp8(**kw) -> QuantizationArgs:
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, **kw)

    if s.block_size is not None:
        weights = fp8(strategy="block", block_structure=list(s.block_size), dynamic=False)
    else:
        weights = fp8(strategy=s.weight_strategy, dynamic=False)
    if s.activation_scheme == "none":
        inputs = None
    elif s.activation_strategy == "group":
        inputs = fp8(strategy="group", group_size=s.activation_group_size, dynamic=True)
    else:
        inputs = fp8(strategy=s.activation_strategy, dynamic=s.activation_scheme == "dynamic")
    kv = None
    if s.kv_cache is not None:
        kv = fp8(strategy="attn_head" if s.kv_cache.strategy == "head" else "tensor", dynamic=False)
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=list(s.targets), weights=weights,
                                                     input_activations=inputs)},
        format=s.storage_format,
        quantization_status="compressed",
        ignore=list(s.ignore),
        kv_cache_scheme=kv,
    )
    return qc.model_dump(mode="json")


__all__ = ["WRITER_FORMATS", "producer_scheme", "quantization_config"]
