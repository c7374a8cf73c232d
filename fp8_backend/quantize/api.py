"""``quantize(model_dir, out_dir, ...)``: a 16-bit safetensors model → an FP8 checkpoint.

Order of work (so memory stays bounded): validate options and inputs; calibrate if the scheme
needs it (static input scales, KV scales), freeing the model afterwards; then stream every input
shard tensor by tensor, quantizing the linear weights, into a temporary directory that is renamed
to ``out_dir`` only when everything is written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import numerics
from ..formats.checkpoint import CheckpointFormatError
from ..formats.safetensors_files import check_safetensors_files
from .config import quantization_config
from .layers import model_layers, quantized_layers
from .options import QuantizeError, QuantizeOptions
from .output import atomic_output_dir, check_out_dir
from .shards import INDEX, ShardReader, ShardWriter, input_shards, shard_keys
from .weights import quantize_weight

#: Other weight formats: not copied (they would hold the stale 16-bit weights).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


@dataclass
class QuantizeReport:
    out_dir: Path
    quantization_config: dict
    quantized: list[str]
    ignored: list[str]
    shards: list[str]
    sse: float = 0.0  #: summed squared weight quantization error with the chosen scales
    sse_amax: float = 0.0  #: the same with plain amax scales (equal unless scale_search="mse")
    input_amax: dict[str, float] = field(default_factory=dict)
    kv_amax: dict[str, float] = field(default_factory=dict)
    #: mixture-of-experts blocks whose experts were written 16-bit (name, number of experts)
    moe_16bit: list[tuple[str, int]] = field(default_factory=list)

    @property
    def mse_ratio(self) -> float:
        """sse / sse_amax: below 1 when the scale search helped (never above 1)."""
        return self.sse / self.sse_amax if self.sse_amax else 1.0


def _scalar(v: float, ct: bool) -> torch.Tensor:
    s = numerics.compute_scale(torch.tensor(v, dtype=torch.float32))
    return s.reshape(1) if ct else s.reshape(())


def quantize(model_dir, out_dir, scheme: str = "dynamic", format: str = "autofp8", per_channel: bool = False,
             kv_cache: bool = False, calib: str | None = None, num_samples: int = 32, seq_len: int = 256,
             ignore: list[str] | tuple[str, ...] = (), scale_search: str = "none", force: bool = False,
             max_shard_bytes: int = 2 << 30, progress: bool = True) -> QuantizeReport:
    """Write an FP8 checkpoint of ``model_dir`` to ``out_dir``; see :class:`QuantizeOptions`."""
    opts = QuantizeOptions(scheme=scheme, format=format, per_channel=per_channel, kv_cache=kv_cache,
                           ignore=tuple(ignore), scale_search=scale_search, calib=calib,
                           num_samples=num_samples, seq_len=seq_len, max_shard_bytes=max_shard_bytes)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg_path = model_dir / "config.json"
    try:
        json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise QuantizeError(f"{cfg_path}: expected the model's config.json as JSON, found {type(e).__name__}: {e}") from None
    shards = input_shards(model_dir)
    try:  # a truncated or corrupt shard is named now, not mid-way
        check_safetensors_files(model_dir)
    except CheckpointFormatError as e:
        raise QuantizeError(f"model_dir: {e}") from None
    check_out_dir(out_dir, model_dir, force)
    keys = {s: shard_keys(s) for s in shards}
    layers = model_layers(model_dir)
    quant, ignored, unmatched = quantized_layers(layers, opts.all_ignores)
    unmatched = [p for p in unmatched if p not in opts.ignore_default]
    if unmatched:
        raise QuantizeError(f"ignore: patterns {unmatched} match none of the model's linear layers "
                            f"(e.g. {list(layers.linear[:3])})")
    stored = {k for ks in keys.values() for k in ks}
    missing = [f"{n}.weight" for n in quant if f"{n}.weight" not in stored]
    if missing:
        raise QuantizeError(f"model_dir: expected weights of linear layers {missing[:4]} in the safetensors "
                            f"files, found them missing ({len(missing)} missing)")
    if opts.kv_cache and not layers.attention:
        raise QuantizeError("kv_cache: expected attention layers with k_proj / v_proj, found none in this model")
    if opts.calib is not None:
        from .corpus import load_texts
        load_texts(opts.calib)  # an empty or missing file fails now, not after loading the model

    input_amax: dict[str, float] = {}
    kv_amax: dict[str, float] = {}
    if opts.needs_calibration:
        from .calibration import calibrate
        input_amax, kv_amax = calibrate(model_dir, quant, list(layers.attention), opts, progress)

    ct = opts.format == "compressed-tensors"
    qcfg = quantization_config(opts, ignored)
    report = QuantizeReport(out_dir, qcfg, quant, ignored, [], input_amax=input_amax, kv_amax=kv_amax,
                            moe_16bit=list(layers.moe))
    quant_set = set(quant)
    with atomic_output_dir(out_dir, force) as tmp:
        writer = ShardWriter(tmp, opts.max_shard_bytes)
        total = sum(len(v) for v in keys.values())
        with tqdm(total=total, desc="quantizing", unit="tensor", disable=not progress) as bar:
            for shard, names in keys.items():
                with ShardReader(shard) as reader:
                    _convert_shard(reader, names, quant_set, opts, input_amax, ct, writer, report, bar)
        for attn in layers.attention if opts.kv_cache else ():
            for proj, short in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
                writer.add(f"{attn}.{short}", _scalar(kv_amax[f"{attn}.{proj}"], ct))
        report.shards = writer.finish()
        _copy_other_files(model_dir, tmp)
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return report


def _convert_shard(reader, names, quant_set, opts, input_amax, ct, writer, report, bar) -> None:
    """Quantize the linear weights among ``names`` (one input shard), pass the rest through."""
    for name in names:
        t = reader.get(name)
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        if layer in quant_set:
            tensors, sse, sse_amax = quantize_weight(t, layer, opts)
            report.sse += sse
            report.sse_amax += sse_amax
            for n, v in tensors.items():
                writer.add(n, v)
            if opts.scheme == "static":
                writer.add(f"{layer}.input_scale", _scalar(input_amax[layer], ct))
        else:
            writer.add(name, t)
        del t
        bar.update(1)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat templates, README, ...: everything but the weights,
    the old index and config.json (rewritten)."""
    for p in src.iterdir():
        if p.name in ("config.json", INDEX) or p.name.endswith(_SKIP_SUFFIXES) or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
