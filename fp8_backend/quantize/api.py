"""``quantize(model_dir, out_dir, ...)``: a 16-bit safetensors model → an FP8 checkpoint.

Order of work (so memory stays bounded): validate options and inputs; calibrate if the scheme
needs it (static input scales, KV scales), freeing the model afterwards; then stream every input
shard tensor by tensor, quantizing the linear weights, into a temporary directory that is renamed
to ``out_dir`` only when everything is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import numerics
from ..formats.checkpoint import CheckpointFormatError
from ..formats.safetensors_files import check_safetensors_files
from ..formats.scheme import match_ignore
from ..formats.writer import quantization_config
from .experts import find_moe_layers, ignore_entries, routers, split_ignored
from .layers import model_layers, quantized_layers
from .options import QuantizeError, QuantizeOptions
from .output import atomic_output_dir, check_out_dir
from .shards import INDEX, ShardReader, ShardWriter, input_shards, shard_keys
from .weights import quantize_weight

#: Other weight formats: not copied (they would hold the stale 16-bit weights).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

logger = logging.getLogger("fp8_backend.quantize")


@dataclass
class QuantizeReport:
    out_dir: Path
    quantization_config: dict
    quantized: list[str]  #: dense linear layers written FP8 (expert projections not included)
    ignored: list[str]  #: the ignore list written to the config (lm_head, routers, ...)
    shards: list[str]
    sse: float = 0.0  #: summed squared weight quantization error with the chosen scales
    sse_amax: float = 0.0  #: the same with plain amax scales (equal unless scale_search="mse")
    input_amax: dict[str, float] = field(default_factory=dict)
    kv_amax: dict[str, float] = field(default_factory=dict)
    #: mixture-of-experts layers whose experts were written FP8 (name, number of experts)
    moe: list[tuple[str, int]] = field(default_factory=list)
    #: mixture-of-experts layers whose experts were written 16-bit (name, number of experts):
    #: ignored, or stored as fused 3-D tensors rather than per expert
    moe_16bit: list[tuple[str, int]] = field(default_factory=list)
    #: static scheme: per MoE layer, how many experts got no calibration token (their input
    #: scales are the largest of the layer's calibrated experts, projection by projection)
    experts_uncalibrated: dict[str, int] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        """Experts written FP8, over all MoE layers."""
        return sum(n for _, n in self.moe)

    @property
    def mse_ratio(self) -> float:
        """sse / sse_amax: below 1 when the scale search helped (never above 1)."""
        return self.sse / self.sse_amax if self.sse_amax else 1.0


def _scalar(v: float, scheme) -> torch.Tensor:
    """The scale for amax ``v`` in the scalar shape of ``scheme``'s format."""
    return numerics.compute_scale(torch.tensor(v, dtype=torch.float32)).reshape(scheme.scalar_shape)


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
    stored = {k for ks in keys.values() for k in ks}
    layers = model_layers(model_dir)
    moe = find_moe_layers(stored)
    expert_names = {n for layer in moe.values() for n in layer.projections}
    # MoE modules of the model whose experts are not stored per expert (fused 3-D tensors in
    # the checkpoint): passed through 16-bit.
    fused_16bit = [(n, e) for n, e in layers.moe if n not in moe and any(k.startswith(n + ".") for k in stored)]
    router_names = routers(list(moe) + [n for n, _ in fused_16bit], stored)
    ignores = opts.all_ignores
    moe_ignored, moe_used = split_ignored(moe, ignores)
    # Dense linear layers: the model's, less expert projections (a ModuleList of expert MLPs)
    # and routers, which are decided above / always 16-bit.
    dense = replace(layers, linear=tuple(n for n in layers.linear if n not in expert_names))
    quant, ignored, unmatched = quantized_layers(dense, ignores)
    quant = [n for n in quant if n not in router_names]
    ignored += [r for r in router_names if r not in ignored]
    unmatched = [p for p in unmatched if p not in opts.ignore_default and p not in moe_used
                 and not any(match_ignore(r, [p]) for r in router_names)]
    if unmatched:
        raise QuantizeError(f"ignore: patterns {unmatched} match none of the model's linear layers "
                            f"(e.g. {list(layers.linear[:3])})")
    missing = [f"{n}.weight" for n in quant if f"{n}.weight" not in stored]
    if missing:
        raise QuantizeError(f"model_dir: expected weights of linear layers {missing[:4]} in the safetensors "
                            f"files, found them missing ({len(missing)} missing)")
    if opts.kv_cache and not layers.attention:
        raise QuantizeError("kv_cache: expected attention layers with k_proj / v_proj, found none in this model")
    if opts.calib is not None:
        from .corpus import load_texts
        load_texts(opts.calib)  # an empty or missing file fails now, not after loading the model
    moe_quant = {n: m for n, m in moe.items() if n not in moe_ignored}

    input_amax: dict[str, float] = {}
    kv_amax: dict[str, float] = {}
    if opts.needs_calibration:
        from .calibration import calibrate
        input_amax, kv_amax = calibrate(model_dir, quant, list(layers.attention), opts, progress,
                                        moe=moe_quant if opts.scheme == "static" else None)
    uncalibrated = {}
    if opts.scheme == "static":
        uncalibrated = _fill_expert_input_amax(moe_quant, input_amax)

    ct = opts.format == "compressed-tensors"
    for n in moe_ignored + [n for n, _ in fused_16bit]:
        ignored += ignore_entries(n, ct)
    scheme = opts.checkpoint_format(ignored)
    qcfg = quantization_config(scheme)
    report = QuantizeReport(out_dir, qcfg, quant, ignored, [], input_amax=input_amax, kv_amax=kv_amax,
                            moe=[(n, m.num_experts) for n, m in moe_quant.items()],
                            moe_16bit=[(n, moe[n].num_experts) for n in moe_ignored] + fused_16bit,
                            experts_uncalibrated=uncalibrated)
    quant_set = set(quant) | {n for m in moe_quant.values() for n in m.projections}
    with atomic_output_dir(out_dir, force) as tmp:
        writer = ShardWriter(tmp, opts.max_shard_bytes)
        total = sum(len(v) for v in keys.values())
        with tqdm(total=total, desc="quantizing", unit="tensor", disable=not progress) as bar:
            for shard, names in keys.items():
                with ShardReader(shard) as reader:
                    _convert_shard(reader, names, quant_set, opts, input_amax, scheme, writer, report, bar)
        for attn in layers.attention if opts.kv_cache else ():
            for role, name in scheme.kv_scale_names(attn).items():
                writer.add(name, _scalar(kv_amax[f"{attn}.{role}_proj"], scheme))
        report.shards = writer.finish()
        _copy_other_files(model_dir, tmp)
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return report


