"""fp8_backend.eval.simulate: the transformers simulation of numerics.py that `fp8-backend eval
--simulate` checks the engine against. Weights dequantized per granularity (checkpoints written by
the producer from a tiny llama) must equal numerics' own quantization of the 16-bit weights bit for
bit (both are numerics.py: any difference is a plumbing error such as a wrong scale tensor or block
layout); the plan (which simulation a configuration gets), the verdict rule and the tables."""

from __future__ import annotations

import json
import math

import pytest
import torch
from schemes import GROUP_128, PER_TOKEN, STATIC, WEIGHTS

from fp8_backend import numerics
from fp8_backend.eval import perplexity, report
from fp8_backend.formats.scheme import PER_ROW, PER_TENSOR
from fp8_backend.eval.simulate import (
    TARGET_PCT,
    SimSpec,
    SimulationError,
    check_loadable,
    checkpoint_weights,
    fake_quant_activations,
    load_model,
    online_weights,
    plan,
    score_windows,
    simulate,
    verdict,
)
from fp8_backend.quantize import quantize

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """The producer's dynamic checkpoints of the tiny llama, one per weight granularity."""
    out = tmp_path_factory.mktemp("sim-ckpt")
    kinds = {"tensor": dict(scheme="dynamic", format="autofp8"),
             "channel": dict(scheme="dynamic", per_channel=True, format="compressed-tensors"),
             "block": dict(scheme="block", format="autofp8"),
             "block-ct": dict(scheme="block", format="compressed-tensors")}
    paths = {}
    for kind, kw in kinds.items():
        quantize(tiny_model, out / kind, progress=False, **kw)
        paths[kind] = out / kind
    return paths


@pytest.fixture(scope="module")
def fp32_model(tiny_model):
    return load_model(str(tiny_model), "float32")


def _expected(w: torch.Tensor, kind: str) -> torch.Tensor:
    """numerics' quantization of a 16-bit weight, dequantized: what the checkpoint must give back."""
    if kind == "tensor":
        q, s = numerics.quantize_per_tensor(w)
        return numerics.dequantize(q, s)
    if kind == "channel":
        q, s = numerics.quantize_per_channel(w)
        return numerics.dequantize(q, s)
    q, s = numerics.quantize_block(w)
    return numerics.dequantize(q, s, numerics.BLOCK_SIZE)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block", "block-ct"])
