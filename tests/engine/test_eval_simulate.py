"""`fp8-backend eval --simulate` end to end on the tiny llama: the engines (16-bit reference, online
FP8 with a 16-bit and with an FP8 KV cache) must agree with the transformers simulation of
numerics.py within the documented bound (fp8_backend.eval.simulate.TARGET_PCT, the accuracy
report's 0.2% perplexity target), and a model transformers cannot load is refused up front."""

import json
import shutil

from eval_cli import run_eval_cli

from fp8_backend.eval.simulate import TARGET_PCT


def _text(path):
    path.write_text("\n\n".join(" ".join(f"word{(i * 7 + j) % 50}" for j in range(80)) for i in range(3)))
    return path


def test_eval_simulate_engine_agrees_with_numerics(tmp_path, tiny_model):
    out = tmp_path / "out"
    r = run_eval_cli(tiny_model, "--text", _text(tmp_path / "t.txt"), "--windows", "2", "--window-len", "32",
                     "--kv-cache-dtype", "auto", "--kv-cache-dtype", "fp8", "--simulate", "--no-plot", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "eval.json").read_text())["rows"]
    sims = {row["config"]: row["simulation"] for row in rows}
    assert set(sims) == {"reference", "c0", "c1"}
    # like-for-like: fp32 for the 16-bit model and FP8 weights, bf16 where keys/values round to FP8
    assert sims["reference"]["spec"] == {"model": str(tiny_model), "checkpoint": None, "online": None,
                                         "activations": None, "kv_cache_dtype": None, "dtype": "float32"}
    assert (sims["c0"]["spec"]["online"], sims["c0"]["spec"]["kv_cache_dtype"], sims["c0"]["spec"]["dtype"]) == \
        ("tensor", None, "float32")
    assert (sims["c1"]["spec"]["kv_cache_dtype"], sims["c1"]["spec"]["dtype"]) == ("fp8", "bfloat16")
    for name, s in sims.items():
        assert s["target_pct"] == TARGET_PCT
        assert abs(s["diff_pct"]) <= TARGET_PCT and s["within"], (name, s)
        # per token, engine and simulation differ by bf16-vs-fp32 noise, far below FP8's effect
        # (the FP8 configurations move log-probs by ~0.01-0.1 against the reference)
        assert s["mean_abs"] < 0.01, (name, s)
    md = (out / "eval.md").read_text()
    assert "Engine vs simulation" in md and md.count("| yes |") == 3


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