def _fill_expert_input_amax(moe, input_amax: dict[str, float]) -> dict[str, int]:
    """Input amax for experts the calibration text never routed a token to: the largest amax of
    the same projection role (gate / up / down) over the layer's calibrated experts, the value
    vLLM itself serves for every expert of a layer with static activation scales (it takes the
    maximum over experts). Returns {MoE layer: experts filled in}, and logs it."""
    filled = {}
    for name, layer in moe.items():
        roles = {role: layer.by_role(role) for role in ("gate", "up", "down")}
        seen = {n for ns in roles.values() for n in ns if n in input_amax}
        if not seen:
            raise QuantizeError(f"calibration: no calibration token reached any expert of MoE layer {name}; "
                                f"expected at least one routed token (use more --num-samples / --seq-len)")
        for ns in roles.values():
            fallback = max(input_amax[n] for n in ns if n in input_amax)
            for n in ns:
                input_amax.setdefault(n, fallback)
        missing = {layer.projections[n][0] for ns in roles.values() for n in ns if n not in seen}
        if missing:
            filled[name] = len(missing)
    if filled:
        logger.warning("static input scales: %d of %d experts got no calibration token (%s); they take the "
                       "largest input scale of their layer's calibrated experts",
                       sum(filled.values()), sum(m.num_experts for m in moe.values()),
                       ", ".join(f"{n}: {c}" for n, c in filled.items()))
    return filled


def _convert_shard(reader, names, quant_set, opts, input_amax, scheme, writer, report, bar) -> None:
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
            if scheme.input_scale_name is not None:
                writer.add(scheme.tensor_names(layer)["input_scale"], _scalar(input_amax[layer], scheme))
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