def test_checkpoint_weights_match_numerics(kind, checkpoints, fp32_model):
    got = checkpoint_weights(fp32_model, checkpoints[kind])
    names = {n for n, m in fp32_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(got) == names and len(names) == 2 * len(LINEAR)
    modules = dict(fp32_model.named_modules())
    for name, w in got.items():
        ref = _expected(modules[name].weight.detach(), kind.split("-")[0])
        assert torch.equal(w, ref), name  # bit-exact: the same numerics on the same bf16 values
    # the tiny model's 688-wide MLP leaves a partial last 128-block: it went through
    if kind.startswith("block"):
        assert modules["model.layers.0.mlp.down_proj"].weight.shape[1] % 128 != 0


def test_online_weights_per_tensor_and_channel(fp32_model):
    modules = dict(fp32_model.named_modules())
    for strategy in ("tensor", "channel"):
        got = online_weights(fp32_model, WEIGHTS[strategy])
        assert "lm_head" not in got and len(got) == 2 * len(LINEAR)
        for name, w in got.items():
            assert torch.equal(w, _expected(modules[name].weight.detach(), strategy)), name


def test_simulated_checkpoint_equals_simulated_online(tiny_model, checkpoints):
    """The producer's per-tensor checkpoint and online per-tensor FP8 store the same weights, so
    their simulations give the same log-probs; the 16-bit model gives different ones."""
    windows = [list(range(3, 40)), list(range(100, 130))]
    a = simulate(SimSpec(str(tiny_model), checkpoint=str(checkpoints["tensor"])), windows)
    b = simulate(SimSpec(str(tiny_model), online=PER_TENSOR), windows)
    c = simulate(SimSpec(str(tiny_model)), windows)
    assert [len(w) for w in a] == [36, 29]
    assert a == b
    assert a != c


def test_simulated_fp8_kv_changes_logprobs_and_is_deterministic(tiny_model):
    windows = [list(range(3, 40))]
    base = simulate(SimSpec(str(tiny_model), dtype="bfloat16"), windows)
    kv = simulate(SimSpec(str(tiny_model), kv_cache_dtype="fp8", dtype="bfloat16"), windows)
    assert kv == simulate(SimSpec(str(tiny_model), kv_cache_dtype="fp8", dtype="bfloat16"), windows)
    assert kv != base
    # FP8 keys/values move a peaked tiny model's log-probs a little, not wholesale
    assert max(abs(x - y) for x, y in zip(kv[0], base[0])) < 0.5


def test_w8a8_static_needs_input_scales(tiny_model, checkpoints):
    spec = SimSpec(str(tiny_model), checkpoint=str(checkpoints["tensor"]), activations=STATIC, dtype="bfloat16")
    with pytest.raises(SimulationError, match=r"input_scale"):
        simulate(spec, [list(range(3, 20))])


def test_static_input_scale_of_fused_siblings():
    """q/k/v and gate/up share one activation tensor in the engine (fused layers), which keeps the
    largest of their input scales; other layers keep their own."""
    from fp8_backend.eval.simulate import static_input_scale

    p = "model.layers.3."
    t = {f"{p}{n}.weight": torch.zeros(1) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    t.update({f"{p}self_attn.q_proj.input_scale": torch.tensor(0.5), f"{p}self_attn.k_proj.input_scale": torch.tensor(2.0),
              f"{p}self_attn.v_proj.input_scale": torch.tensor(1.0), f"{p}self_attn.o_proj.input_scale": torch.tensor(0.25),
              f"{p}mlp.gate_proj.input_scale": torch.tensor([3.0]), f"{p}mlp.up_proj.input_scale": torch.tensor([1.0])})
    assert static_input_scale(t, p + "self_attn.v_proj", "ck") == 2.0
    assert static_input_scale(t, p + "self_attn.o_proj", "ck") == 0.25
    assert static_input_scale(t, p + "mlp.up_proj", "ck") == 3.0
    del t[f"{p}mlp.gate_proj.input_scale"]
    with pytest.raises(SimulationError, match=r"ck: W8A8 simulation expected input_scale for .*mlp.gate_proj"):
        static_input_scale(t, p + "mlp.up_proj", "ck")


def test_fake_quant_activations_match_numerics():
    torch.manual_seed(0)
    x = (torch.randn(3, 200) * 3).to(torch.bfloat16)
    x[0, 0], x[1, 5] = 0.0, 1e-30  # zero and an FP8 subnormal after scaling
    s = torch.tensor(0.02)
    got = fake_quant_activations(x, STATIC, s)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (numerics.quantize_with_scale(x, s).float() * s).to(torch.bfloat16))
    q, st = numerics.quantize_per_token(x)
    assert torch.equal(fake_quant_activations(x, PER_TOKEN), (q.float() * st).to(torch.bfloat16))
    # groups of 128 along K = 200: one whole group and a partial one of 72, each with its own amax
    g = fake_quant_activations(x, GROUP_128)
    for lo, hi in ((0, 128), (128, 200)):
        q, sg = numerics.quantize_per_token(x[:, lo:hi])
        assert torch.equal(g[:, lo:hi], (q.float() * sg).to(torch.bfloat16))


def test_plan_online(tiny_model):
    m = str(tiny_model)
    assert plan(m, None, "auto", m, {}) == SimSpec(m)  # the 16-bit reference: exact fp32 math
    assert plan(m, "fp8", "auto", m, {}, engine_own_kv_kernels=False) == SimSpec(m, online=PER_TENSOR)
    assert plan(m, "fp8_per_channel", "bfloat16", m, {}) == SimSpec(m, online=PER_ROW)
    # FP8 KV on this plugin's kernels rounds bf16 keys/values: like-for-like is bfloat16
    assert plan(m, "fp8", "fp8", m, {}, True) == SimSpec(m, online=PER_TENSOR, kv_cache_dtype="fp8", dtype="bfloat16")
    assert plan(m, "fp8", "fp8_e5m2", m, {}).kv_cache_dtype == "fp8_e5m2"
    emu = plan(m, "fp8", "auto", m, {"FP8_BACKEND_EMULATE_W8A8": "1"})
    assert (emu.activations, emu.dtype, emu.kv_cache_dtype) == (PER_TOKEN, "bfloat16", None)
    # not simulated, with the reason
    assert "vLLM's attention" in plan(m, "fp8", "fp8", m, {"FP8_BACKEND_ATTENTION": "vllm"})
    assert "vLLM's attention" in plan(m, "fp8", "fp8", m, {}, engine_own_kv_kernels=False)
    assert "'int8'" in plan(m, "int8", "auto", m, {})


def test_plan_checkpoints(tiny_model, checkpoints):
    m = str(tiny_model)
    c = str(checkpoints["tensor"])
    assert plan(c, None, "auto", m, {}, False) == SimSpec(m, checkpoint=c)
    # an "auto" cache that the engine ran as FP8 (vLLM's choice for checkpoints declaring KV scales)
    assert plan(c, None, "auto", m, {}, True).kv_cache_dtype == "fp8"
    emu = {"FP8_BACKEND_EMULATE_W8A8": "1"}
    assert plan(c, None, "auto", m, emu).activations == PER_TOKEN
    assert plan(str(checkpoints["block"]), None, "auto", m, emu).activations == GROUP_128


def test_check_loadable(tiny_model, tmp_path):
    check_loadable(str(tiny_model))
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "architectures": ["NoSuch"]}))
    with pytest.raises(SimulationError, match="not-a-model"):
        check_loadable(str(bad))
    with pytest.raises(SimulationError, match="not-a-model"):
        load_model(str(bad), "float32")


