"""fp8_backend.eval: the numbers (pure), the report, and `fp8-backend eval` end to end."""

import json
import math

import pytest
from eval_cli import run_eval_cli

from fp8_backend.eval import linear_summary, logprob_agreement, make_windows, perplexity
from fp8_backend.eval import report
from fp8_backend.eval.run import compare


def test_perplexity_and_agreement_exact():
    ref = [[-1.0, -2.0], [-3.0]]
    other = [[-1.5, -2.0], [-2.0]]
    assert perplexity(ref) == pytest.approx(math.exp(2.0))
    a = logprob_agreement(ref, other)
    assert a["tokens"] == 3 and a["mean_abs"] == pytest.approx(0.5) and a["max_abs"] == 1.0
    assert a["ppl_ref"] == pytest.approx(math.exp(2.0)) and a["ppl"] == pytest.approx(math.exp(5.5 / 3))


def test_agreement_refuses_mismatched_windows():
    with pytest.raises(ValueError, match="window 1 scored to 1 and 2 tokens"):
        logprob_agreement([[-1.0], [-1.0]], [[-1.0], [-1.0, -2.0]])
    with pytest.raises(ValueError, match="2 reference windows, 1 compared"):
        logprob_agreement([[-1.0], [-1.0]], [[-1.0]])
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity([[]])


def test_make_windows_bos_and_too_few():
    assert make_windows([[1, 2, 3], [4, 5, 6, 7]], n_windows=1, window_len=4, bos_id=0) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="only 0 windows of 9 tokens"):
        make_windows([[1, 2]], n_windows=1, window_len=9)


def _linear(n_fp8: int) -> dict:
    layers = {f"l{i}": {"in_features": 4, "out_features": 8, "quant_method": "m.M",
                        "weight_dtype": "torch.float8_e4m3fn" if i < n_fp8 else "torch.bfloat16",
                        "weight_nbytes": 32, "scale_numel": 8} for i in range(2)}
    return {"linear": layers}


def test_linear_summary_counts_fp8_storage_and_logical_bf16():
    s = linear_summary(_linear(1))
    assert s["n_fp8"] == 1 and s["n_linear"] == 2
    assert s["bytes"] == (32 + 4 * 8) + 2 * 32 and s["bf16_bytes"] == 2 * 2 * 32


def test_markdown_and_plot(tmp_path):
    ref = {"logprobs": [[-1.0, -2.0, -0.5]], "linear": linear_summary(_linear(0))}
    res = {"c0": {"logprobs": [[-1.1, -2.0, -0.4]], "linear": linear_summary(_linear(2))}}
    labels = {"reference": "bf16", "c0": "fp8"}
    md = report.markdown(compare(ref, res), labels, 1, 4)
    assert "| bf16 (reference) |" in md and "| fp8 |" in md and "0.0667" in md
    png = report.plot(ref, res, labels, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_refuses_bad_input(tmp_path, tiny_model):
    r = run_eval_cli(tmp_path / "nope", "--text", tmp_path / "t.txt")
    assert r.returncode == 2 and "model: expected a directory with config.json" in r.stderr
    r = run_eval_cli(tiny_model, "--text", tmp_path / "missing.txt")
    assert r.returncode == 2 and "--text: file not found" in r.stderr
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    (tmp_path / "t.txt").write_text("a b c")
    r = run_eval_cli(ckpt, "--text", tmp_path / "t.txt")
    assert r.returncode == 2 and "--reference" in r.stderr and "quantized checkpoint" in r.stderr
    r = run_eval_cli(tiny_model, "--text", tmp_path / "t.txt", "--windows", "2", "--window-len", "64")
    assert r.returncode == 2 and "only 0 windows of 64 tokens" in r.stderr
