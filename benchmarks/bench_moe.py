"""FP8 mixture of experts on CPU: fp8-backend's fused W8A16 MoE vs the bf16 MoE vLLM runs.

    flock -x /tmp/fp8-timing.lock taskset -c 0 .venv/bin/python benchmarks/bench_moe.py --mode layer

Modes (``--mode``):
  * layer   one Qwen3-MoE-like layer (hidden 2048, 64 experts, top-8, expert width 768) at
            T = 1, 4, 16, 64, 512 tokens with random routing (distinct experts per token, softmax
            weights), implementations interleaved in one run:
              fp8_channel  kernels.fused_moe_w8a16, FP8 experts with per-channel scales
              fp8_block    the same with 128x128 block scales
              vllm_bf16    vLLM's own CPU MoE for unquantized experts: vllm._custom_ops.
                           cpu_fused_moe with isa "vec" on weights prepacked by
                           cpu_prepack_moe_weight, as CPUUnquantizedExperts does
                           (vllm/model_executor/layers/fused_moe/experts/cpu_moe.py)
              torch_bf16   a plain torch loop over experts with bf16 F.linear (the numerics
                           reference's structure)
            Each timed call uses the next of --copies copies of the layer's weights and the next
            of a pool of routings, so the experts a call reads are not left in cache by the
            previous one. Rewrites the "moe_layer" section of benchmarks/RESULTS.md and its
            plot benchmarks/moe_layer.png (speed-up vs T) unless --json is given (then results
            go there). fp8 weights live in transparent huge pages
            as the plugin stores them (kernels/huge_pages.py).
  * engine  a whole random Qwen3-MoE (--layers layers of the same layer shape, ~0.6 GB of bf16
            experts per layer; built once into models/random-qwen3-moe-L<layers>) through vLLM,
            one engine process per configuration, one after the other: bf16 (vLLM's own 16-bit
            MoE) and quantization="fp8" (experts FP8 per tensor, quantized while loading). Each
            times batch-1 decode, batch-16 decode and a 512-token prefill
            (fp8_backend.eval.e2e.run_e2e, enforce_eager, 1 OpenMP thread) and reports the peak
            RSS while loading and the parameter bytes. Rewrites the "moe_engine" section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


from fp8_backend import _C, kernels, numerics
from fp8_backend.kernels.huge_pages import to_huge_pages

from plotting import speedup_plot
from results_md import RESULTS as RESULTS_MD
from results_md import cpu_description, machine, update_section

HIDDEN, EXPERTS, TOPK, INTER = 2048, 64, 8, 768
TS = [1, 4, 16, 64, 512]
IMPLS = ["fp8_channel", "fp8_block", "vllm_bf16", "torch_bf16"]
BLOCK = (128, 128)


def _vllm_ops():
    from vllm import _custom_ops as ops  # loads vLLM's CPU kernel library for this CPU

    return ops


def make_layer(seed: int, impls: list[str]) -> dict:
    """One layer's experts in every requested representation, from the same random bf16 weights."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * 0.02).to(torch.bfloat16)
    layer = {}
    if "fp8_channel" in impls:
        q13, s13, q2, s2 = [], [], [], []
        for e in range(EXPERTS):
            a, sa = numerics.quantize_per_channel(w13[e].float())
            b, sb = numerics.quantize_per_channel(w2[e].float())
            q13.append(a), s13.append(sa.reshape(-1)), q2.append(b), s2.append(sb.reshape(-1))
        layer["fp8_channel"] = (to_huge_pages(torch.stack(q13)), torch.stack(s13), to_huge_pages(torch.stack(q2)),
                                torch.stack(s2), None)
    if "fp8_block" in impls:
        q13, s13, q2, s2 = [], [], [], []
        for e in range(EXPERTS):
            ga, gs = numerics.quantize_block(w13[e, :INTER].float(), block_size=BLOCK)
            ua, us = numerics.quantize_block(w13[e, INTER:].float(), block_size=BLOCK)
            b, sb = numerics.quantize_block(w2[e].float(), block_size=BLOCK)
            q13.append(torch.cat([ga, ua])), s13.append(torch.cat([gs, us])), q2.append(b), s2.append(sb)
        layer["fp8_block"] = (to_huge_pages(torch.stack(q13)), torch.stack(s13), to_huge_pages(torch.stack(q2)),
                              torch.stack(s2), list(BLOCK))
    if "vllm_bf16" in impls:
        ops = _vllm_ops()
        layer["vllm_bf16"] = (ops.cpu_prepack_moe_weight(w13, "vec"), ops.cpu_prepack_moe_weight(w2, "vec"))
    if "torch_bf16" in impls:
        layer["torch_bf16"] = (w13, w2)
    return layer


