"""A model directory's safetensors files, checked before any tensor is loaded.

safetensors' own errors ("Error while deserializing header: incomplete metadata, file not fully
covered") do not say which file: a 30-shard model would leave the user guessing. Here every
error names the file (or the index entry), what was expected and what was found. No vLLM import.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import CheckpointFormatError

INDEX = "model.safetensors.index.json"


def check_safetensors_files(model_dir: str | Path) -> dict[str, str]:
    """Open every safetensors file vLLM would load from ``model_dir`` (the index's shards when
    there is an index, else every ``*.safetensors``); check that each header parses and covers
    the file, that the index names only existing shards and tensors where they are, and that no
    tensor is stored twice. Returns tensor name -> file name."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    index_path = model_dir / INDEX
    weight_map: dict[str, str] | None = None
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointFormatError(
                f"{index_path}: expected JSON with a 'weight_map' object (tensor name -> shard file), "
                f"found {type(e).__name__}: {e}"
            ) from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (model_dir / f).is_file():
                named = sorted(t for t, s in weight_map.items() if s == f)
                raise CheckpointFormatError(
                    f"{index_path}: expected shard file {model_dir / f} (the index names it for "
                    f"{len(named)} tensors, e.g. {named[0]}), found no such file"
                )
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))

    where: dict[str, str] = {}
    for f in files:
        path = model_dir / f
        try:
            with safe_open(str(path), "pt") as h:
                keys = list(h.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointFormatError(
                f"{path}: expected a complete safetensors file, found one that cannot be read "
                f"({e}); it is truncated or corrupt: download or convert it again"
            ) from None
        for k in keys:
            if k in where:
                raise CheckpointFormatError(
                    f"{k}: expected in one file, found stored twice, in {model_dir / where[k]} and "
                    f"in {path}"
                )
            where[k] = f
    if weight_map is not None:
        for t, f in weight_map.items():
            if where.get(t) != f:
                found = f"in {where[t]}" if t in where else "in no shard"
                raise CheckpointFormatError(
                    f"{index_path}: tensor {t}: expected in {f!r} as the index says, found it {found}"
                )
    return where
