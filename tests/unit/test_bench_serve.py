"""Pure helpers of benchmarks/bench_serve.py: argument parsing, reading a guidellm 0.8.1 JSON
report, ratios and the RESULTS.md section. Nothing here starts a server or times anything."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
bs = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = bs
_spec.loader.exec_module(bs)

# A guidellm 0.8.1 report (`guidellm run ... --output kind=json`) against `fp8-backend serve`,
# concurrent profile at 2 streams, 4 requests, 64 output tokens (chat API: 286 prompt tokens),
# trimmed to the fields bench_serve reads (the real file also holds every request, the config
# and many more distributions) with floats rounded to 4 decimals.
SAMPLE = json.loads("""
{"metadata": {"version": 2, "guidellm_version": "0.8.1"},
 "benchmarks": [{
  "type_": "generative_benchmark",
  "config": {"strategy": {"type_": "concurrent", "worker_count": 2, "max_concurrency": 2, "streams": 2,
                          "rampup_duration": 0.0}},
  "metrics": {
   "request_totals": {"successful": 4, "errored": 0, "incomplete": 0, "total": 4},
   "output_token_count": {"successful": {"mean": 64.0, "median": 64.0, "count": 4, "total_sum": 256.0,
                                         "percentiles": {"p50": 64.0, "p90": 64.0, "p95": 64.0}}},
   "prompt_token_count": {"successful": {"mean": 286.0, "median": 286.0, "count": 4, "total_sum": 1144.0,
                                         "percentiles": {"p50": 286.0, "p90": 286.0, "p95": 286.0}}},
   "time_to_first_token_ms": {"successful": {"mean": 10514.3666, "median": 7246.1865, "count": 4,
                                             "total_sum": 42057.4665,
                                             "percentiles": {"p50": 7246.1865, "p90": 14467.926, "p95": 14467.926}}},
   "inter_token_latency_ms": {"successful": {"mean": 148.8253, "median": 94.0289, "count": 252,
                                             "total_sum": 37503.9692,
                                             "percentiles": {"p50": 94.0289, "p90": 207.7783, "p95": 207.7783}}}
  },
  "duration": 39.8213
 }]}
""")


def test_parse_guidellm_report_sample():
    (r,) = bs.parse_guidellm_report(SAMPLE)
    assert r["streams"] == 2
    assert (r["successful"], r["errored"], r["incomplete"]) == (4, 0, 0)
    assert r["output_tokens"] == 256.0
    # 256 tokens over the 39.82 s measured window (guidellm's own table printed 6.4)
    assert r["output_tok_s"] == pytest.approx(256.0 / 39.8213)
    assert r["ttft_ms_median"] == pytest.approx(7246.1865)
    assert r["ttft_ms_p90"] == pytest.approx(14467.926)
    assert r["itl_ms_median"] == pytest.approx(94.0289)
    assert r["itl_ms_p90"] == pytest.approx(207.7783)
    assert r["prompt_tokens_median"] == 286.0 and r["output_tokens_median"] == 64.0


def test_parse_guidellm_report_rejects_empty():
    with pytest.raises(ValueError, match="benchmarks"):
        bs.parse_guidellm_report({"benchmarks": []})
    with pytest.raises(ValueError, match="benchmarks"):
        bs.parse_guidellm_report({})


def test_parse_args_defaults():
    a = bs.parse_args([])
    assert a.configs == ["bf16", "fp8", "fp8+kv8"]
    assert a.streams == [1, 4, 16, 32]
    assert a.requests == [8, 8, 16, 32]
    assert (a.prompt_tokens, a.output_tokens) == (256, 64)
    assert a.engine_threads == 1 and a.engine_cpus == "0" and a.client_cpus == "1"


def test_parse_args_quick_and_lists():
    a = bs.parse_args(["--quick"])
    assert a.streams == [1, 4] and a.requests == [2, 4]
    a = bs.parse_args(["--streams", "2,8", "--requests", "10"])
    assert a.streams == [2, 8] and a.requests == [10, 10]
    a = bs.parse_args(["--streams", "2,8", "--requests", "4,16", "--configs", "fp8,bf16", "--engine-cpus", "0-1"])
    assert a.requests == [4, 16]
    assert a.configs == ["bf16", "fp8"]  # canonical order: bf16 first
    assert a.engine_threads == 2


@pytest.mark.parametrize("argv", [
    ["--streams", "1,x"],
    ["--streams", "0"],
    ["--streams", "1,4", "--requests", "1,2,3"],
    ["--streams", "8", "--requests", "4"],          # fewer requests than streams
    ["--configs", "fp16"],
    ["--output-tokens", "1"],
])
def test_parse_args_errors(argv, capsys):
    with pytest.raises(SystemExit):
        bs.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_parse_cpus():
    assert bs.parse_cpus("0") == [0]
    assert bs.parse_cpus("1,0") == [0, 1]
    assert bs.parse_cpus("0-3") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="CPU list"):
        bs.parse_cpus("a")


def test_guidellm_cmd_uses_completions_api_and_exact_lengths():
    cmd = bs.guidellm_cmd(Path("/v/bin/guidellm"), "http://127.0.0.1:9", "/m", 16, 64, 256, 64, Path("/o.json"))
    s = " ".join(cmd)
    assert "model=/m,request_format=/v1/completions" in s
    assert "kind=concurrent,streams=16" in s
    assert "prompt_tokens=256,output_tokens=64" in s
    assert "kind=max_requests,count=64" in s


def _summary():
    (r,) = bs.parse_guidellm_report(SAMPLE)
    fast = dict(r, output_tok_s=r["output_tok_s"] * 1.5, ttft_ms_median=r["ttft_ms_median"] / 2)
    meta = {"model_name": "M", "command": "cmd", "cpu": "CPU X, no AVX-512",
            "kernel_path": "portable", "vllm_version": "0.32.0", "eager": False, "engine_threads": 1,
            "engine_cpus": "0", "client_cpus": "1", "kv_cache_mib": 512, "date": "2026-12-07",
            "prompt_tokens": 256, "output_tokens": 64, "streams": [1, 2], "requests": [16, 16]}
    # JSON round trip: levels become string keys, as in a summary written by --json
    return json.loads(json.dumps({"meta": meta, "rows": {"bf16": {2: r}, "fp8": {2: fast}},
                                  "errors": {"bf16@1": "boom"}}))


def test_ratios_and_render():
    s = _summary()
    rows = {c: {int(k): v for k, v in lv.items()} for c, lv in s["rows"].items()}
    rt = bs.ratios(rows, "fp8")
    assert rt[2]["output_tok_s"] == pytest.approx(1.5)
    assert rt[2]["ttft_ms_median"] == pytest.approx(0.5)
    assert rt[2]["itl_ms_median"] == pytest.approx(1.0)
    md = bs.render(s)
    assert "tok/s 1.50x" in md
    assert "CPU X, no AVX-512" in md and "`portable`" in md
    assert "failed: boom" in md          # the level that failed is named, not dropped
    assert "![output tokens/s vs concurrent streams](serving.png)" in md
    assert "serving.png" not in bs.render(s, plot_name=None)
