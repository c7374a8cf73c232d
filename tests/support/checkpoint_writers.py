"""Small independent FP8 checkpoint writers (plain torch, not the plugin's numerics) for the tiny
random Llama, in the AutoFP8 / vLLM "fp8", llm-compressor and block layouts; the plugin's
quantization methods by class path; prompt log-probs of an engine result."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fp8_backend.testing.tiny_model import LINEAR_SUFFIXES

CKPT = "fp8_backend.vllm_adapter.checkpoint_linear.Fp8CheckpointLinearMethod"
ONLINE = "fp8_backend.vllm_adapter.linear.Fp8OnlineLinearMethod"
UNQUANT = "vllm.model_executor.layers.linear.UnquantizedLinearMethod"


def write_autofp8(src: Path, dst: Path, activation_scheme: str = "static", ignored: tuple = (),
                  edit=None) -> Path:
    """AutoFP8's layout: weight F8_E4M3 [N, K], weight_scale F32 scalar = amax / 448,
    input_scale F32 scalar (static), quantization_config in config.json."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        layer = name[: -len(".weight")]
        if name.endswith(LINEAR_SUFFIXES) and layer not in ignored:
            scale = t.float().abs().max() / 448.0
            out[name] = (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[layer + ".weight_scale"] = scale.reshape(())
            if activation_scheme == "static":
                out[layer + ".input_scale"] = torch.tensor(0.02)
        else:
            out[name] = t
    if edit:
        edit(out)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": activation_scheme,
                                  "ignored_layers": list(ignored)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def lp(r):
    return torch.tensor([x for row in r["prompt_logprobs"] for x in row])


def ct_args(strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def write_llm_compressor(src: Path, dst: Path, preset: str, scale_dtype=torch.float32) -> Path:
    """llm-compressor's compressed-tensors layout ("float-quantized"): FP8 (static per-tensor
    weights and inputs, scales of shape [1]) or FP8_DYNAMIC (per-channel weight_scale [N, 1],
    dynamic per-token activations). Scales stored in ``scale_dtype`` (llm-compressor writes the
    model's dtype); weights quantized with the stored (rounded) scale, as it does."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        layer = name[: -len(".weight")]
        if not name.endswith(LINEAR_SUFFIXES):
            out[name] = t
            continue
        amax = t.float().abs().amax(dim=1, keepdim=True) if preset == "FP8_DYNAMIC" else t.float().abs().max().reshape(1)
        scale = (amax / 448.0).to(scale_dtype)
        out[name] = (t.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[layer + ".weight_scale"] = scale
        if preset == "FP8":
            out[layer + ".input_scale"] = torch.tensor([0.02], dtype=scale_dtype)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    weights = ct_args("channel" if preset == "FP8_DYNAMIC" else "tensor", False)
    inputs = ct_args("token", True) if preset == "FP8_DYNAMIC" else ct_args("tensor", False)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": inputs, "output_activations": None}},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The FP8 checkpoint as a bf16 one: weight * weight_scale per row (or tensor), no config."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = (t.float() * sd[name[: -len("weight")] + "weight_scale"].float()).to(torch.bfloat16)
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _block_quant(t: torch.Tensor, bn: int = 128, bk: int = 128):
    """Per-block amax / 448 over a [ceil(N/bn), ceil(K/bk)] grid (partial last blocks)."""
    n, k = t.shape
    s = torch.empty(-(-n // bn), -(-k // bk))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = t[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float().abs().max() / 448.0
    full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (t.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), s


def write_block(src: Path, dst: Path, fmt: str) -> Path:
    """AutoFP8/DeepSeek-style ("fp8", weight_block_size, weight_scale_inv) or llm-compressor
    FP8_BLOCK (compressed-tensors, weight_scale) 128x128 block checkpoints. The tiny model's
    intermediate size 688 = 5 * 128 + 48: gate/up shards end in a partial block."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        if name.endswith(LINEAR_SUFFIXES):
            q, sc = _block_quant(t)
            out[name] = q
            out[name[: -len("weight")] + ("weight_scale_inv" if fmt == "fp8" else "weight_scale")] = sc
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    if fmt == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    else:
        w = ct_args("block", False)
        w["block_structure"] = [128, 128]
        a = ct_args("group", True)
        a["group_size"] = 128
        cfg["quantization_config"] = {
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": a,
                                          "output_activations": None}},
            "format": "float-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
