"""Reading input safetensors shards tensor by tensor and writing output shards of bounded size.

Input tensors are read one at a time through ``safe_open`` (memory-mapped), and output tensors
are buffered only until ``max_shard_bytes`` is reached, then written: peak memory is about two
output shards (the buffer, and save_file's serialized copy of it; default 2 GiB each; a layer
when set that low) plus the tensor being converted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..formats.safetensors_files import INDEX
from .options import QuantizeError

__all__ = ["INDEX", "ShardReader", "ShardWriter", "input_shards", "shard_keys"]


def input_shards(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        raise QuantizeError(f"model_dir: expected a model directory, found no directory at {str(model_dir)!r}")
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        found = sorted(p.name for p in model_dir.iterdir())[:12]
        raise QuantizeError(
            f"model_dir: expected *.safetensors weight files in {str(model_dir)!r}, found none "
            f"(files: {found}); convert .bin checkpoints to safetensors first"
        )
    return shards


def shard_keys(shard: Path) -> list[str]:
    """The tensor names of ``shard``; a truncated or corrupt file raises QuantizeError naming it."""
    try:
        with safe_open(str(shard), framework="pt") as f:
            keys = list(f.keys())
        size = shard.stat().st_size
        with shard.open("rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(header))
        end = max((v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__"), default=0)
        if 8 + header + end > size:
            raise QuantizeError(
                f"{shard}: truncated safetensors file, expected {8 + header + end} bytes, found {size}"
            )
        return keys
    except QuantizeError:
        raise
    except Exception as e:  # SafetensorError, OSError, JSON errors
        raise QuantizeError(f"{shard}: expected a readable safetensors file, found an error: {e}") from None


class ShardReader:
    """One open input shard; :meth:`get` reads one tensor (errors name the file and tensor)."""

    def __init__(self, shard: Path):
        self.shard = shard
        self._cm = safe_open(str(shard), framework="pt")
        self._f = self._cm.__enter__()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except Exception as e:
            raise QuantizeError(f"{self.shard}: cannot read tensor {name!r}: {e}") from None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


class ShardWriter:
    """Buffers output tensors and writes a shard whenever the buffer exceeds ``max_bytes``;
    :meth:`finish` names the shards model-0000i-of-0000N (or model.safetensors) and writes the
    index when there are several."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.buffer or any(name in keys for _, keys in self.parts):
            raise QuantizeError(f"output tensor {name!r} written twice")
        self.buffer[name] = t.contiguous()
        n = t.numel() * t.element_size()
        self.size += n
        self.total += n
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out_dir / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, keys), name in zip(self.parts, names):
            path.rename(self.out_dir / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))
        return names
