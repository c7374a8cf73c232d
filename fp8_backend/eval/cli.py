"""``fp8-backend eval``: perplexity and prompt log-prob agreement of FP8 against 16-bit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import report
from .run import EngineRunError, EvalConfig, compare, score
from .simulate import TARGET_PCT, quantization_config
from .windows import text_windows

SIMULATE_HELP = f"""\
--simulate (the engine-vs-simulation check): each configuration, the reference included, is also
scored by a plain transformers model computing what fp8_backend/numerics.py specifies (FP8 weights
dequantized by numerics; W8A8 emulation's activation fake-quant when FP8_BACKEND_EMULATE_W8A8=1; an
FP8 KV cache of this plugin's kernels simulated by fp8_backend.eval.kv_sim), on the same windows.
Like-for-like rule: configurations that round values the engine computes in bf16 to FP8 (FP8 KV
cache, W8A8 emulation) are simulated in bfloat16, the others in float32. Verdict, per FP8
configuration: (ppl_engine / ppl_engine_reference) / (ppl_sim / ppl_sim_reference) - 1, the
reference simulated in the same dtype (this cancels what bf16 activations alone do, shown as the
reference row's engine-vs-simulation offset), is "yes" within --sim-target percent (default
{TARGET_PCT}) and "no" outside it, when two standard errors over windows fit in the target; with
less text, "no" only beyond the target by more than two standard errors, else "undecided". The
table also gives the direct engine-vs-simulation difference and the per-token |delta log-prob|.
transformers must be able to load the 16-bit model (MODEL, or --reference for an FP8 checkpoint).
Exit status 3 when a configuration's verdict is "no"; FP8 KV on vLLM's own attention kernels
(FP8_BACKEND_ATTENTION=vllm) is not simulated (vLLM rounds FP8 cache writes toward zero)."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fp8-backend eval",
        description="Score a text file with a 16-bit reference engine and with FP8 configurations, each in "
                    "its own vLLM engine; print perplexities and per-token |delta log-prob| against the "
                    "reference as a Markdown table, and write it, a JSON file and a PNG plot to --out.",
        epilog=SIMULATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    ap.add_argument("--simulate", action="store_true",
                    help="also check every configuration against a transformers simulation of numerics.py (below)")
    ap.add_argument("--sim-target", type=float, default=TARGET_PCT, metavar="PCT",
                    help=f"--simulate: the verdict's bound on |engine vs simulation, each vs its reference| in "
                         f"percent of perplexity (default {TARGET_PCT})")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"fp8-backend eval: error: model: expected a directory with config.json, found {args.model!r}",
              file=sys.stderr)
        return 2
    if not Path(args.text).is_file():
        print(f"fp8-backend eval: error: --text: file not found: {args.text!r}", file=sys.stderr)
        return 2
    if args.reference is None and quantization_config(args.model) is not None:
        print(f"fp8-backend eval: error: --reference: {args.model} is a quantized checkpoint; name the "
              f"16-bit model it was made from", file=sys.stderr)
        return 2
    if not args.sim_target > 0:
        print(f"fp8-backend eval: error: --sim-target: expected a positive percentage, found {args.sim_target}",
              file=sys.stderr)
        return 2
    ref_model = args.reference or args.model
    quant = args.quantization
    if args.reference is None and quant is None:
        quant = "fp8"  # a 16-bit model with no quantization asked: evaluate online FP8
    kv_dtypes = args.kv_cache_dtype or ["auto", "fp8"]
    if args.simulate:
        from .simulate import SimulationError, check_loadable

        try:
            check_loadable(ref_model)
        except SimulationError as e:
            print(f"fp8-backend eval: error: --simulate: {e}", file=sys.stderr)
            return 2

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
    if args.simulate:
        try:
            simulate_rows(rows, reference, ref, configs, results, windows, args)
        except Exception as e:  # noqa: BLE001 -- SimulationError, checkpoint format errors, transformers
            print(f"fp8-backend eval: error: --simulate: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    table = report.markdown(rows, labels, len(windows), args.window_len)
    print("\n" + table)
    (out / "eval.md").write_text(table + "\n")
    (out / "eval.json").write_text(json.dumps({"labels": labels, "rows": rows}, indent=1) + "\n")
    if not args.no_plot:
        png = report.plot(ref, results, labels, out / "eval_logprob_delta.png")
        print(f"\nwrote {out / 'eval.md'}, {out / 'eval.json'}, {png}")
    verdicts = {labels[r["config"]]: r.get("simulation", {}).get("verdict") for r in rows}
    undecided = [k for k, v in verdicts.items() if v == "undecided"]
    if undecided:
        print(f"fp8-backend eval: engine vs simulation undecided (two standard errors exceed {args.sim_target}%; "
              f"score more text): {'; '.join(undecided)}", file=sys.stderr)
    missed = [k for k, v in verdicts.items() if v == "no"]
    if missed:
        print(f"fp8-backend eval: engine vs simulation outside {args.sim_target}%: {'; '.join(missed)}", file=sys.stderr)
        return 3
    return 0


def simulate_rows(rows: list[dict], reference: EvalConfig, ref: dict, configs: dict[str, EvalConfig],
                  results: dict[str, dict], windows: list[list[int]], args) -> None:
    """Add to each row of :func:`compare` a "simulation" entry: the SimSpec and the verdict
    (:func:`fp8_backend.eval.simulate.verdict`, each configuration against the reference simulated
    in the same dtype), or {"skipped": reason}. The reference's own entry gives the offset of the
    16-bit engine against its float32 simulation (verdict "reference")."""
    from dataclasses import asdict, replace

    from .simulate import plan, simulate, verdict

    env = dict(os.environ)
    specs = {}
    for key, cfg in configs.items():
        specs[key] = plan(cfg.model, cfg.quantization, cfg.kv_cache_dtype, reference.model, env,
                          results[key].get("attention_own_kernels"))
    ref_spec = plan(reference.model, None, reference.kv_cache_dtype, reference.model, env, False)
    ref_sims = {}
    for dtype in ["float32"] + sorted({s.dtype for s in specs.values() if not isinstance(s, str)} - {"float32"}):
        print(f"simulation ({dtype}): {reference.label} ...", flush=True)
        ref_sims[dtype] = simulate(replace(ref_spec, dtype=dtype), windows, args.threads)
    for row in rows:
        key = row["config"]
        if key == "reference":
            v = verdict(ref["logprobs"], ref_sims["float32"], args.sim_target)
            row["simulation"] = {"spec": asdict(ref_spec), **v, "verdict": "reference"}
            continue
        cfg, spec = configs[key], specs[key]
        if isinstance(spec, str):
            row["simulation"] = {"skipped": spec}
            print(f"simulation: {cfg.label}: not simulated: {spec}", flush=True)
            continue
        print(f"simulation ({spec.dtype}): {cfg.label} ...", flush=True)
        sim = simulate(spec, windows, args.threads)
        row["simulation"] = {"spec": asdict(spec), **verdict(results[key]["logprobs"], sim, args.sim_target,
                                                             ref["logprobs"], ref_sims[spec.dtype])}
