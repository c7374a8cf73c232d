"""`fp8-backend eval --simulate` end to end on the tiny llama: the online FP8 engines (16-bit and FP8
KV cache) must agree with the transformers simulation of numerics.py within the documented bound
(fp8_backend.eval.simulate.verdict: each vs its 16-bit reference within TARGET_PCT, the accuracy
report's 0.2% perplexity target, with enough text that two standard errors fit in it), and a
model transformers cannot load is refused up front."""

import json
import shutil

from eval_cli import run_eval_cli

from fp8_backend.eval.simulate import TARGET_PCT


def _text(path, texts=3, words=80):
    path.write_text("\n\n".join(" ".join(f"word{(i * 7 + j * 3 + i * j) % 50}" for j in range(words))
                                for i in range(texts)))
    return path


def test_eval_simulate_engine_agrees_with_numerics(tmp_path, tiny_model):
    out = tmp_path / "out"
    # 16 x 255 scored tokens: enough that two standard errors of the verdict's difference (~0.03%
    # for FP8 weights, ~0.07% with the FP8 cache) fit in the 0.2% target, so the verdict is decided
    text = _text(tmp_path / "t.txt", texts=16, words=200)
    r = run_eval_cli(tiny_model, "--text", text, "--windows", "16", "--window-len", "256",
                     "--kv-cache-dtype", "auto", "--kv-cache-dtype", "fp8", "--simulate", "--no-plot", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "eval.json").read_text())["rows"]
    sims = {row["config"]: row["simulation"] for row in rows}
    assert set(sims) == {"reference", "c0", "c1"}
    # like-for-like: fp32 for the 16-bit model and FP8 weights, bf16 where keys/values round to FP8
    assert sims["reference"]["spec"] == {"model": str(tiny_model), "checkpoint": None, "online": None,
                                         "activations": None, "kv_cache_dtype": None, "dtype": "float32"}
    assert (sims["c0"]["spec"]["online"], sims["c0"]["spec"]["kv_cache_dtype"], sims["c0"]["spec"]["dtype"]) == \
        ({"rows": 0, "cols": 0}, None, "float32")  # per-tensor weights (a Granularity)
    assert (sims["c1"]["spec"]["kv_cache_dtype"], sims["c1"]["spec"]["dtype"]) == ("fp8", "bfloat16")
    assert sims["reference"]["verdict"] == "reference" and "rel_pct" not in sims["reference"]
    for name in ("c0", "c1"):
        s = sims[name]
        assert s["target_pct"] == TARGET_PCT
        assert s["verdict"] == "yes" and abs(s["rel_pct"]) <= TARGET_PCT and 2 * s["rel_se_pct"] <= TARGET_PCT, s
    # per token, engine and simulation differ by bf16-vs-fp32 noise (~0.01-0.02 nats), well below
    # what FP8 does to the log-probs against the reference (~0.1)
    for name in ("reference", "c0", "c1"):
        assert sims[name]["mean_abs"] < 0.05, (name, sims[name])
    fp8_effect = {row["config"]: row["agreement"]["mean_abs"] for row in rows if "agreement" in row}
    assert all(sims[k]["mean_abs"] < fp8_effect[k] / 2 for k in ("c0", "c1")), (sims, fp8_effect)
    md = (out / "eval.md").read_text()
    assert "Engine vs simulation" in md and md.count("| yes |") == 2 and "(16-bit offset)" in md


def test_eval_simulate_block_checkpoint(tmp_path, tiny_model):
    """A producer checkpoint with 128x128 weight blocks (partial last blocks: K = 688) against
    --reference: the simulation dequantizes the checkpoint's own scales and agrees with the engine."""
    from fp8_backend.quantize import quantize

    ckpt = tmp_path / "tiny-block"
    quantize(tiny_model, ckpt, scheme="block", format="autofp8", progress=False)
    out = tmp_path / "out"
    text = _text(tmp_path / "t.txt", texts=16, words=200)
    r = run_eval_cli(ckpt, "--reference", tiny_model, "--text", text, "--windows", "16", "--window-len", "256",
                     "--kv-cache-dtype", "auto", "--simulate", "--no-plot", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "eval.json").read_text())["rows"]
    s = rows[1]["simulation"]
    assert s["spec"]["checkpoint"] == str(ckpt) and s["spec"]["model"] == str(tiny_model)
    assert (s["spec"]["dtype"], s["spec"]["activations"], s["spec"]["kv_cache_dtype"]) == ("float32", None, None)
    assert s["verdict"] == "yes" and abs(s["rel_pct"]) <= TARGET_PCT, s
    assert rows[1]["linear"]["n_fp8"] == rows[1]["linear"]["n_linear"] > 0


def test_eval_simulate_refuses_a_model_transformers_cannot_load(tmp_path, tiny_model):
    bad = tmp_path / "unknown-arch"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_eval_cli(bad, "--text", _text(tmp_path / "t.txt"), "--simulate", "--out", tmp_path / "out", timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "--simulate" in r.stderr and "unknown-arch" in r.stderr
    assert "scoring" not in r.stdout  # refused before any engine started
