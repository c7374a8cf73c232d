"""Checkpoints written by fp8_backend.quantize, served by vLLM with the plugin: every (scheme,
format), multi-shard output, calibrated KV scales."""

import json

import pytest
import torch
from checkpoint_writers import CKPT, lp
from engine_runner import run_engine
from quantize_cases import CALIB, CASES, q, tensors


@pytest.fixture(scope="module")
def engine(prompts):
    """run_engine(model, eager, prompts), each model run once per module (engines take ~5-12 s)."""
    cache = {}

    def run(model, **kw):
        key = (str(model), json.dumps(kw, sort_keys=True))
        if key not in cache:
            cache[key] = run_engine(model, {"enforce_eager": True, **kw}, prompts)
        return cache[key]

    return run


@pytest.fixture(scope="module")
def bf16_run(tiny_model, engine):
    return engine(tiny_model)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_round_trip_through_vllm(tiny_model, tmp_path, engine, produced, bf16_run, case):
    r = engine(produced[case].out_dir)
    layers = r["report"]["linear"]
    assert len(layers) == 8 and all(v["quant_method"] == CKPT for v in layers.values())
    # Bound as test_vllm_plugin.test_fp8_logprobs_close_to_bf16 (measured there: mean 0.089,
    # max 0.39 nats for per-tensor FP8 on this model): fails on a wrong scale, not on rounding.
    d = (lp(r) - lp(bf16_run)).abs()
    assert 0 < d.mean().item() < 0.2 and d.max().item() < 1.0, (d.mean(), d.max())
    if case == "block-ct":
        # The independent writer's checkpoint of the same quantization serves the same numbers
        # (every case stores bitwise the writer's tensors, test_producer_tensors_equal_..., and
        # test_checkpoints serves the writers' checkpoints; one engine pair here keeps it short).
        ref = engine(CASES[case][1](tiny_model, tmp_path / "ref"))
        assert torch.allclose(lp(r), lp(ref), atol=1e-4) and r["token_ids"] == ref["token_ids"]


@pytest.mark.slow
def test_round_trip_multi_shard_output(sharded_model, tmp_path, engine, produced):
    out = q(sharded_model, tmp_path / "out", scheme="dynamic", max_shard_bytes=256 << 10).out_dir
    r = engine(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    ref = engine(produced["dynamic-autofp8"].out_dir)
    assert torch.allclose(lp(r), lp(ref), atol=1e-4)


@pytest.mark.parametrize("fmt", ["autofp8", "compressed-tensors"])
@pytest.mark.slow
def test_round_trip_kv_cache(tiny_model, tmp_path, engine, bf16_run, fmt):
    """Calibrated k/v scales written by the producer end in the attention layers of the engine
    (read back from the worker), and FP8 KV with them stays close to bf16."""
    out = q(tiny_model, tmp_path / "kv", scheme="static", format=fmt, kv_cache=True, **CALIB).out_dir
    r = engine(out, kv_cache_dtype="fp8")
    written = tensors(out)
    attn = r["report"]["attention"]
    assert len(attn) == 2
    for name, a in attn.items():
        layer = name.rsplit(".attn", 1)[0]  # model.layers.N.self_attn
        assert a["kv_cache_dtype"] == "fp8"  # whose kernels read it is the attention rule's choice
        assert a["k_scale"] == pytest.approx(float(written[layer + ".k_scale"]), rel=1e-6), name
        assert a["v_scale"] == pytest.approx(float(written[layer + ".v_scale"]), rel=1e-6), name
        assert a["k_scale"] != 1.0 and a["v_scale"] != 1.0
    d = (lp(r) - lp(bf16_run)).abs()
    assert 0 < d.mean().item() < 0.3 and d.max().item() < 1.5, (d.mean(), d.max())
