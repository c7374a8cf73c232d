"""The producer on mixture-of-experts models: every expert's gate / up / down projection written
FP8 in the per-expert layout of the source checkpoint, for every scheme and both formats;
routers 16-bit and in the ignore list; static expert input scales calibrated on the tokens
routed to each expert. No engine: the files are checked against numerics.py, the project's
parser and validators, and compressed-tensors' own config model.

Independent references: numerics.quantize_* on the source safetensors for the tensors; for the
calibration, the routing recomputed from the transformers router module and each expert's MLP
recomputed from the source checkpoint's per-expert weights (not the fused module the producer
hooks).
"""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from quantize_cases import CALIB, q, same, tensors
from schemes import WEIGHTS
from tiny_moe import MOE_SHAPE, build_tiny_qwen3_moe

from fp8_backend import numerics
from fp8_backend.formats.checkpoint import parse_quantization_config
from fp8_backend.formats.layer_tensors import validate_layer_tensors
from fp8_backend.quantize import QuantizeError

E = MOE_SHAPE["num_experts"]
LAYERS = 2
FEW = dict(num_samples=1, seq_len=4)  # 4 tokens x top-2: some experts get no token
PROJ = ("gate_proj", "up_proj", "down_proj")


def experts(layer: int):
    return [f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(E) for p in PROJ]


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-moe") / "m", num_layers=LAYERS)


# case -> (options, strategy, weight scale name, static calibration)
CASES = {
    "dynamic-autofp8": (dict(scheme="dynamic", format="autofp8"), "tensor", "weight_scale", None),
    "static-autofp8": (dict(scheme="static", format="autofp8"), "tensor", "weight_scale", FEW),
    "block-autofp8": (dict(scheme="block", format="autofp8"), "block", "weight_scale_inv", None),
    "dynamic-ct-channel": (dict(scheme="dynamic", format="compressed-tensors", per_channel=True), "channel",
                           "weight_scale", None),
    "static-ct": (dict(scheme="static", format="compressed-tensors"), "tensor", "weight_scale", CALIB),
    "static-ct-channel": (dict(scheme="static", format="compressed-tensors", per_channel=True), "channel",
                          "weight_scale", FEW),
    "block-ct": (dict(scheme="block", format="compressed-tensors"), "block", "weight_scale", None),
}


