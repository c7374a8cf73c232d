"""`fp8-backend eval` end to end: a bf16 reference engine and an online FP8 engine on a text file."""

import json

from eval_cli import run_eval_cli


def test_eval_cli_online_fp8_end_to_end(tmp_path, tiny_model):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(" ".join(f"word{(i * 7 + j) % 50}" for j in range(80)) for i in range(3)))
    out = tmp_path / "out"
    r = run_eval_cli(tiny_model, "--text", text, "--windows", "2", "--window-len", "32", "--kv-cache-dtype", "auto",
             "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert rows[0]["linear"]["n_fp8"] == 0
    assert rows[1]["linear"]["n_fp8"] == rows[1]["linear"]["n_linear"] > 0
    a = rows[1]["agreement"]
    assert a["tokens"] == 2 * 31 and 0 < a["mean_abs"] < 0.1  # FP8 weights move log-probs a little
    assert "| tiny-llama" in (out / "eval.md").read_text() or "(reference)" in (out / "eval.md").read_text()
    assert (out / "eval_logprob_delta.png").stat().st_size > 1000
