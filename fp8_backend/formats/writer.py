"""Writing FP8 checkpoints: the ``quantization_config`` and tensor names a
:class:`~fp8_backend.formats.checkpoint.CheckpointFormat` stands for, the inverse of
:func:`~fp8_backend.formats.checkpoint.parse_quantization_config` (``parse(write(s)) == s``).

The producer (fp8_backend.quantize) writes through here, so what it writes is what the loader
parses: one place for the names ("weight_scale" or the "fp8" format's block "weight_scale_inv",
"input_scale", "k_scale" / "v_scale"), the scalar shape ([] in the "fp8" format, [1] in
compressed-tensors) and the config. No vLLM import; compressed-tensors is imported lazily.
"""

from __future__ import annotations

from typing import Any, Sequence

from .checkpoint import CheckpointFormat, CheckpointFormatError, KVCacheScheme
from .scheme import PER_ROW, PER_TENSOR, Fp8Scheme

#: Producer format names -> CheckpointFormat.source.
WRITER_FORMATS = {"autofp8": "fp8", "compressed-tensors": "compressed-tensors"}


def producer_format(fmt: str, scheme: Fp8Scheme, *, kv_cache: bool = False,
                    ignore: Sequence[str] = ()) -> CheckpointFormat:
    """How the producer stores a checkpoint of ``scheme``: ``fmt`` "autofp8" (AutoFP8 / vLLM
    "fp8") or "compressed-tensors". Equal to what the parser returns for the written config."""
    if fmt not in WRITER_FORMATS:
        raise CheckpointFormatError(f"format: expected one of {list(WRITER_FORMATS)}, found {fmt!r}")
    source = WRITER_FORMATS[fmt]
    if source == "fp8" and scheme.weight == PER_ROW:
        raise CheckpointFormatError(
            "weight scales: the 'fp8' format stores one weight scale per tensor or 128x128 "
            "blocks; expected per-tensor or blocks, found per-channel (use compressed-tensors)"
        )
    return CheckpointFormat(
        source=source,
        storage_format="fp8" if source == "fp8" else "float-quantized",
        scheme=scheme,
        ignore=tuple(ignore),
        kv_cache=KVCacheScheme("tensor") if kv_cache else None,
        weight_scale_name="weight_scale_inv" if source == "fp8" and scheme.weight.cols else "weight_scale",
        input_scale_name="input_scale" if scheme.static_activation else None,
    )


def quantization_config(fmt: CheckpointFormat) -> dict[str, Any]:
    """The ``quantization_config`` dict (for config.json) that parses back to ``fmt``."""
    if fmt.source == "fp8":
        return _fp8_config(fmt)
    return _compressed_tensors_config(fmt)


def _fp8_config(f: CheckpointFormat) -> dict[str, Any]:
    w, a = f.scheme.weight, f.scheme.activation
    if w == PER_ROW or a is None:
        raise CheckpointFormatError(
            f"the 'fp8' format: expected per-tensor or block weights with static or dynamic "
            f"activations, found {f.scheme.describe()}"
        )
    cfg: dict[str, Any] = {
        "quant_method": "fp8",
        "activation_scheme": "static" if a.static else "dynamic",
        "ignored_layers": list(f.ignore),
    }
    if w.cols:
        cfg["weight_block_size"] = [w.rows, w.cols]
    if f.kv_cache is not None:
        cfg["kv_cache_scheme"] = "static"  # AutoFP8's marker; tensors self_attn.k_scale / v_scale
    return cfg


def _ct_strategy(g, role: str) -> dict[str, Any]:
    """compressed-tensors' name for a granularity: strategy (+ block_structure / group_size)."""
    if g == PER_TENSOR:
        return {"strategy": "tensor"}
    if g.cols == 0:
        return {"strategy": "channel" if role == "weight" else "token"}
    if role == "weight":
        return {"strategy": "block", "block_structure": [g.rows, g.cols]}
    return {"strategy": "group", "group_size": g.cols}


def _compressed_tensors_config(f: CheckpointFormat) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def fp8(**kw) -> QuantizationArgs:
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, **kw)

    a = f.scheme.activation
    weights = fp8(dynamic=False, **_ct_strategy(f.scheme.weight, "weight"))
    inputs = None if a is None else fp8(dynamic=not a.static, **_ct_strategy(a.granularity, "activation"))
    kv = None
    if f.kv_cache is not None:
        kv = fp8(strategy="attn_head" if f.kv_cache.strategy == "head" else "tensor", dynamic=False)
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=list(f.targets), weights=weights,
                                                     input_activations=inputs)},
        format=f.storage_format,
        quantization_status="compressed",
        ignore=list(f.ignore),
        kv_cache_scheme=kv,
    )
    return qc.model_dump(mode="json")


__all__ = ["WRITER_FORMATS", "producer_format", "quantization_config"]
