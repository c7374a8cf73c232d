"""The FP8 checkpoint producer (fp8_backend.quantize): numerics, formats, calibration, streaming,
all-or-nothing output, bad input (round trips through vLLM: tests/engine/test_quantize_roundtrip.py).

Independent references: numerics.py for the tensors, the small writers of tests/support/checkpoint_writers.py
(plain torch, tests/support/checkpoint_writers.py) for the checkpoint layouts, transformers modules called directly for calibration.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from quantize_cases import CALIB, CASES, q, same, tensors
from schemes import WEIGHTS, scheme
from fp8_backend.testing.tiny_model import build_tiny_llama

from fp8_backend import numerics
from fp8_backend.formats.checkpoint import parse_quantization_config
from fp8_backend.quantize import QuantizeError
from fp8_backend.quantize import api as qapi
from fp8_backend.quantize.weights import MSE_GRID, choose_scale

# ---------------------------------------------------------------------------------------------
# Weight quantization against numerics.py, and the MSE scale search
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (1, 7), (129, 257)])
def test_amax_scales_are_numerics(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    w[0, 0] = 0.0
    for strategy, ref in (("tensor", numerics.quantize_per_tensor), ("channel", numerics.quantize_per_channel),
                          ("block", numerics.quantize_block)):
        scale, _ = choose_scale(w, WEIGHTS[strategy])
        rq, rs = ref(w)
        assert torch.equal(scale.reshape(rs.shape), rs), strategy


def test_all_zero_rows_get_the_scale_floor():
    w = torch.zeros(4, 8)
    w[1] = 1.0
    scale, err = choose_scale(w, WEIGHTS["channel"], "mse")
    assert scale[0, 0].item() == pytest.approx(numerics.scale_floor(), rel=1e-6) and scale[1, 0].item() == pytest.approx(1 / 448)
    assert err.sum().item() == 0.0


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_mse_search_never_worse_and_helps_heavy_tails(strategy):
    torch.manual_seed(1)
    # Student-t-like weights (a few outliers per row), as real LLM weights have.
    w = torch.distributions.StudentT(3.0).sample((256, 320)) * 0.02
    s_amax, e_amax = choose_scale(w, WEIGHTS[strategy], "none")
    s_mse, e_mse = choose_scale(w, WEIGHTS[strategy], "mse")
    assert 1.0 in MSE_GRID and min(MSE_GRID) == 0.7
    assert bool((e_mse <= e_amax).all())  # per scale group, not just in total
    assert e_mse.sum() < e_amax.sum()  # and it does find something on heavy tails
    # The reported error is the error of the stored tensors.
    exp = s_mse if strategy != "block" else numerics.expand_block_scale(s_mse, tuple(w.shape), (128, 128))
    deq = numerics.dequantize(numerics.quantize_with_scale(w, exp), exp)
    assert ((deq - w) ** 2).sum().item() == pytest.approx(e_mse.sum().item(), rel=1e-5)


def test_mse_search_keeps_amax_when_nothing_clips_better():
    w = torch.full((3, 16), 0.5)
    w[:, 0] = -0.5
    s_amax, _ = choose_scale(w, WEIGHTS["channel"], "none")
    s_mse, e = choose_scale(w, WEIGHTS["channel"], "mse")
    assert torch.equal(s_amax, s_mse) and e.sum() == 0


# ---------------------------------------------------------------------------------------------
# Checkpoints: tensors against the independent writers, configs against both parsers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_producer_tensors_equal_the_independent_writer(tiny_model, tmp_path, produced, case):
    ours = tensors(produced[case].out_dir)
    theirs = tensors(CASES[case][1](tiny_model, tmp_path / "ref"))
    # The writers store a made-up input_scale (0.02); ours is calibrated (tested below).
    inputs = {k for k in ours if k.endswith(".input_scale")}
    assert inputs == {k for k in theirs if k.endswith(".input_scale")}
    assert set(ours) == set(theirs)
    for k in sorted(set(ours) - inputs):
        assert same(ours[k], theirs[k]), (k, ours[k].dtype, theirs[k].dtype, ours[k].shape, theirs[k].shape)
    n_fp8 = sum(t.dtype == torch.float8_e4m3fn for t in ours.values())
    assert n_fp8 == 14  # 2 layers x 7 linears; lm_head stays bf16
    assert ours["lm_head.weight"].dtype == torch.bfloat16


EXPECTED = {  # parse_quantization_config(...) fields per case
    "dynamic-autofp8": ("fp8", scheme("tensor", "dynamic"), "weight_scale"),
    "static-autofp8": ("fp8", scheme("tensor", "static"), "weight_scale"),
    "block-autofp8": ("fp8", scheme("block", "dynamic"), "weight_scale_inv"),
    "dynamic-ct-channel": ("compressed-tensors", scheme("channel", "dynamic"), "weight_scale"),
    "static-ct": ("compressed-tensors", scheme("tensor", "static"), "weight_scale"),
    "block-ct": ("compressed-tensors", scheme("block", "dynamic"), "weight_scale"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_written_config_parses_back(produced, case):
    cfg = json.loads((produced[case].out_dir / "config.json").read_text())["quantization_config"]
    s = parse_quantization_config(cfg)
    assert (s.source, s.scheme, s.weight_scale_name) == EXPECTED[case]
    assert s.is_ignored("lm_head") and not s.is_ignored("model.layers.0.mlp.down_proj")
    assert s.kv_cache is None
    if cfg["quant_method"] == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        qc = QuantizationConfig.model_validate(cfg)  # the library's own parser
        assert qc.format == "float-quantized" and qc.quantization_status == "compressed"
        assert qc.ignore == ["lm_head"]


def test_static_input_scales_are_calibrated_amax(tiny_model, produced):
    """input_scale = amax(layer input)/448 over the calibration windows, recomputed here by
    calling the transformers modules directly (no hooks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp8_backend.quantize.corpus import DEFAULT_CORPUS, token_windows

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.tensor(token_windows(tok, DEFAULT_CORPUS, **CALIB))
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    amax = h.abs().amax()
    for case, shape in (("static-autofp8", ()), ("static-ct", (1,))):
        t = tensors(produced[case].out_dir)
        for p in ("q_proj", "k_proj", "v_proj"):
            s = t[f"model.layers.0.self_attn.{p}.input_scale"]
            assert s.shape == shape and s.dtype == torch.float32
            assert s.item() == pytest.approx(amax.item() / 448, rel=1e-5)
        assert all(v.item() > 0 and math.isfinite(v.item()) for k, v in t.items() if k.endswith("input_scale"))


@pytest.mark.parametrize("fmt", ["autofp8", "compressed-tensors"])
def test_kv_cache_scales_written(tiny_model, tmp_path, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp8_backend.quantize.corpus import DEFAULT_CORPUS, token_windows

    r = q(tiny_model, tmp_path / "kv", scheme="dynamic", format=fmt, kv_cache=True, **CALIB)
    t = tensors(r.out_dir)
    shape = (1,) if fmt == "compressed-tensors" else ()
    for i in range(2):
        for s in ("k_scale", "v_scale"):
            v = t[f"model.layers.{i}.self_attn.{s}"]
            assert v.shape == shape and v.dtype == torch.float32 and v.item() > 0
    # Independent: layer 0's k/v projections of the normed embeddings.
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.tensor(token_windows(AutoTokenizer.from_pretrained(tiny_model), DEFAULT_CORPUS, **CALIB))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k_amax, v_amax = attn.k_proj(h).abs().amax(), attn.v_proj(h).abs().amax()
    assert t["model.layers.0.self_attn.k_scale"].item() == pytest.approx(k_amax.item() / 448, rel=1e-5)
    assert t["model.layers.0.self_attn.v_scale"].item() == pytest.approx(v_amax.item() / 448, rel=1e-5)
    cfg = json.loads((r.out_dir / "config.json").read_text())["quantization_config"]
    scheme = parse_quantization_config(cfg)
    assert scheme.kv_cache is not None and scheme.kv_cache.strategy == "tensor"
    if fmt == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        kv = QuantizationConfig.model_validate(cfg).kv_cache_scheme
        assert (kv.num_bits, kv.type, kv.strategy, kv.dynamic) == (8, "float", "tensor", False)
    else:
        assert cfg["kv_cache_scheme"] == "static"


# ---------------------------------------------------------------------------------------------
# Streaming, shards, copied files
# ---------------------------------------------------------------------------------------------


def test_sharded_input_and_small_output_shards(tiny_model, sharded_model, tmp_path, produced):
    r = q(sharded_model, tmp_path / "out", scheme="dynamic", max_shard_bytes=256 << 10)
    out = r.out_dir
    assert len(r.shards) > 3 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = tensors(out)
    assert set(index["weight_map"]) == set(got) and set(index["weight_map"].values()) == set(r.shards)
    ref = tensors(produced["dynamic-autofp8"].out_dir)
    assert set(got) == set(ref) and all(same(got[k], ref[k]) for k in ref)
    assert (out / "README.md").read_text() == "model card"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tiny_model / f).read_bytes()
    assert not list(out.glob(".part-*")) and not list(out.parent.glob(".out.*"))


def test_peak_buffer_bounded_by_shard_size(sharded_model, tmp_path, monkeypatch):
    """The writer never holds more than one output shard (+ the tensor being added)."""
    from fp8_backend.quantize import shards

    peak = []
    real_flush = shards.ShardWriter.flush

    def flush(self):
        peak.append(self.size)
        real_flush(self)

    monkeypatch.setattr(shards.ShardWriter, "flush", flush)
    limit = 200 << 10
    q(sharded_model, tmp_path / "out", scheme="block", max_shard_bytes=limit)
    biggest = 688 * 256 * 2  # largest input tensor (bf16 gate/up/down or embeddings 512x256)
    assert max(peak) < limit + biggest and len(peak) > 3


# ---------------------------------------------------------------------------------------------
# Never a partial checkpoint
# ---------------------------------------------------------------------------------------------


def _fail_after(monkeypatch, n: int, exc: BaseException):
    real = qapi.quantize_weight
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) > n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(qapi, "quantize_weight", boom)


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_midway_leaves_nothing(tiny_model, tmp_path, monkeypatch, exc):
    out = tmp_path / "out"
    _fail_after(monkeypatch, 5, exc)
    with pytest.raises(type(exc)):
        q(tiny_model, out, max_shard_bytes=64 << 10)  # small shards: some were written already
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_with_force_keeps_old_output(tiny_model, tmp_path, monkeypatch, exc):
    out = tmp_path / "out"
    q(tiny_model, out, scheme="block")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_after(monkeypatch, 5, exc)
    with pytest.raises(type(exc)):
        q(tiny_model, out, scheme="dynamic", force=True, max_shard_bytes=64 << 10)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_refused_without_force_replaced_with(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QuantizeError, match=r"out_dir: .*out' already exists.*--force"):
        q(tiny_model, out)
    assert (out / "keep.txt").read_text() == "mine"
    q(tiny_model, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the option / file / tensor
# ---------------------------------------------------------------------------------------------


def _with_weight(src: Path, dst: Path, name: str, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd[name] = edit(sd[name])
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _nan(t):
    t = t.clone()
    t[3, 4] = float("nan")
    return t


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(scheme="w4a16"), r"scheme: expected one of \['dynamic', 'static', 'block'\], found 'w4a16'"),
        (dict(format="gguf"), r"format: expected one of \['autofp8', 'compressed-tensors'\], found 'gguf'"),
        (dict(scale_search="grid"), r"scale_search: expected one of \['none', 'mse'\], found 'grid'"),
        (dict(per_channel=True), r"per_channel: the AutoFP8 'fp8' format stores one weight scale per tensor"),
        (dict(scheme="block", per_channel=True, format="compressed-tensors"), r"per_channel: expected False with scheme 'block'"),
        (dict(num_samples=0), r"num_samples: expected an integer >= 1, found 0"),
        (dict(ignore=["re:("]), r"ignore: expected 're:' \+ a valid regex, found 're:\('"),
        (dict(ignore=["mlp.nonexistent_proj"]), r"ignore: patterns \['mlp.nonexistent_proj'\] match none"),
    ],
)
def test_bad_options(tiny_model, tmp_path, kw, message):
    with pytest.raises(QuantizeError, match=message):
        q(tiny_model, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_bad_inputs(tiny_model, tmp_path):
    empty = tmp_path / "nosafetensors"
    shutil.copytree(tiny_model, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(QuantizeError, match=r"model_dir: expected \*.safetensors weight files in .*nosafetensors.*found none"):
        q(empty, tmp_path / "o1")

    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_model, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(QuantizeError, match=r"trunc/model.safetensors: .*(truncated|safetensors)"):
        q(trunc, tmp_path / "o2")

    bad = _with_weight(tiny_model, tmp_path / "nan", "model.layers.1.mlp.up_proj.weight", _nan)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight: expected finite values, found 1 NaN"):
        q(bad, tmp_path / "o3")

    calib = tmp_path / "empty.txt"
    calib.write_text("\n  \n")
    with pytest.raises(QuantizeError, match=r"calib: expected calibration text, found an empty file .*empty.txt"):
        q(tiny_model, tmp_path / "o4", scheme="static", calib=str(calib))
    with pytest.raises(QuantizeError, match=r"calib: expected a text file, found no file at .*missing.txt"):
        q(tiny_model, tmp_path / "o5", scheme="static", calib=str(tmp_path / "missing.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "nan", "nosafetensors", "trunc"]


def test_calibration_from_user_file(tiny_model, tmp_path, produced):
    calib = tmp_path / "calib.txt"
    calib.write_text("The cat sat on the mat.\nParis is the capital of France.\n")
    r = q(tiny_model, tmp_path / "out", scheme="static", calib=str(calib), **CALIB)
    ours = tensors(r.out_dir)["model.layers.0.self_attn.q_proj.input_scale"]
    default = tensors(produced["static-autofp8"].out_dir)["model.layers.0.self_attn.q_proj.input_scale"]
    assert ours.item() > 0 and ours.item() != default.item()  # the file's text was used


def test_cli(tiny_model, tmp_path, capsys):
    from fp8_backend.cli import main

    rc = main(["quantize", str(tiny_model), str(tmp_path / "o"), "--scheme", "dynamic", "--per-channel",
               "--format", "compressed-tensors", "--ignore", "re:.*down_proj", "--scale-search", "mse"])
    out = capsys.readouterr().out
    assert rc == 0 and "12 FP8 linear layers, 3 left 16-bit" in out and "scale search: weight quantization MSE" in out
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert sorted(cfg["ignore"]) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert main(["quantize", str(tiny_model), str(tmp_path / "o")]) == 1
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# SmolLM2-shaped model: tied embeddings, 9 heads / 3 KV heads, hidden 576 (partial 128 blocks)
# ---------------------------------------------------------------------------------------------


def test_smollm2_shaped_model(tmp_path):
    src = build_tiny_llama(tmp_path / "smol", hidden_size=576, intermediate_size=1536, num_layers=1,
                           num_heads=9, num_kv_heads=3)
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "model.safetensors"))
    sd.pop("lm_head.weight", None)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    r = q(src, tmp_path / "blk", scheme="block", format="compressed-tensors", kv_cache=True,
          scale_search="mse", num_samples=2, seq_len=32)
    t = tensors(r.out_dir)
    assert "lm_head.weight" not in t and t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.self_attn.q_proj.weight_scale"].shape == (5, 5)  # 576 = 4*128 + 64
    assert t["model.layers.0.self_attn.k_proj.weight_scale"].shape == (2, 5)  # 192 rows
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (5, 12)
    assert r.mse_ratio <= 1.0
    parse_quantization_config(json.loads((r.out_dir / "config.json").read_text())["quantization_config"])
