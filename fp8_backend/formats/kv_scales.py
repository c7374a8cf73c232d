"""kv_cache_scales.json: the older vLLM ``quantization_param_path`` file of per-layer KV scales.

Schema (vLLM's former QuantParamSchema)::

    {"model_type": "llama",
     "kv_cache": {"dtype": "float8_e4m3fn",
                  "scaling_factor": {"<tp rank>": {"<layer index>": <float>, ...}, ...}}}

One float per layer serves as both k and v scale. No vLLM import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointFormatError
from .layer_tensors import check_scale

KV_SCALES_FILE = "kv_cache_scales.json"


def find_kv_scales_file(model_dir: str | os.PathLike | None, named: str | None = None,
                        field: str = "kv_cache_scales") -> Path | None:
    """``named`` if given (must exist; ``field`` says where the name came from, e.g. the
    environment variable), else ``<model_dir>/kv_cache_scales.json`` if present, else None."""
    if named:
        p = Path(named)
        if not p.is_file():
            raise CheckpointFormatError(f"{field}={named!r}: no such file")
        return p
    if model_dir is not None:
        p = Path(model_dir) / KV_SCALES_FILE
        if p.is_file():
            return p
    return None


def load_kv_scales_json(path: str | os.PathLike, tp_rank: int = 0, num_layers: int | None = None) -> dict[int, float]:
    """{layer index: scale} for ``tp_rank``; every scale finite and > 0, every layer below
    ``num_layers`` present when given."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"{where}: expected a JSON file of KV-cache scales, found one that cannot be read ({e})"
        ) from None
    kv = data.get("kv_cache") if isinstance(data, dict) else None
    if not isinstance(kv, dict) or not isinstance(kv.get("scaling_factor"), dict):
        raise CheckpointFormatError(f"{where}: expected {{'kv_cache': {{'dtype': ..., 'scaling_factor': {{rank: {{layer: scale}}}}}}}}")
    dtype = kv.get("dtype", "float8_e4m3fn")
    if dtype not in ("float8_e4m3fn", "float8_e4m3", "fp8_e4m3", "fp8"):
        raise CheckpointFormatError(f"{where}: kv_cache.dtype: expected float8_e4m3fn, found {dtype!r}")
    ranks = kv["scaling_factor"]
    if str(tp_rank) not in ranks:
        raise CheckpointFormatError(
            f"{where}: kv_cache.scaling_factor has no entry for tensor-parallel rank {tp_rank} "
            f"(found ranks {sorted(ranks)})"
        )
    out: dict[int, float] = {}
    for layer, value in ranks[str(tp_rank)].items():
        try:
            idx, s = int(layer), float(value)
        except (TypeError, ValueError):
            raise CheckpointFormatError(f"{where}: rank {tp_rank} layer {layer!r}: expected an int key and a float, found {value!r}") from None
        check_scale(f"{where}: rank {tp_rank} layer {idx} KV-cache scale", torch.tensor(s, dtype=torch.float64))
        out[idx] = s
    if num_layers is not None:
        missing = [i for i in range(num_layers) if i not in out]
        if missing:
            raise CheckpointFormatError(f"{where}: rank {tp_rank}: no KV-cache scale for layers {missing[:8]} (of {num_layers})")
        extra = sorted(i for i in out if not 0 <= i < num_layers)
        if extra:
            raise CheckpointFormatError(
                f"{where}: rank {tp_rank}: expected KV-cache scales for the model's {num_layers} layers "
                f"(0..{num_layers - 1}), found scales for layers {extra[:8]} too: a file made for another model?"
            )
    return out
