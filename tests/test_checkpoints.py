"""FP8 checkpoints in the AutoFP8 / vLLM "fp8" format, loaded through vLLM with the plugin.

The checkpoints are written here by a small independent writer (plain torch, not the plugin's
numerics), from the tiny random Llama.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EngineError, run_engine
from safetensors.torch import load_file, save_file
from tiny_model import LINEAR_SUFFIXES

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


@pytest.fixture(scope="module")
def online_run(tiny_model, prompts):
    return run_engine(tiny_model, {"enforce_eager": True, "quantization": "fp8"}, prompts)


@pytest.mark.parametrize("activation_scheme", ["static", "dynamic"])
def test_autofp8_checkpoint_serves_the_same_model_as_online(tiny_model, prompts, tmp_path, online_run,
                                                            activation_scheme):
    ckpt = write_autofp8(tiny_model, tmp_path / "ckpt", activation_scheme)
    r = run_engine(ckpt, {"enforce_eager": True}, prompts)  # quantization read from config.json
    layers = r["report"]["linear"]
    assert len(layers) == 8
    for name, v in layers.items():
        assert v["quant_method"] == CKPT and v["weight_dtype"] == "torch.float8_e4m3fn", name
    # Fused q/k/v keeps the three checkpoint scales exactly: one per output row.
    assert layers["model.layers.0.self_attn.qkv_proj"]["scale_numel"] == 512
    assert layers["model.layers.0.self_attn.o_proj"]["scale_numel"] == 1
    # Same weights and scales as online per-tensor quantization of the same bf16 model (amax/448
    # per checkpoint tensor), same kernel: the same numbers.
    assert torch.allclose(lp(r), lp(online_run), atol=1e-3), (lp(r) - lp(online_run)).abs().max()
    assert r["token_ids"] == online_run["token_ids"]


def test_ignored_layers_stay_16_bit(tiny_model, prompts, tmp_path):
    ckpt = write_autofp8(tiny_model, tmp_path / "ckpt", "dynamic", ignored=("model.layers.1.mlp.down_proj",))
    layers = run_engine(ckpt, {"enforce_eager": True}, prompts[:1])["report"]["linear"]
    assert layers["model.layers.1.mlp.down_proj"]["quant_method"] == UNQUANT
    assert layers["model.layers.0.mlp.down_proj"]["quant_method"] == CKPT


def _drop(name):
    return lambda sd: sd.pop(name)


def _set(name, value):
    def edit(sd):
        sd[name] = torch.tensor(value, dtype=sd[name].dtype)
    return edit


def _bf16_weight(name):
    def edit(sd):
        sd[name] = sd[name].to(torch.bfloat16)
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("model.layers.0.self_attn.k_proj.weight_scale"),
         "model.layers.0.self_attn.qkv_proj.weight_scale (shard 1 of 3): expected a finite scale > 0, "
         "found missing from the checkpoint"),
        (_set("model.layers.1.mlp.down_proj.weight_scale", float("nan")),
         "model.layers.1.mlp.down_proj.weight_scale: expected a finite scale > 0, found nan"),
        (_set("model.layers.0.self_attn.o_proj.input_scale", 0.0),
         "model.layers.0.self_attn.o_proj.input_scale: expected a finite scale > 0, found 0.0"),
        (_set("model.layers.0.mlp.up_proj.weight_scale", -1.0),
         "model.layers.0.mlp.gate_up_proj.weight_scale (shard 1 of 2): expected a finite scale > 0, found -1.0"),
        (_bf16_weight("model.layers.0.mlp.down_proj.weight"),
         "model.layers.0.mlp.down_proj.weight: expected F8_E4M3 (float8_e4m3fn) as quantization_config "
         "declares FP8, found torch.bfloat16"),
        (_drop("model.layers.1.self_attn.v_proj.weight"),
         "model.layers.1.self_attn.qkv_proj.weight: rows"),
    ],
    ids=["missing-scale", "nan-scale", "zero-input-scale", "negative-scale", "bf16-weight", "missing-weight"],
)
def test_bad_checkpoints_are_refused_before_serving(tiny_model, tmp_path, edit, message):
    ckpt = write_autofp8(tiny_model, tmp_path / "bad", "static", edit=edit)
    with pytest.raises(EngineError) as ei:
        run_engine(ckpt, {"enforce_eager": True}, ["hi"])
    assert message in ei.value.output, ei.value.output[-3000:]


@pytest.mark.parametrize(
    "qcfg, message",
    [
        ({"quant_method": "fp8", "activation_scheme": "sometimes"}, r"activation_scheme: expected .*found 'sometimes'"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
         r"block-scaled FP8 checkpoints .* not served yet"),
    ],
    ids=["bad-activation-scheme", "block-not-yet"],
)
def test_bad_or_unsupported_configs_named(tiny_model, tmp_path, qcfg, message):
    d = write_autofp8(tiny_model, tmp_path / "cfg", "dynamic")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError) as ei:
        run_engine(d, {"enforce_eager": True}, ["hi"])
    assert re.search(message, ei.value.output), ei.value.output[-3000:]
