"""Malformed checkpoints, generated from intact FP8 checkpoints of the tiny test model.

Each :class:`Case` copies an intact checkpoint (written by the project's own producer, so every
format and scale role is covered) and breaks one thing. ``expect`` is what the refusal must
name (the tensor, field or file); every refusal must also say what was expected and what was
found. ``harmless`` cases must load like the intact checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

FP8_KV = {"kv_cache_dtype": "fp8"}


@dataclass
class Case:
    id: str
    base: str  # key of BASES
    edit: Callable[[Path], None]
    expect: str | tuple[str, ...] | None  # substring(s) the error must contain; None: harmless, must load
    kwargs: dict = field(default_factory=dict)  # engine arguments (e.g. an FP8 KV cache)
    warn: str | None = None  # harmless cases: a substring of a warning the plugin must log


#: Intact checkpoints: producer options (fp8_backend.quantize.quantize keyword arguments).
BASES = {
    "autofp8-static-kv": dict(scheme="static", format="autofp8", kv_cache=True, num_samples=2, seq_len=32),
    "ct-dynamic-channel": dict(scheme="dynamic", format="compressed-tensors", per_channel=True),
    "autofp8-block": dict(scheme="block", format="autofp8"),
    "ct-block": dict(scheme="block", format="compressed-tensors"),
    "ct-static-kv": dict(scheme="static", format="compressed-tensors", kv_cache=True, num_samples=2, seq_len=32),
}


def build_bases(model_dir: Path, root: Path) -> dict[str, Path]:
    from fp8_backend.quantize import quantize

    out = {}
    for name, opts in BASES.items():
        d = root / name
        if not d.exists():
            quantize(model_dir, d, progress=False, **opts)
        out[name] = d
    return out


# ---- edits -----------------------------------------------------------------------------------


def _tensors(d: Path, fn: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def set_value(name: str, value: float):
    def edit(d):
        def fn(t):
            t[name] = torch.full_like(t[name], value)
        _tensors(d, fn)
    return edit


def drop(name: str):
    return lambda d: _tensors(d, lambda t: t.pop(name))


def reshape_extra(name: str):
    """One element more than the layer needs."""
    def edit(d):
        def fn(t):
            x = t[name].reshape(-1)
            t[name] = torch.cat([x, x[:1]])
        _tensors(d, fn)
    return edit


def to_dtype(name: str, dtype: torch.dtype):
    def edit(d):
        def fn(t):
            t[name] = t[name].float().to(dtype)
        _tensors(d, fn)
    return edit


def retensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace tensor ``name`` by ``fn(tensor)``."""
    def edit(d):
        def f(t):
            t[name] = fn(t[name]).contiguous()
        _tensors(d, f)
    return edit


def add_tensor(name: str, value: torch.Tensor):
    def edit(d):
        def f(t):
            t[name] = value
        _tensors(d, f)
    return edit


def nan_weight(name: str):
    def edit(d):
        def fn(t):
            t[name] = torch.full_like(t[name].view(torch.uint8), 0x7F).view(torch.float8_e4m3fn)
        _tensors(d, fn)
    return edit


def truncate_rows(name: str, rows: int):
    def edit(d):
        def fn(t):
            t[name] = t[name][:rows].contiguous()
        _tensors(d, fn)
    return edit


def config(fn: Callable[[dict], None]):
    def edit(d):
        p = d / "config.json"
        cfg = json.loads(p.read_text())
        fn(cfg["quantization_config"])
        p.write_text(json.dumps(cfg, indent=2))
    return edit