@pytest.fixture(scope="module")
def produced(moe_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("produced-moe")
    return {name: q(moe_model, root / name, **kw, **(calib or {})) for name, (kw, _, _, calib) in CASES.items()}


def _reference(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    if strategy == "tensor":
        return numerics.quantize_per_tensor(w.float())
    if strategy == "channel":
        return numerics.quantize_per_channel(w.float())
    return numerics.quantize_block(w.float(), block_size=(128, 128))


@pytest.mark.parametrize("case", list(CASES))
def test_expert_tensors_are_numerics_quantization(moe_model, produced, case):
    kw, strategy, scale_name, _ = CASES[case]
    ct = kw["format"] == "compressed-tensors"
    src, out = tensors(moe_model), tensors(produced[case].out_dir)
    static = kw["scheme"] == "static"
    expected = set()
    for i in range(LAYERS):
        dense = [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        for layer in experts(i) + dense:
            w = src[f"{layer}.weight"]
            rq, rs = _reference(w, strategy)
            got_q, got_s = out[f"{layer}.weight"], out[f"{layer}.{scale_name}"]
            assert same(got_q, rq), layer
            n, k = w.shape
            shape = {"tensor": (1,) if ct else (), "channel": (n, 1),
                     "block": (math.ceil(n / 128), math.ceil(k / 128))}[strategy]
            assert got_s.dtype == torch.float32 and tuple(got_s.shape) == shape, (layer, got_s.shape)
            assert torch.equal(got_s.reshape(rs.shape), rs), layer
            expected |= {f"{layer}.weight", f"{layer}.{scale_name}"}
            if static:
                s = out[f"{layer}.input_scale"]
                assert s.dtype == torch.float32 and tuple(s.shape) == ((1,) if ct else ()) and s.item() > 0
                expected.add(f"{layer}.input_scale")
        router = f"model.layers.{i}.mlp.gate.weight"
        assert same(out[router], src[router]) and out[router].dtype == torch.bfloat16
    # Everything else is the source tensor unchanged (norms, embeddings, routers, lm_head).
    rest = set(out) - expected
    assert rest == {k for k in src if k not in {e for e in expected if e.endswith(".weight")}}
    assert all(same(out[k], src[k]) for k in rest)
    r = produced[case]
    assert r.moe == [(f"model.layers.{i}.mlp.experts", E) for i in range(LAYERS)] and r.num_experts == 2 * E
    assert r.moe_16bit == [] and len(r.quantized) == 4 * LAYERS


@pytest.mark.parametrize("case", list(CASES))
def test_config_parses_and_every_expert_validates(produced, case):
    kw, strategy, scale_name, _ = CASES[case]
    out = produced[case].out_dir
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    routers = [f"model.layers.{i}.mlp.gate" for i in range(LAYERS)]
    s = parse_quantization_config(cfg)  # the project's parser
    assert s.scheme.weight == WEIGHTS[strategy] and s.weight_scale_name == scale_name
    assert (s.scheme.activation is not None and s.scheme.activation.static) == (kw["scheme"] == "static")
    for r in routers + ["lm_head"]:
        assert s.is_ignored(r), r
    assert not s.is_ignored("model.layers.0.mlp.experts")
    t = tensors(out)
    for i in range(LAYERS):
        for layer in experts(i) + [f"model.layers.{i}.self_attn.o_proj"]:
            assert s.is_quantized(layer)
            lt = validate_layer_tensors(layer, {k: v for k, v in t.items() if k.startswith(layer + ".")}, s)
            assert lt.unused == () and (lt.input_scale is not None) == (kw["scheme"] == "static")
    if kw["format"] == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        qc = QuantizationConfig.model_validate(cfg)  # the library's own model
        assert qc.ignore == ["lm_head"] + routers
        assert qc.config_groups["group_0"].targets == ["Linear"]
    else:
        assert cfg["ignored_layers"] == ["lm_head"] + routers


def _routed_input_amax(model_dir: Path, calib: dict) -> dict[str, float]:
    """Input amax per expert projection over the tokens routed to the expert, computed from the
    MoE block inputs, the router module, and the source checkpoint's per-expert weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp8_backend.quantize.corpus import DEFAULT_CORPUS, token_windows

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(token_windows(AutoTokenizer.from_pretrained(model_dir), DEFAULT_CORPUS, **calib))
    src = tensors(model_dir)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(LAYERS)}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]))) for i in range(LAYERS)]
    with torch.no_grad():
        for w in ids:
            model(w[None], use_cache=False)
    for h in hooks:
        h.remove()
    amax = {}
    with torch.no_grad():
        for i in range(LAYERS):
            x = torch.cat(seen[i])
            logits = x @ src[f"model.layers.{i}.mlp.gate.weight"].float().T
            top = logits.topk(MOE_SHAPE["num_experts_per_tok"], dim=-1).indices
            for e in range(E):
                xe = x[(top == e).any(-1)]
                if not len(xe):
                    continue
                p = f"model.layers.{i}.mlp.experts.{e}"
                g = xe @ src[f"{p}.gate_proj.weight"].float().T
                u = xe @ src[f"{p}.up_proj.weight"].float().T
                amax[f"{p}.gate_proj"] = amax[f"{p}.up_proj"] = xe.abs().amax().item()
                amax[f"{p}.down_proj"] = (torch.nn.functional.silu(g) * u).abs().amax().item()
    return amax


@pytest.mark.parametrize("case", ["static-autofp8", "static-ct"])
def test_static_expert_input_scales(moe_model, produced, case):
    """Experts that got tokens: amax of their routed inputs / 448. The others: the largest input
    scale of the same projection over the layer's calibrated experts (what vLLM serves for every
    expert of a static layer anyway), counted in the report."""
    calib = CASES[case][3]
    ref = _routed_input_amax(moe_model, calib)
    t = tensors(produced[case].out_dir)
    uncalibrated = {}
    for i in range(LAYERS):
        missing = set()
        for proj in PROJ:
            names = [f"model.layers.{i}.mlp.experts.{e}.{proj}" for e in range(E)]
            top = max(ref[n] for n in names if n in ref)
            for e, n in enumerate(names):
                got = t[f"{n}.input_scale"].item()
                if n in ref:
                    assert got == pytest.approx(ref[n] / 448, rel=1e-4), n
                else:
                    missing.add(e)
                    assert got == pytest.approx(top / 448, rel=1e-4), n
        if missing:
            uncalibrated[f"model.layers.{i}.mlp.experts"] = len(missing)
    assert produced[case].experts_uncalibrated == uncalibrated
    if calib is FEW:
        assert uncalibrated  # the fallback is exercised
    # Dense layers are calibrated as before: q/k/v share layer 0's normed embeddings.
    assert t["model.layers.0.self_attn.q_proj.input_scale"].item() == t["model.layers.0.self_attn.k_proj.input_scale"].item()


def test_ignored_moe_layer_stays_16bit(moe_model, tmp_path):
    src = tensors(moe_model)
    for fmt in ("autofp8", "compressed-tensors"):
        r = q(moe_model, tmp_path / fmt, scheme="block", format=fmt, ignore=["model.layers.1.mlp.experts"])
        t = tensors(r.out_dir)
        assert all(t[f"{n}.weight"].dtype == torch.float8_e4m3fn for n in experts(0))
        assert all(same(t[f"{n}.weight"], src[f"{n}.weight"]) and f"{n}.weight_scale" not in t for n in experts(1))
        assert r.moe == [("model.layers.0.mlp.experts", E)] and r.moe_16bit == [("model.layers.1.mlp.experts", E)]
        cfg = json.loads((r.out_dir / "config.json").read_text())["quantization_config"]
        s = parse_quantization_config(cfg)
        assert s.is_ignored("model.layers.1.mlp.experts") and not s.is_ignored("model.layers.0.mlp.experts")
        if fmt == "compressed-tensors":
            from compressed_tensors.utils.match import match_name

            # vLLM's compressed-tensors MoE method asks for "<experts>.0.gate_proj" etc.
            for n in experts(1)[:3] + experts(0)[:3]:
                assert any(match_name(n, p) for p in cfg["ignore"]) == (".layers.1." in n), n
        else:
            assert "model.layers.1.mlp.experts" in cfg["ignored_layers"]  # vLLM "fp8": exact name


def test_every_expert_projection_ignored_is_the_whole_layer(moe_model, tmp_path):
    r = q(moe_model, tmp_path / "o", ignore=[r"re:.*\.experts\.\d+\..*"])
    assert r.moe == [] and len(r.moe_16bit) == LAYERS and len(r.quantized) == 4 * LAYERS


@pytest.mark.parametrize("pattern", [r"re:.*experts\.3\..*", "re:.*down_proj"])
def test_partly_ignored_moe_layer_refused(moe_model, tmp_path, pattern):
    with pytest.raises(QuantizeError, match=r"ignore: patterns .* match \d+ of the 24 expert projections of MoE "
                                            r"layer model\.layers\.0\.mlp\.experts .*ignore 'model.layers.0.mlp.experts'"):
        q(moe_model, tmp_path / "o", ignore=[pattern])
    assert not (tmp_path / "o").exists()


# The ignore rule for MoE layers (formats.scheme.moe_layer_ignored), as the loader applies it
# (vllm_adapter.moe.moe_layer_ignored: expert count and projection names from vLLM's layer) and
# as the producer does above (the stored projections).

ONE_EXPERT = [r"re:.*experts\.3\..*", "model.layers.0.mlp.experts.3.down_proj", "model.layers.0.mlp.experts.3",
              "mlp.experts.3.gate_proj", "experts.3", "*.experts.3.*", "re:.*down_proj"]


def _fake_moe_layer(num_experts=E, projs=PROJ):
    from types import SimpleNamespace

    return SimpleNamespace(moe_config=SimpleNamespace(num_logical_experts=num_experts),
                           ckpt_gate_proj_name=projs[0], ckpt_up_proj_name=projs[1], ckpt_down_proj_name=projs[2])


@pytest.mark.parametrize("pattern", ONE_EXPERT)
def test_loader_refuses_ignore_naming_some_experts(pattern):
    from fp8_backend.formats.checkpoint import CheckpointFormatError
    from fp8_backend.vllm_adapter.moe import moe_layer_ignored

    layer = "model.layers.0.mlp.experts"
    msg = (rf"patterns \[{re.escape(repr(pattern))}\] match \d+ of the 24 expert projections of MoE layer "
           rf"{re.escape(layer)} .*ignore '{re.escape(layer)}' to keep them 16-bit")
    with pytest.raises(ValueError, match="ignore: " + msg):  # online quantization="fp8"
        moe_layer_ignored(_fake_moe_layer(), layer, ["lm_head", pattern])
    with pytest.raises(CheckpointFormatError, match=r"quantization_config\.ignore: " + msg):
        moe_layer_ignored(_fake_moe_layer(), layer, [pattern], "compressed-tensors")
    with pytest.raises(CheckpointFormatError, match=r"quantization_config\.ignored_layers: " + msg):
        moe_layer_ignored(_fake_moe_layer(), layer, [pattern], "fp8")


@pytest.mark.parametrize("patterns", [["model.layers.0.mlp.experts"], ["mlp.experts"], [r"re:.*\.experts\.\d+\..*"],
                                      ["re:.*gate_proj", "re:.*up_proj", "re:.*down_proj"],
                                      [f"model.layers.0.mlp.experts.{e}" for e in range(E)],
                                      # the producer's compressed-tensors entry for an ignored MoE layer
                                      [r"re:model\.layers\.0\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)$"]])
def test_loader_keeps_a_wholly_ignored_moe_layer_16bit(patterns):
    from fp8_backend.vllm_adapter.moe import moe_layer_ignored

    assert moe_layer_ignored(_fake_moe_layer(), "model.layers.0.mlp.experts", patterns)
    assert moe_layer_ignored(_fake_moe_layer(), "model.layers.0.mlp.experts", patterns, "compressed-tensors")


@pytest.mark.parametrize("patterns", [[], ["lm_head"], ["re:.*mlp.gate$", "re:.*shared_expert_gate$"],
                                      ["model.layers.0.mlp.gate", "model.layers.1.mlp.experts",
                                       "model.layers.1.mlp.experts.3.down_proj"], ["experts.30"]])
def test_loader_quantizes_moe_layer_no_pattern_names(patterns):
    from fp8_backend.vllm_adapter.moe import moe_layer_ignored

    assert not moe_layer_ignored(_fake_moe_layer(), "model.layers.0.mlp.experts", patterns)


def test_loader_ignore_rule_uses_the_models_projection_names():
    from fp8_backend.vllm_adapter.moe import moe_layer_ignored

    mixtral = _fake_moe_layer(projs=("w1", "w3", "w2"))
    layer = "model.layers.0.block_sparse_moe.experts"
    with pytest.raises(ValueError, match=r"match 8 of the 24 expert projections of MoE layer " + re.escape(layer)):
        moe_layer_ignored(mixtral, layer, ["re:.*\\.w2$"])
    assert not moe_layer_ignored(mixtral, layer, ["re:.*down_proj"])


def test_moe_ignore_rule_is_the_producers(moe_model, tmp_path):
    # Same rule, same sentence: the producer refuses a single expert before writing anything.
    with pytest.raises(QuantizeError, match=r"ignore: patterns \['model.layers.1.mlp.experts.3'\] match 3 of the 24 "
                                            r"expert projections of MoE layer model\.layers\.1\.mlp\.experts"):
        q(moe_model, tmp_path / "o", ignore=["model.layers.1.mlp.experts.3"])
    assert not (tmp_path / "o").exists()


def test_incomplete_experts_refused(moe_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(moe_model, bad)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizeError, match=r"MoE layer model.layers.1.mlp.experts: expected gate / up / down "
                                            r"projection weights for each of experts 0..7, found 1 missing "
                                            r".*model.layers.1.mlp.experts.5.up"):
        q(bad, tmp_path / "o")


def test_fused_expert_storage_passes_through_16bit(moe_model, tmp_path, capsys):
    """Experts stored as fused 3-D tensors (no per-expert layout to keep) stay 16-bit, and say so."""
    from fp8_backend.cli import main

    fused = tmp_path / "fused"
    shutil.copytree(moe_model, fused)
    sd = load_file(str(fused / "model.safetensors"))
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        gate_up = [torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")]) for e in range(E)]
        sd[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(E)])
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    assert main(["quantize", str(fused), str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "8 FP8 linear layers, 5 left 16-bit" in out
    assert "mixture-of-experts: 2 MoE layers (16 experts) written 16-bit" in out
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert cfg["ignored_layers"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate",
                                     "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    t = tensors(tmp_path / "o")
    assert all(same(t[k], sd[k]) for k in sd if ".experts." in k)


def test_nan_in_an_expert_named(moe_model, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(moe_model, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.mlp.experts.6.down_proj.weight"][1, 2] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.6.down_proj.weight: expected finite values"):
        q(bad, tmp_path / "o", scheme="block")


def test_streaming_buffer_bounded_with_experts(moe_model, tmp_path, monkeypatch):
    """Experts are converted one tensor at a time like any linear weight: the writer never holds
    more than one output shard (+ the tensor being added), and each input tensor is read once."""
    from fp8_backend.quantize import shards

    peak, reads = [], []
    real_flush, real_get = shards.ShardWriter.flush, shards.ShardReader.get

    def flush(self):
        peak.append(self.size)
        real_flush(self)

    def get(self, name):
        reads.append(name)
        return real_get(self, name)

    monkeypatch.setattr(shards.ShardWriter, "flush", flush)
    monkeypatch.setattr(shards.ShardReader, "get", get)
    limit = 64 << 10
    r = q(moe_model, tmp_path / "o", scheme="block", max_shard_bytes=limit)
    biggest = 512 * 256 * 2  # embeddings / lm_head, bf16
    assert max(peak) < limit + biggest and len(r.shards) > 3
    assert sorted(reads) == sorted(tensors(moe_model))


def test_cli_reports_experts(moe_model, tmp_path, capsys):
    from fp8_backend.cli import main

    rc = main(["quantize", str(moe_model), str(tmp_path / "o"), "--scheme", "static", "--num-samples", "1",
               "--seq-len", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "8 FP8 linear layers, 16 experts in 2 MoE layers, 3 left 16-bit (lm_head, model.layers.0.mlp.gate" in out
    assert re.search(r"static input scales: \d+ of 16 experts got no calibration token", out)
    assert "written 16-bit" not in out


# ---------------------------------------------------------------------------------------------
# Qwen2-MoE shape: a shared expert (dense, quantized) and its shared_expert_gate (a router: 16-bit)
# ---------------------------------------------------------------------------------------------


def build_tiny_qwen2_moe(out: Path) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    shutil.copytree(build_tiny_qwen3_moe(out.parent / "q3", num_layers=1), out)
    (out / "model.safetensors").unlink()
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    torch.manual_seed(1)
    cfg = Qwen2MoeConfig(vocab_size=vocab, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                         shared_expert_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, initializer_range=0.08, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    Qwen2MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    data = json.loads((out / "config.json").read_text())
    data.setdefault("rope_theta", 10000.0)
    (out / "config.json").write_text(json.dumps(data, indent=2))
    return out


def test_qwen2_moe_shared_expert(tmp_path):
    src_dir = build_tiny_qwen2_moe(tmp_path / "q2")
    r = q(src_dir, tmp_path / "o", scheme="static", format="compressed-tensors", **CALIB)
    t, src = tensors(r.out_dir), tensors(src_dir)
    base = "model.layers.0.mlp"
    assert r.ignored == ["lm_head", f"{base}.gate", f"{base}.shared_expert_gate"]
    assert same(t[f"{base}.shared_expert_gate.weight"], src[f"{base}.shared_expert_gate.weight"])
    for p in PROJ:
        assert t[f"{base}.shared_expert.{p}.weight"].dtype == torch.float8_e4m3fn
        assert t[f"{base}.shared_expert.{p}.input_scale"].item() > 0
        for e in range(4):
            rq, rs = numerics.quantize_per_tensor(src[f"{base}.experts.{e}.{p}.weight"].float())
            assert same(t[f"{base}.experts.{e}.{p}.weight"], rq)
            assert t[f"{base}.experts.{e}.{p}.input_scale"].item() > 0
    assert r.moe == [(f"{base}.experts", 4)] and len(r.quantized) == 4 + 3
    cfg = json.loads((r.out_dir / "config.json").read_text())["quantization_config"]
    s = parse_quantization_config(cfg)
    assert s.is_ignored(f"{base}.shared_expert_gate") and s.is_quantized(f"{base}.shared_expert.down_proj")