def test_score_windows_is_next_token_logprob(fp32_model):
    w = [5, 9, 11, 2]
    got = score_windows(fp32_model, [w])[0]
    with torch.no_grad():
        lp = torch.log_softmax(fp32_model(torch.tensor([w])).logits[0].float(), -1)
    assert got == pytest.approx([lp[i, w[i + 1]].item() for i in range(3)], abs=1e-6)


def _shift(lps, per_token, spread=0.0):
    """``lps`` moved by ``per_token`` nats, plus ``spread`` alternating in sign from window to window."""
    return [[x + per_token + (spread if i % 2 else -spread) for x in w] for i, w in enumerate(lps)]


def test_verdict_direct():
    sim = [[-2.0] * 10, [-3.0] * 10, [-2.5] * 10, [-1.5] * 10]
    # engine worse by 0.001 nats per token everywhere: perplexity +0.1%, within the 0.2% target
    v = verdict(_shift(sim, -0.001), sim)
    assert v["diff_pct"] == pytest.approx(100 * (math.exp(0.001) - 1))
    assert v["verdict"] == "yes" and v["target_pct"] == TARGET_PCT and "rel_pct" not in v
    assert v["mean_abs"] == pytest.approx(0.001) and v["se_pct"] == pytest.approx(0.0, abs=1e-9)
    assert v["ppl_engine"] / v["ppl_sim"] == pytest.approx(math.exp(0.001))
    # 0.003 nats: +0.30%, outside; better by as much is outside too (the rule is |difference|)
    assert verdict(_shift(sim, -0.003), sim)["verdict"] == "no"
    assert verdict(_shift(sim, 0.003), sim)["verdict"] == "no"
    assert verdict(_shift(sim, -0.003), sim, target_pct=0.5)["verdict"] == "yes"
    with pytest.raises(ValueError, match="window"):
        verdict(sim[:1], sim)


def test_verdict_undecided_with_too_little_text():
    sim = [[-2.0] * 10, [-3.0] * 10, [-2.5] * 10, [-1.5] * 10]
    # windows disagree by +-0.004 nats around a 0.001 mean: s.e. ~0.2%, two s.e. exceed the target
    v = verdict(_shift(sim, -0.001, 0.004), sim)
    assert 2 * v["se_pct"] > TARGET_PCT and v["verdict"] == "undecided"
    # a miss larger than target + 2 s.e. is a miss even so
    v = verdict(_shift(sim, -0.02, 0.004), sim)
    assert abs(v["diff_pct"]) - 2 * v["se_pct"] > TARGET_PCT and v["verdict"] == "no"
    # one window: no spread over windows is known (NaN s.e.), so nothing is decided
    assert verdict([sim[0]], [sim[0]])["verdict"] == "undecided"


def test_verdict_cancels_the_reference_offset():
    sim_ref = [[-2.0] * 10, [-3.0] * 10, [-2.5] * 10, [-1.5] * 10]
    sim = [[x - 0.01 for x in w] for w in sim_ref]  # FP8 costs 0.01 nats per token in the simulation
    # the 16-bit engine sits 0.004 nats per token below its simulation (bf16 activations: +0.4%),
    # and the FP8 engine shares that offset: directly it misses, each vs its reference it agrees
    eng_ref = _shift(sim_ref, -0.004)
    eng = _shift(sim, -0.004 - 0.0005)
    v = verdict(eng, sim, TARGET_PCT, eng_ref, sim_ref)
    assert v["diff_pct"] == pytest.approx(100 * (math.exp(0.0045) - 1))
    assert v["rel_pct"] == pytest.approx(100 * (math.exp(0.0005) - 1))
    assert v["rel_pct"] == pytest.approx(100 * ((v["ppl_engine"] / perplexity(eng_ref)) / (v["ppl_sim"] / perplexity(sim_ref)) - 1))
    assert v["verdict"] == "yes"
    # an FP8 error the simulation does not have is not cancelled
    assert verdict(_shift(sim, -0.004 - 0.005), sim, TARGET_PCT, eng_ref, sim_ref)["verdict"] == "no"