def truncate_file(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def corrupt_header(d: Path) -> None:
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[8:16] = b"{garbage"
    f.write_bytes(bytes(b))


def split_into_shards(extra: Callable[[dict, Path], None]):
    """Two shards and an index, then ``extra(index, dir)`` damages the index or the shards."""
    def edit(d):
        from safetensors.torch import load_file, save_file

        t = load_file(d / "model.safetensors")
        names = sorted(t)
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for f, ns in parts.items():
            save_file({n: t[n] for n in ns}, d / f, metadata={"format": "pt"})
        (d / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}
        extra(index, d)
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return edit


def _missing_shard(index, d):
    (d / "model-00002-of-00002.safetensors").unlink()


def _tensor_twice(index, d):
    from safetensors.torch import load_file, save_file

    a = load_file(d / "model-00001-of-00002.safetensors")
    b = load_file(d / "model-00002-of-00002.safetensors")
    first = sorted(a)[0]
    b[first] = a[first]
    save_file(b, d / "model-00002-of-00002.safetensors", metadata={"format": "pt"})


def kv_json(content: str):
    def edit(d):
        (d / "kv_cache_scales.json").write_text(content)
    return edit


def _kv_json_layers(n: int) -> str:
    return json.dumps({"model_type": "llama", "kv_cache": {"dtype": "float8_e4m3fn",
                       "scaling_factor": {"0": {str(i): 0.05 for i in range(n)}}}})


# ---- the suite -------------------------------------------------------------------------------

L0 = "model.layers.0"
L1 = "model.layers.1"


def scale_cases(base: str, name: str, role: str, kwargs: dict | None = None,
                missing: str | None = "missing") -> list[Case]:
    """Missing / NaN / +-Inf / 0 / negative / wrong shape / wrong dtype for one scale tensor."""
    kw = kwargs or {}
    out = [
        Case(f"{base}-{role}-nan", base, set_value(name, float("nan")), name, kw),
        Case(f"{base}-{role}-inf", base, set_value(name, float("inf")), name, kw),
        Case(f"{base}-{role}-neg-inf", base, set_value(name, float("-inf")), name, kw),
        Case(f"{base}-{role}-zero", base, set_value(name, 0.0), name, kw),
        Case(f"{base}-{role}-negative", base, set_value(name, -0.5), name, kw),
        Case(f"{base}-{role}-shape", base, reshape_extra(name), name, kw),
        Case(f"{base}-{role}-int-dtype", base, to_dtype(name, torch.int32), name, kw),
    ]
    out.append(Case(f"{base}-{role}-missing", base, drop(name), missing and name, kw))
    return out


def all_cases() -> list[Case]:
    cases: list[Case] = []
    # Scales of every role.
    cases += scale_cases("autofp8-static-kv", f"{L0}.mlp.down_proj.weight_scale", "weight-scale")
    cases += scale_cases("autofp8-static-kv", f"{L0}.self_attn.o_proj.input_scale", "input-scale")
    cases += scale_cases("ct-dynamic-channel", f"{L1}.mlp.down_proj.weight_scale", "channel-scale")
    cases += scale_cases("autofp8-block", f"{L0}.mlp.down_proj.weight_scale_inv", "block-scale")
    cases += scale_cases("ct-block", f"{L1}.self_attn.o_proj.weight_scale", "ct-block-scale")
    cases += scale_cases("ct-static-kv", f"{L1}.self_attn.k_scale", "kv-k-scale", FP8_KV)
    cases += scale_cases("ct-static-kv", f"{L0}.self_attn.v_scale", "kv-v-scale", FP8_KV)
    # Weights.
    w = f"{L0}.mlp.down_proj.weight"
    cases += [
        Case("weight-bf16", "autofp8-static-kv", to_dtype(w, torch.bfloat16), w),
        Case("weight-fp16", "ct-dynamic-channel", to_dtype(w, torch.float16), w),
        Case("weight-nan-encodings", "autofp8-block", nan_weight(w), w),
        Case("weight-rows", "ct-block", truncate_rows(w, 200), w),
        Case("weight-missing", "autofp8-static-kv", drop(w), w),
        Case("weight-3d", "autofp8-static-kv", retensor(w, lambda x: x.reshape(x.shape[0], -1, 2)), (w, "2-D")),
    ]
    # Scale shapes vLLM's loaders would accept by broadcasting, the empty scale, zero points.
    ws, xs = f"{L0}.mlp.down_proj.weight_scale", f"{L0}.self_attn.o_proj.input_scale"
    cs, zp = f"{L1}.mlp.down_proj.weight_scale", f"{L0}.mlp.down_proj.weight_zero_point"
    cases += [
        Case("weight-scale-1x1", "autofp8-static-kv", retensor(ws, lambda x: x.reshape(1, 1)), (ws, "[1, 1]")),
        Case("input-scale-1x1", "autofp8-static-kv", retensor(xs, lambda x: x.reshape(1, 1)), (xs, "[1, 1]")),
        Case("channel-scale-1x1", "ct-dynamic-channel", retensor(cs, lambda x: x[:1]),
             (cs, "[256, 1]", "[1, 1]")),
        Case("weight-scale-empty", "autofp8-static-kv", retensor(ws, lambda x: x.reshape(-1)[:0]), (ws, "empty")),
        Case("channel-scale-1d", "ct-dynamic-channel", retensor(cs, lambda x: x.reshape(-1)), None),
        Case("zero-point-zero", "ct-dynamic-channel", add_tensor(zp, torch.zeros(256, 1, dtype=torch.int8)), None),
        Case("zero-point-nonzero", "ct-dynamic-channel", add_tensor(zp, torch.ones(256, 1, dtype=torch.int8)), (zp, "zeros")),
    ]
    # Files.
    cases += [
        Case("file-truncated", "autofp8-static-kv", truncate_file, "model.safetensors"),
        Case("file-corrupt-header", "ct-block", corrupt_header, "model.safetensors"),
        Case("index-missing-shard", "ct-dynamic-channel", split_into_shards(_missing_shard), "model-00002-of-00002.safetensors"),
        Case("index-tensor-twice", "ct-dynamic-channel", split_into_shards(_tensor_twice), "stored twice"),
        Case("index-sharded-intact", "ct-dynamic-channel", split_into_shards(lambda i, d: None), None),
    ]
    # config.json.
    cases += [
        Case("cfg-unknown-quant-method", "autofp8-static-kv", config(lambda q: q.update(quant_method="fp9")), "fp9"),
        Case("cfg-bad-activation-scheme", "autofp8-static-kv", config(lambda q: q.update(activation_scheme="sometimes")), "activation_scheme"),
        Case("cfg-block-size", "autofp8-block", config(lambda q: q.update(weight_block_size=[64, 64])), "weight_block_size"),
        Case("cfg-ct-strategy", "ct-dynamic-channel",
             config(lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="diagonal")), "strategy"),
        Case("cfg-ct-num-bits-4", "ct-dynamic-channel",
             config(lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4)), "found float4 weights"),
        Case("cfg-ct-type", "ct-dynamic-channel",
             config(lambda q: q["config_groups"]["group_0"]["weights"].update(type="complex")), "type"),
        Case("cfg-ct-no-groups", "ct-dynamic-channel", config(lambda q: q.pop("config_groups")), "config_groups"),
        Case("cfg-ct-block-structure", "ct-block",
             config(lambda q: q["config_groups"]["group_0"]["weights"].update(block_structure=[64, 64])), "block_structure"),
        Case("cfg-ignore-matches-nothing", "autofp8-static-kv",
             config(lambda q: q.update(ignored_layers=["model.layers.7.mlp.nothing"])), None,
             warn="['model.layers.7.mlp.nothing'] match none"),
        Case("cfg-ignore-half-fused", "autofp8-static-kv",
             config(lambda q: q["ignored_layers"].append(f"{L0}.self_attn.q_proj")), ("quantization_config.ignore", "q_proj")),
        Case("cfg-ignore-bad-regex", "autofp8-static-kv",
             config(lambda q: q["ignored_layers"].append("re:(")), ("quantization_config.ignored_layers", "'re:('")),
    ]
    # kv_cache_scales.json.
    cases += [
        Case("kv-json-not-json", "ct-static-kv", kv_json("{not json"), "kv_cache_scales.json", FP8_KV),
        Case("kv-json-layer-count", "ct-static-kv", kv_json(_kv_json_layers(5)), "kv_cache_scales.json", FP8_KV),
        Case("kv-json-nan", "ct-static-kv", kv_json(_kv_json_layers(2).replace("0.05", "NaN")), "kv_cache_scales.json", FP8_KV),
    ]
    return cases


def materialize(case: Case, bases: dict[str, Path], root: Path) -> Path:
    d = root / case.id
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(bases[case.base], d)
    case.edit(d)
    return d
