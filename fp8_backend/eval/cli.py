"""``fp8-backend eval``: perplexity and prompt log-prob agreement of FP8 against 16-bit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report
from .run import EngineRunError, EvalConfig, compare, score
from .windows import text_windows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fp8-backend eval",
        description="Score a text file with a 16-bit reference engine and with FP8 configurations, each in "
                    "its own vLLM engine; print perplexities and per-token |delta log-prob| against the "
                    "reference as a Markdown table, and write it, a JSON file and a PNG plot to --out.",
    )
    ap.add_argument("model", help="model directory (16-bit, or an FP8 checkpoint with --reference)")
    ap.add_argument("--text", required=True, help="UTF-8 text; texts separated by blank lines")
    ap.add_argument("--quantization", default=None,
                    help="vLLM quantization of MODEL, e.g. fp8 (default: as its config.json says)")
    ap.add_argument("--kv-cache-dtype", action="append", default=None, metavar="DTYPE",
                    help="KV-cache dtype of a configuration (repeatable: one configuration each); "
                         "default: auto and fp8")
    ap.add_argument("--reference", default=None,
                    help="16-bit model to compare against (default: MODEL without quantization)")
    ap.add_argument("--windows", type=int, default=16, help="token windows to score (default 16)")
    ap.add_argument("--window-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--bos", action="store_true", help="prepend BOS to every window")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per engine (default 1)")
    ap.add_argument("--out", default="eval-out", help="directory for eval.md, eval.json, eval_logprob_delta.png")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib not needed)")
    return ap


def _is_quantized_checkpoint(model: str) -> bool:
    cfg = Path(model) / "config.json"
    try:
        return "quantization_config" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"fp8-backend eval: error: model: expected a directory with config.json, found {args.model!r}",
              file=sys.stderr)
        return 2
    if not Path(args.text).is_file():
        print(f"fp8-backend eval: error: --text: file not found: {args.text!r}", file=sys.stderr)
        return 2
    if args.reference is None and _is_quantized_checkpoint(args.model):
        print(f"fp8-backend eval: error: --reference: {args.model} is a quantized checkpoint; name the "
              f"16-bit model it was made from", file=sys.stderr)
        return 2
    ref_model = args.reference or args.model
    quant = args.quantization
    if args.reference is None and quant is None:
        quant = "fp8"  # a 16-bit model with no quantization asked: evaluate online FP8
    kv_dtypes = args.kv_cache_dtype or ["auto", "fp8"]

    import transformers

    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(ref_model)
    try:
        windows = text_windows(tok, args.text, args.windows, args.window_len, args.bos)
    except ValueError as e:
        print(f"fp8-backend eval: error: --text: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = EvalConfig(ref_model)
    configs = {f"c{i}": EvalConfig(args.model, quant, kv) for i, kv in enumerate(kv_dtypes)}
    labels = {"reference": reference.label, **{k: c.label for k, c in configs.items()}}
    try:
        print(f"scoring {len(windows)} x {args.window_len} tokens: {reference.label} ...", flush=True)
        ref = score(reference, windows, args.threads, log=out / "reference.log")
        results = {}
        for key, cfg in configs.items():
            print(f"scoring: {cfg.label} ...", flush=True)
            results[key] = score(cfg, windows, args.threads, log=out / f"{key}.log")
    except EngineRunError as e:
        print(f"fp8-backend eval: error: {e}", file=sys.stderr)
        return 1
    rows = compare(ref, results)
    table = report.markdown(rows, labels, len(windows), args.window_len)
    print("\n" + table)
    (out / "eval.md").write_text(table + "\n")
    (out / "eval.json").write_text(json.dumps({"labels": labels, "rows": rows}, indent=1) + "\n")
    if not args.no_plot:
        png = report.plot(ref, results, labels, out / "eval_logprob_delta.png")
        print(f"\nwrote {out / 'eval.md'}, {out / 'eval.json'}, {png}")
    return 0