def torch_moe(x, w13, w2, wts, ids):
    """The numerics reference's loop with bf16 F.linear: what a plain torch model runs."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for ex in torch.unique(ids).tolist():
        tok, slot = (ids == ex).nonzero(as_tuple=True)
        gu = F.linear(x[tok], w13[ex])
        a = F.silu(gu[:, :INTER]) * gu[:, INTER:]
        out.index_add_(0, tok, F.linear(a, w2[ex]).float() * wts[tok, slot].reshape(-1, 1))
    return out.to(x.dtype)


def call(impl: str, layer: dict, x, wts, ids):
    if impl.startswith("fp8"):
        q13, s13, q2, s2, bs = layer[impl]
        return kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids, bs)
    if impl == "vllm_bf16":
        out = torch.empty_like(x)
        _vllm_ops().cpu_fused_moe(out, x, *layer[impl], None, None, wts, ids, "silu", "vec")
        return out
    return torch_moe(x, *layer[impl], wts, ids)


def routings(t: int, count: int, seed: int) -> list:
    """Random top-k routing as a router gives it: distinct experts per token, softmax weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        logits = torch.randn(t, EXPERTS, generator=g)
        w, ids = torch.softmax(logits, dim=-1).topk(TOPK, dim=-1)
        out.append((w / w.sum(-1, keepdim=True), ids.to(torch.int32)))
    return out