def test_simulation_table():
    sim = {"ppl_engine": 10.5, "ppl_sim": 10.4, "diff_pct": 0.96, "se_pct": 0.3, "rel_pct": 0.1, "rel_se_pct": 0.04,
           "mean_abs": 0.02, "max_abs": 0.2, "target_pct": 0.2}
    lin = {"bytes": 1 << 20, "n_fp8": 4, "n_linear": 4}
    agree = {"mean_abs": 0.1, "p99_abs": 0.5, "max_abs": 1.0}
    rows = [
        {"config": "reference", "ppl": 10.0, "linear": {"bytes": 2 << 20, "n_fp8": 0, "n_linear": 4},
         "simulation": {"spec": {"dtype": "float32"}, "ppl_engine": 10.0, "ppl_sim": 9.99, "diff_pct": 0.1,
                        "se_pct": 0.05, "mean_abs": 0.002, "max_abs": 0.01, "target_pct": 0.2, "verdict": "reference"}},
        {"config": "c0", "ppl": 10.5, "ppl_change": 0.05, "linear": lin, "agreement": agree,
         "simulation": {"spec": {"dtype": "bfloat16"}, **sim, "verdict": "yes"}},
        {"config": "c1", "ppl": 10.6, "ppl_change": 0.06, "linear": lin, "agreement": agree,
         "simulation": {"skipped": "FP8 KV cache on vLLM's attention kernels is not simulated"}},
        {"config": "c2", "ppl": 10.5, "ppl_change": 0.05, "linear": lin, "agreement": agree,
         "simulation": {"spec": {"dtype": "float32"}, **sim, "rel_pct": -0.5, "verdict": "no"}},
    ]
    labels = {"reference": "m: 16-bit", "c0": "m: fp8, fp8 KV", "c1": "m: fp8, fp8 KV (vllm)", "c2": "m: fp8"}
    md = report.markdown(rows, labels, 2, 16)
    lines = md.splitlines()
    assert "| configuration | engine perplexity | simulated perplexity | sim. dtype |" in md
    assert "within 0.2% |" in md
    assert ("| m: 16-bit (reference) | 10.000 | 9.990 | float32 | +0.10% +- 0.05% |  | 0.0020 | 0.010 | "
            "(16-bit offset) |") in lines
    assert "| m: fp8, fp8 KV | 10.500 | 10.400 | bfloat16 | +0.96% +- 0.30% | +0.10% +- 0.04% | 0.0200 | 0.200 | yes |" in lines
    assert "| m: fp8 | 10.500 | 10.400 | float32 | +0.96% +- 0.30% | -0.50% +- 0.04% | 0.0200 | 0.200 | no |" in lines
    assert any(ln.startswith("| m: fp8, fp8 KV (vllm) | 10.600 | not simulated: FP8 KV") for ln in lines)
    # every row of the simulation table has the header's number of cells
    sim_lines = [ln for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("| configuration | engine"))):]]
    assert len({ln.count("|") for ln in sim_lines}) == 1
    # without --simulate the table is unchanged
    plain = report.markdown([{k: v for k, v in r.items() if k != "simulation"} for r in rows], labels, 2, 16)
    assert "simulated" not in plain


def test_table_pads_and_checks_widths():
    t = report.table([["", "a", "long header"], ["row", "1", "2"]])
    assert t.splitlines() == ["|     | a | long header |", "|-----|---|-------------|", "| row | 1 |           2 |"]
    with pytest.raises(ValueError, match="3 cells"):
        report.table([["a", "b", "c"], ["1", "2"]])


def test_cli_refuses_bad_simulate_arguments(tmp_path, tiny_model, capsys):
    """Refused before any engine starts (exit 2, the option and the model named)."""
    from fp8_backend.eval.cli import main

    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    assert main([str(tiny_model), "--text", str(text), "--simulate", "--sim-target", "0"]) == 2
    assert "--sim-target: expected a positive percentage, found 0.0" in capsys.readouterr().err
    bad = tmp_path / "odd-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    assert main([str(bad), "--text", str(text), "--simulate", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--simulate" in err and "odd-model" in err
    assert not (tmp_path / "out").exists()
