#!/usr/bin/env python3
"""Make FP8 checkpoints with llm-compressor and score them with transformers + compressed-tensors.

Runs in the llm-compressor venv (scripts/setup_llmcompressor.sh), not in the vLLM venv:

    .venv-llmc/bin/python scripts/llmcompressor_checkpoints.py --model DIR --calib FILE \\
        --out DIR [--windows windows.json --scores scores.json] [--schemes FP8,FP8_DYNAMIC,...]

Checkpoints (``oneshot`` + ``QuantizationModifier(targets="Linear", ignore=["lm_head"])``,
saved compressed, i.e. compressed-tensors "float-quantized"), one directory per scheme under --out:
  FP8          static per-tensor weights and input scales, calibrated on --calib
  FP8_DYNAMIC  per-channel weights, dynamic per-token activations (no calibration data needed)
  FP8_BLOCK    128x128 block weights, dynamic 1x128 activation groups (no calibration data)
  FP8_KV       FP8 plus kv_cache_scheme (static per-tensor FP8 k/v scales, calibrated)
Calibration: --calib-samples windows of --calib-len tokens cut one after the other from --calib
(the accuracy report writes text no scored window uses). An existing directory is reused.

With --windows (JSON list of token-id lists, made by scripts/llmcompressor_report.py from the vLLM
venv's tokenizer, so both venvs score the same tokens), each checkpoint is loaded with
``AutoModelForCausalLM.from_pretrained`` (transformers' compressed-tensors integration) in each
--dtypes, and the log-prob of every window token but the first is written to --scores together
with how the model was loaded (module classes, weight dtypes, quantization status, whether input
activations are fake-quantized in the forward pass).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

SCHEMES = ("FP8", "FP8_DYNAMIC", "FP8_BLOCK", "FP8_KV")


def calibration_dataset(tokenizer, text: str, n: int, seq_len: int):
    """``n`` consecutive ``seq_len``-token windows of ``text`` as a datasets.Dataset of input_ids."""
    from datasets import Dataset

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * seq_len:
        raise SystemExit(f"calibration text: expected at least {n} x {seq_len} = {n * seq_len} tokens, found {len(ids)}")
    rows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})


def recipe(scheme: str):
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme == "FP8_KV":
        kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
        return QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"], kv_cache_scheme=kv)
    return QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])


def make(model_dir: str, scheme: str, out: Path, calib_text: str, n: int, seq_len: int) -> None:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    needs_data = scheme in ("FP8", "FP8_KV")
    kw = dict(dataset=calibration_dataset(tok, calib_text, n, seq_len), num_calibration_samples=n,
              max_seq_length=seq_len, shuffle_calibration_samples=False) if needs_data else {}
    tmp = out.with_name(out.name + ".tmp")
    oneshot(model=model, tokenizer=tok, recipe=recipe(scheme), output_dir=str(tmp), save_compressed=True, **kw)
    tmp.rename(out)


def describe(model) -> dict:
    """How transformers + compressed-tensors loaded the model: what a Linear looks like now."""
    import torch

    lin = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    name, m = lin[0]
    scheme = getattr(m, "quantization_scheme", None)
    ia = getattr(scheme, "input_activations", None) if scheme is not None else None
    return {
        "linear_classes": sorted({type(x).__name__ for _, x in lin}),
        "weight_dtypes": sorted({str(x.weight.dtype) for _, x in lin}),
        "example": name,
        "example_params": sorted(k for k, _ in m.named_parameters()),
        "quantization_status": str(getattr(m, "quantization_status", None)),
        "input_activations": None if ia is None else {"strategy": str(ia.strategy), "dynamic": ia.dynamic},
        "attn_impl": model.config._attn_implementation,
        "k_scale_params": sum(1 for n, _ in model.named_parameters() if n.endswith(("k_scale", "v_scale"))),
    }


def disable_activation_quant(model) -> int:
    """Turn off compressed-tensors' fake quantization in every quantized Linear (input activations;
    the weights are already decompressed and are not touched again): a weights-only reference.
    kv_cache_scheme quantization lives on the attention modules and stays on."""
    import torch

    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None:
            m.quantization_enabled = False
            n += 1
    return n


def score(ckpt: Path, windows: list[list[int]], dtype: str, act_quant: bool, threads: int) -> dict:
    """Log-probs of ``windows`` from transformers + compressed-tensors loading ``ckpt`` in ``dtype``;
    ``act_quant`` False: with :func:`disable_activation_quant`. A forward-pass error (e.g.
    compressed-tensors' dynamic group activations on K not a multiple of 128) is returned as
    ``error`` instead of log-probs."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    if not act_quant:
        disable_activation_quant(model)
    lps = []
    try:
        with torch.no_grad():
            for w in windows:
                ids = torch.tensor([w])
                lp = torch.log_softmax(model(ids).logits.float()[0, :-1], -1)
                lps.append(lp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    except (RuntimeError, ValueError) as e:
        info = describe(model)
        info.update(error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
        return info
    info = describe(model)  # after a forward pass: weights are decompressed on the first one
    info.update(logprobs=lps, seconds=time.perf_counter() - t0)
    return info


def jobs(schemes: list[str], dtypes: list[str]) -> list[tuple[str, str, bool]]:
    """(scheme, dtype, activation fake-quant) runs: the base model ("bf16") in each dtype; each
    checkpoint as compressed-tensors runs it (activation fake-quant on) in each dtype, and
    weights-only in float32 (the check of weight loading alone)."""
    out = [("bf16", d, False) for d in dtypes]
    for s in schemes:
        out += [(s, d, True) for d in dtypes] + [(s, "float32", False)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration text file (no scored text in it)")
    ap.add_argument("--out", required=True, help="directory for the checkpoints")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--windows", help="JSON file: token windows to score")
    ap.add_argument("--scores", help="JSON file to write the transformers log-probs to")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    for s in schemes:
        if s not in SCHEMES:
            raise SystemExit(f"--schemes: expected names from {SCHEMES}, found {s!r}")
    import llmcompressor
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib_text = Path(args.calib).read_text()
    for s in schemes:
        if (out / s / "config.json").is_file():
            print(f"{s}: reusing {out / s}", flush=True)
            continue
        t0 = time.perf_counter()
        make(args.model, s, out / s, calib_text, args.calib_samples, args.calib_len)
        print(f"{s}: made in {time.perf_counter() - t0:.0f}s", flush=True)
    if not args.windows:
        return 0
    windows = json.loads(Path(args.windows).read_text())
    import compressed_tensors

    res = {"versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                        "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__},
           "scores": {}}
    for s, dtype, act in jobs(schemes, args.dtypes.split(",")):
        ckpt = Path(args.model) if s == "bf16" else out / s
        r = score(ckpt, windows, dtype, act, args.threads)
        key = f"{s}/{dtype}/{'act' if act else 'weights'}"
        res["scores"][key] = r
        what = {k: v for k, v in r.items() if k not in ("logprobs", "seconds")}
        if "logprobs" in r:
            flat = [x for w in r["logprobs"] for x in w]
            print(f"{key}: ppl {math.exp(-sum(flat) / len(flat)):.4f} ({r['seconds']:.0f}s; {what})", flush=True)
        else:
            print(f"{key}: FAILED ({r['seconds']:.0f}s; {what})", flush=True)
    Path(args.scores).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