def weight_bytes(impl: str) -> int:
    per_expert = 3 * INTER * HIDDEN
    if impl == "fp8_channel":
        return EXPERTS * (per_expert + 4 * (2 * INTER + HIDDEN))
    if impl == "fp8_block":
        return EXPERTS * (per_expert + 4 * (2 * (INTER // 128) * (HIDDEN // 128) + (HIDDEN // 128) * (INTER // 128)))
    return EXPERTS * per_expert * 2


def run_layer(args) -> dict:
    impls, ts = args.impls, args.ts
    layers = [make_layer(100 + c, impls) for c in range(args.copies)]
    x_all = torch.randn(max(ts), HIDDEN, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    results = {}
    for t in ts:
        x = x_all[:t].contiguous()
        routes = routings(t, 8, seed=t)
        # Check every implementation against the reference once (same routing, copy 0).
        w, ids = routes[0]
        ref = call("torch_bf16", layers[0], x, w, ids) if "torch_bf16" in impls else None
        # One untimed call each (first-touch, lazy init), and a time estimate for the rep count.
        est = {}
        for impl in impls:
            t0 = time.perf_counter()
            out = call(impl, layers[0], x, w, ids)
            est[impl] = time.perf_counter() - t0
            if ref is not None:
                rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
                results.setdefault(t, {})[f"{impl}_relerr"] = rel
        reps = max(3, min(args.max_reps, int(args.seconds / max(min(est.values()), 1e-6))))
        times = {impl: [] for impl in impls}
        i = 0
        for r in range(reps):
            for impl in impls:  # interleaved: drift hits every implementation alike
                if impl == "torch_bf16" and r >= max(3, int(args.seconds / max(est[impl], 1e-6))):
                    continue  # slow baseline: enough reps for a median
                i += 1
                layer = layers[i % len(layers)]
                w, ids = routes[i % len(routes)]
                t0 = time.perf_counter()
                call(impl, layer, x, w, ids)
                times[impl].append(time.perf_counter() - t0)
        rows = t * TOPK / EXPERTS  # mean rows per expert
        plan = _C.w8a16_plan(kernels.cpu_isa(), max(1, round(rows)), 2 * INTER, HIDDEN, "bfloat16", 0)
        results.setdefault(t, {}).update({impl: statistics.median(v) for impl, v in times.items()})
        results[t]["plan"] = plan
        results[t]["reps"] = reps
        print(t, {k: (round(v * 1e3, 3) if isinstance(v, float) and not k.endswith("relerr") else v)
                  for k, v in results[t].items()}, flush=True)
    return results


def write_layer(args, results: dict) -> None:
    def ms(t, impl):
        v = results[t].get(impl)
        return f"{v * 1e3:.2f}" if v else "n/a"

    def ratio(t, impl, base):
        a, b = results[t].get(impl), results[t].get(base)
        return f"{b / a:.2f}x" if a and b else "n/a"

    lines = [
        "## FP8 mixture of experts (layer)",
        "",
        f"Command: `flock -x /tmp/fp8-timing.lock taskset -c 0 .venv/bin/python benchmarks/bench_moe.py "
        f"--mode layer` (1 core pinned, exclusive timing lock).",
        f"Machine: {machine()}; fp8-backend CPU kernel path `{kernels.cpu_isa()}`; "
        f"{torch.get_num_threads()} thread(s).",
        f"Layer: Qwen3-MoE-like, hidden {HIDDEN}, {EXPERTS} experts, top-{TOPK}, expert width {INTER} "
        f"(SiLU-and-mul); random routing (distinct experts per token, softmax weights), a new routing and "
        f"the next of {args.copies} weight copies per call. Weights per layer: FP8 per-channel "
        f"{weight_bytes('fp8_channel') / 2**20:.0f} MiB, FP8 128x128 blocks {weight_bytes('fp8_block') / 2**20:.0f} MiB, "
        f"bf16 {weight_bytes('vllm_bf16') / 2**20:.0f} MiB.",
        "Median ms per layer call, implementations interleaved in one run. `vLLM bf16`: "
        "vllm._custom_ops.cpu_fused_moe (isa \"vec\", weights prepacked by cpu_prepack_moe_weight, as "
        "CPUUnquantizedExperts runs unquantized experts on this CPU). `torch bf16`: a loop over experts with "
        "bf16 F.linear. Speed-up = baseline ms / fp8 ms (> 1: fp8-backend faster). `kernel`: what w8a16_plan "
        "picks for gate/up at the mean rows per expert (T * 8 / 64).",
        "",
        "| T | kernel | fp8 channel ms | fp8 block ms | vLLM bf16 ms | torch bf16 ms | channel vs vLLM | block vs vLLM | channel vs torch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in sorted(results):
        lines.append(
            f"| {t} | {results[t]['plan']} | {ms(t, 'fp8_channel')} | {ms(t, 'fp8_block')} | {ms(t, 'vllm_bf16')} | "
            f"{ms(t, 'torch_bf16')} | {ratio(t, 'fp8_channel', 'vllm_bf16')} | {ratio(t, 'fp8_block', 'vllm_bf16')} | "
            f"{ratio(t, 'fp8_channel', 'torch_bf16')} |"
        )
    errs = [
        f"T={t}: " + ", ".join(f"{k[:-7]} {v:.1e}" for k, v in results[t].items() if k.endswith("_relerr"))
        for t in sorted(results)
        if any(k.endswith("_relerr") for k in results[t])
    ]
    plot = RESULTS_MD.with_name("moe_layer.png")
    lines += ["", f"![FP8 MoE layer speed-up vs tokens]({plot.name})"]
    if errs:
        lines += ["", "Relative L2 difference to torch bf16 on the same routing (FP8 weights quantize the bf16 "
                  "ones): " + "; ".join(errs) + "."]
    for note in args.notes:
        lines += ["", note]
    update_section("moe_layer", "\n".join(lines))
    series = {}
    for impl, base, label in (("fp8_channel", "vllm_bf16", "FP8 per-channel vs vLLM bf16"),
                              ("fp8_block", "vllm_bf16", "FP8 128x128 blocks vs vLLM bf16"),
                              ("fp8_channel", "torch_bf16", "FP8 per-channel vs torch bf16")):
        series[label] = [(t, results[t][base] / results[t][impl]) for t in sorted(results)
                         if results[t].get(impl) and results[t].get(base)]
    speedup_plot(series, plot, xlabel="tokens per layer call (T)", ylabel="speed-up of fp8-backend's fused MoE",
                 title=f"MoE layer (hidden {HIDDEN}, {EXPERTS} experts, top-{TOPK}, width {INTER}), "
                       f"`{kernels.cpu_isa()}` path, {torch.get_num_threads()} thread(s)\n{cpu_description()}")


def run_engine_mode(args) -> None:
    from fp8_backend.eval.e2e import run_e2e
    from fp8_backend.testing.tiny_moe import build_qwen3_moe

    root = Path(__file__).resolve().parent.parent
    model = root / "models" / f"random-qwen3-moe-L{args.layers}"
    if not (model / "config.json").is_file():
        print(f"building {model} ...", flush=True)
        build_qwen3_moe(model, num_layers=args.layers, hidden_size=HIDDEN, moe_intermediate_size=INTER,
                        num_experts=EXPERTS, num_experts_per_tok=TOPK, num_heads=16, num_kv_heads=4,
                        head_dim=128, init_std=0.02)
    env = {"E2E_WORKER_BATCH_DECODE": "16", "E2E_WORKER_BATCH_DECODE_TOKENS": "16",
           "E2E_WORKER_PREFILL_TOKENS": "512"}
    res = {}
    for name, quant in (("bf16", None), ("fp8", "fp8")):
        print(f"{name}: engine ...", flush=True)
        res[name] = run_e2e(str(model), quant, eager=True, threads=args.threads, prompts=["Hello"], chat=False,
                            gen_tokens=4, decode_tokens=32, decode_repeats=2, timeout=3600, env=env)
        r = res[name]
        print(f"  decode {r['decode_tok_s']:.2f} tok/s, batch-16 {r['batch_decode_tok_s']:.2f} tok/s, "
              f"prefill {r['prefill_tok_s']:.1f} tok/s, peak load RSS {r['peak_load_rss_mib']:.0f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        return
    b, f = res["bf16"], res["fp8"]
    expert_mib = args.layers * EXPERTS * 3 * HIDDEN * INTER / 2**20  # FP8: one byte each (+ fp32 scales)

    def row(label, key, fmt="{:.2f}"):
        return f"| {label} | {fmt.format(b[key])} | {fmt.format(f[key])} | {f[key] / b[key]:.2f}x |"

    lines = [
        f"## FP8 mixture of experts (engine): random Qwen3-MoE, {args.layers} layers",
        "",
        f"Command: `flock -x /tmp/fp8-timing.lock taskset -c 0 .venv/bin/python benchmarks/bench_moe.py --mode engine "
        f"--layers {args.layers}`. Machine: {machine()}; fp8-backend CPU kernel path `{kernels.cpu_isa()}`; "
        f"{args.threads} OpenMP thread(s), enforce_eager, one engine process per column, one after the other.",
        f"Model: hidden {HIDDEN}, {EXPERTS} experts, top-{TOPK}, expert width {INTER}, {args.layers} layers, "
        "random weights (speed only). bf16 = vLLM's own 16-bit MoE (CPUUnquantizedExperts); fp8 = "
        "`quantization=\"fp8\"`: every linear layer and expert FP8 (per tensor), fp8-backend's kernels.",
        "",
        "| | bf16 | fp8 | fp8 / bf16 |",
        "|---|---:|---:|---:|",
        row("batch-1 decode, tokens/s", "decode_tok_s"),
        row("batch-16 decode, tokens/s", "batch_decode_tok_s"),
        row("512-token prefill, tokens/s", "prefill_tok_s", "{:.1f}"),
        row("peak RSS while loading, MiB", "peak_load_rss_mib", "{:.0f}"),
        f"| expert weights, MiB | {expert_mib * 2:.0f} | {expert_mib:.0f} | 0.50x |",
    ]
    for note in args.notes:
        lines += ["", note]
    update_section("moe_engine", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["layer", "engine"], default="layer")
    p.add_argument("--layers", type=int, default=4, help="engine mode: decoder layers of the random model")
    p.add_argument("--ts", default=",".join(map(str, TS)), help="token counts, comma-separated")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--copies", type=int, default=2, help="weight copies rotated through")
    p.add_argument("--seconds", type=float, default=2.0, help="target time per measurement")
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--json", help="write results here instead of RESULTS.md")
    p.add_argument("--from-json", help="rewrite RESULTS.md from a --json file of an earlier run")
    p.add_argument("--note", dest="notes", action="append", default=[], help="a line for RESULTS.md")
    args = p.parse_args()
    args.ts = [int(v) for v in args.ts.split(",")]
    args.impls = args.impls.split(",")
    torch.set_num_threads(args.threads)
    if args.mode == "engine":
        run_engine_mode(args)
        return
    if args.from_json:
        results = {int(t): r for t, r in json.loads(Path(args.from_json).read_text()).items()}
        write_layer(args, results)
        return
    results = run_layer(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    else:
        write_layer(args, results)


if __name__ == "__main__":
    main()
