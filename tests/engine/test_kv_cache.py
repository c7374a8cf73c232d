"""FP8 KV cache through vLLM with the plugin: fp8-backend's attention backend is used, its
outputs stay close to a bf16 KV cache (closer than vLLM's own CPU_ATTN FP8 path), and k/v scales
from every checkpoint convention land in the attention layers; bad scales are refused.

Engines run in fresh single-process interpreters (tests/support/run_engine.py), ~8 s each.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from checkpoint_writers import ct_args, write_autofp8, write_llm_compressor
from fp8_backend.testing.tiny_model import build_tiny_llama

RUN_ENGINE = Path(__file__).parents[1] / "support" / "run_engine.py"
IMPL = "fp8_backend.vllm_adapter.attention_backend.Fp8CpuAttentionImpl"
# Long enough prompts that attention spans several tokens; max_tokens decodes past them.
PROMPTS = [
    "In the beginning there was only the command line, and the command line was good. Machine learning "
    "models are trained on large amounts of text. Quantization stores weights in fewer bits.",
    "FP8 numbers have a sign, four exponent bits and three mantissa bits. The largest value is four "
    "hundred and forty eight. Rounding to nearest even keeps the error",
    "Paris is the capital of",
]


def engine(model, llm_kwargs=None, env=None, expect_fail=False):
    """run_engine.py in a fresh interpreter; (result dict or None, combined output)."""
    e = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    e.update(env or {})
    kw = {"enforce_eager": True, **(llm_kwargs or {})}
    cmd = [sys.executable, str(RUN_ENGINE), "--model", str(model), "--llm-kwargs", json.dumps(kw),
           "--prompts", json.dumps(PROMPTS), "--max-tokens", "4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=e)
    out = p.stdout + "\n" + p.stderr
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            assert not expect_fail, "engine was expected to fail"
            return json.loads(line[len("RESULT "):]), out
    if not expect_fail:
        raise AssertionError(f"engine failed (exit {p.returncode}):\n{out[-5000:]}")
    return None, out


def rule(kv_cache_dtype, head_size=64, mode="auto"):
    """The backend's kernel rule for an engine of this test process's CPU (tiny models: head 64)."""
    from fp8_backend.kernels import attention as A
    from fp8_backend.vllm_adapter import attention_backend as AB

    cache = torch.uint8 if kv_cache_dtype in AB.FP8_KV_DTYPES else torch.bfloat16
    return AB.choose_attention_kernel(mode, kv_cache_dtype, A.attention_path(head_size, cache),
                                      AB.vllm_reads_fp8_cache(head_size))


def own_fp8():
    return rule("fp8").kernel == "fp8_backend"


needs_own_fp8 = pytest.mark.skipif("not own_fp8()", reason="the rule gives FP8 caches to vLLM's kernels on this CPU")


def lp(r):
    return torch.tensor([x for row in r["prompt_logprobs"] for x in row])


def attn(r):
    return r["report"]["attention"]


# (mode, kv_cache_dtype, fp8-backend path, vLLM's CPU_ATTN reads FP8 here) -> kernel, words of the reason
@pytest.fixture(scope="module")
def runs(tiny_model):
    """bf16 KV, FP8 KV (e4m3, e5m2) with the default rule, FP8 KV forced onto vLLM's CPU_ATTN
    (which refuses to start on CPUs without AVX-512: (None, output) then)."""
    from fp8_backend.vllm_adapter.attention_backend import vllm_reads_fp8_cache

    return {
        "bf16": engine(tiny_model),
        "fp8": engine(tiny_model, {"kv_cache_dtype": "fp8"}),
        "e5m2": engine(tiny_model, {"kv_cache_dtype": "fp8_e5m2"}),
        "vllm_fp8": engine(tiny_model, {"kv_cache_dtype": "fp8"}, env={"FP8_BACKEND_ATTENTION": "vllm"},
                           expect_fail=not vllm_reads_fp8_cache(64)),
    }


@pytest.mark.slow
def test_rule_choice_is_what_runs(runs):
    """Every engine's attention layers run on the kernels choose_attention_kernel names for its
    mode / cache / CPU, and the choice is logged with its reason."""
    for name, kv, mode in (("bf16", "auto", "auto"), ("fp8", "fp8", "auto"), ("e5m2", "fp8_e5m2", "auto"),
                           ("vllm_fp8", "fp8", "vllm")):
        r, out = runs[name]
        choice = rule(kv, mode=mode)
        if r is None:  # vLLM's CPU_ATTN cannot read an FP8 cache here: the rule said so
            assert name == "vllm_fp8" and "will refuse" in choice.reason
            assert "FP8 KV cache on CPU requires x86 with AVX-512 or AMX" in out, out[-3000:]
            continue
        layers = attn(r)
        assert layers and all(a["impl"] == IMPL for a in layers.values()), layers
        own = choice.kernel == "fp8_backend"
        assert all(a["own_kernels"] == own for a in layers.values()), (name, choice, layers)
        assert choice.reason in out, (name, choice.reason)
        assert ("attention on fp8-backend kernels" in out) == own


@needs_own_fp8
@pytest.mark.slow
def test_backend_is_used_for_fp8_only(runs):
    for name in ("fp8", "e5m2"):
        r, out = runs[name]
        layers = attn(r)
        assert layers and all(a["impl"] == IMPL and a["own_kernels"] for a in layers.values()), layers
        assert "attention on fp8-backend kernels" in out
    for name in ("bf16", "vllm_fp8"):
        if runs[name][0] is not None:
            assert not any(a["own_kernels"] for a in attn(runs[name][0]).values())
    # absent scales: 1.0, and ONE warning for the whole model
    assert all(a["k_scale"] == 1.0 and a["v_scale"] == 1.0 for a in attn(runs["fp8"][0]).values())
    assert runs["fp8"][1].count("no KV-cache scales in the checkpoint") == 1


@pytest.mark.slow
def test_fp8_kv_close_to_bf16_and_closer_than_vllm(runs):
    """Mean |log-prob difference| to the bf16-KV run over the prompts' tokens. Measured on this
    tiny random model with scale 1.0: e4m3 0.067 (vLLM's CPU_ATTN fp8: 0.079), e5m2 0.144;
    bounds are 3x that. This project's round-half-even cache must be at least as close as vLLM's
    round-toward-zero one (5% slack for noise)."""
    ref = lp(runs["bf16"][0])
    d = {k: (lp(runs[k][0]) - ref).abs().mean().item() for k in ("fp8", "e5m2", "vllm_fp8") if runs[k][0]}
    print("mean |dlogprob| vs bf16 KV:", d)
    assert d["fp8"] < 0.2 and d["e5m2"] < 0.45
    if "vllm_fp8" in d and own_fp8():  # vLLM's FP8 path exists on this CPU (AVX-512 / AMX)
        assert d["fp8"] <= d["vllm_fp8"] * 1.05 + 1e-4, d


# ---------------------------------------------------------------------------------------------
# KV scales from checkpoints
# ---------------------------------------------------------------------------------------------

K_SCALES = {0: 0.011, 1: 0.023, 2: 0.037}
V_SCALES = {0: 0.013, 1: 0.029}


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny3"), num_layers=3)


def kv_tensors(sd):
    """Layer 0: self_attn.k_scale/v_scale; layer 1: AutoFP8 k_proj/v_proj.output_scale;
    layer 2: the deprecated single kv_scale."""
    sd["model.layers.0.self_attn.k_scale"] = torch.tensor(K_SCALES[0])
    sd["model.layers.0.self_attn.v_scale"] = torch.tensor(V_SCALES[0])
    sd["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor(K_SCALES[1])
    sd["model.layers.1.self_attn.v_proj.output_scale"] = torch.tensor(V_SCALES[1])
    sd["model.layers.2.self_attn.kv_scale"] = torch.tensor(K_SCALES[2])


@pytest.fixture(scope="module")
def autofp8_kv(model3, tmp_path_factory):
    d = write_autofp8(model3, tmp_path_factory.mktemp("ckpt") / "autofp8kv", "dynamic", edit=kv_tensors)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = "static"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@needs_own_fp8
@pytest.mark.slow
def test_scale_tensor_names_land_in_layers(autofp8_kv):
    r, out = engine(autofp8_kv, {"kv_cache_dtype": "fp8"})
    a = attn(r)
    got = {int(n.split(".")[2]): (v["k_scale"], v["v_scale"]) for n, v in a.items()}
    assert got[0] == pytest.approx((K_SCALES[0], V_SCALES[0]))
    assert got[1] == pytest.approx((K_SCALES[1], V_SCALES[1]))
    assert got[2] == pytest.approx((K_SCALES[2], K_SCALES[2]))  # kv_scale serves both
    assert all(v["own_kernels"] for v in a.values())
    assert "no KV-cache scales in the checkpoint" not in out


@pytest.mark.slow
def test_kv_cache_scales_json(autofp8_kv, tmp_path):
    """kv_cache_scales.json (per TP rank, per layer) overrides the checkpoint tensors."""
    js = tmp_path / "scales.json"
    js.write_text(json.dumps({"model_type": "llama", "kv_cache": {
        "dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": 0.5, "1": 0.25, "2": 0.125}}}}))
    r, _ = engine(autofp8_kv, {"kv_cache_dtype": "fp8"}, env={"FP8_BACKEND_KV_CACHE_SCALES": str(js)})
    got = {int(n.split(".")[2]): (v["k_scale"], v["v_scale"]) for n, v in attn(r).items()}
    assert got == {0: (0.5, 0.5), 1: (0.25, 0.25), 2: (0.125, 0.125)}


@needs_own_fp8
@pytest.mark.slow
def test_compressed_tensors_kv_cache_scheme_per_head(model3, tmp_path):
    """llm-compressor FP8 + kv_cache_scheme (strategy attn_head): per-kv-head k/v scales; the
    scheme alone turns the FP8 KV cache on (kv_cache_dtype auto -> fp8)."""
    d = write_llm_compressor(model3, tmp_path / "ct", "FP8_DYNAMIC")
    sd = load_file(str(d / "model.safetensors"))
    heads = {i: (torch.tensor([0.01 + i, 0.02 + i]), torch.tensor([0.03 + i, 0.04 + i])) for i in range(3)}
    for i, (k, v) in heads.items():
        sd[f"model.layers.{i}.self_attn.k_scale"] = k
        sd[f"model.layers.{i}.self_attn.v_scale"] = v
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {**ct_args("attn_head", False)}
    (d / "config.json").write_text(json.dumps(cfg))
    r, _ = engine(d)
    for n, a in attn(r).items():
        i = int(n.split(".")[2])
        assert a["kv_cache_dtype"] == "fp8" and a["own_kernels"]
        assert a["k_scale_heads"] == pytest.approx(heads[i][0].tolist())
        assert a["v_scale_heads"] == pytest.approx(heads[i][1].tolist())


@pytest.mark.slow
def test_bad_scale_refused_at_start(autofp8_kv, tmp_path):
    """A zero scale (NaN, Inf and negatives take the same check) stops the engine, naming the layer."""
    bad = 0.0
    d = tmp_path / "bad"
    import shutil

    shutil.copytree(autofp8_kv, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.self_attn.v_proj.output_scale"] = torch.tensor(bad)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    _, out = engine(d, {"kv_cache_dtype": "fp8"}, expect_fail=True)
    assert "model.layers.1.self_attn.v_scale (or model.layers.1.self_attn.v_proj.output_scale; loaded into model.layers.1.self_attn.attn.v_scale): expected a finite scale > 0, found 0.0 (1 of 1 scales: 1 <= 0)" in out, out[-3000:]


@pytest.mark.slow
def test_capacity_fp8_holds_twice_the_tokens(runs):
    """Same kv_cache_memory_bytes (64 MiB): vLLM sizes an FP8 cache at 2x the tokens (blocks)."""
    import re

    def tokens(out):
        m = re.search(r"KV cache size: ([\d,]+) tokens", out)
        assert m, "vLLM did not log its KV cache size"
        return int(m.group(1).replace(",", ""))

    bf16, fp8, e5m2 = (tokens(runs[k][1]) for k in ("bf16", "fp8", "e5m2"))
    print(f"KV cache tokens for 64 MiB: bf16 {bf16} ({bf16 // 128} blocks of 128), fp8 {fp8} ({fp8 // 128} blocks)")
    assert fp8 == 2 * bf16 and e5m2 == fp8


@pytest.mark.slow
def test_head_size_80_served(tmp_path):
    """Head size 80: vLLM's own CPU_ATTN refuses an FP8 cache for it ("FP8 KV cache requires
    head_size divisible by 32 on CPU"); this project's kernels take any head size."""
    model = build_tiny_llama(tmp_path / "h80", hidden_size=320, num_heads=4, num_kv_heads=2)
    r, out = engine(model, {"kv_cache_dtype": "fp8"})
    assert all(a["own_kernels"] for a in attn(r).values())
    assert "head size 80" in out
    assert torch.isfinite(lp(r)).all() and len(r["token_ids"][0]) == 4
