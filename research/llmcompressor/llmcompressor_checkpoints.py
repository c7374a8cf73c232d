#!/usr/bin/env python3
"""Make FP8 checkpoints with llm-compressor and score them with transformers + compressed-tensors.

Runs in the llm-compressor venv (research/llmcompressor/setup_llmcompressor.sh), not in the vLLM venv:

    .venv-llmc/bin/python research/llmcompressor/llmcompressor_checkpoints.py --model DIR --calib FILE \\
        --out DIR [--windows windows.json --scores scores.json] [--schemes FP8,FP8_DYNAMIC,...]

Checkpoints (``oneshot`` + ``QuantizationModifier(targets="Linear", ignore=["lm_head"])``,
saved compressed, i.e. compressed-tensors "float-quantized"), one directory per scheme under --out:
  FP8          static per-tensor weights and input scales, calibrated on --calib
  FP8_DYNAMIC  per-channel weights, dynamic per-token activations (no calibration data needed)
  FP8_BLOCK    128x128 block weights, dynamic 1x128 activation groups (no calibration data)
  FP8_KV       FP8 plus kv_cache_scheme (static per-tensor FP8 k/v scales, calibrated)
Calibration: --calib-samples windows of --calib-len tokens cut one after the other from --calib
(the accuracy report writes text no scored window uses). An existing directory is reused.

With --windows (JSON list of token-id lists, made by research/llmcompressor/llmcompressor_report.py from the vLLM
venv's tokenizer, so both venvs score the same tokens), each checkpoint is loaded with
``AutoModelForCausalLM.from_pretrained`` (transformers' compressed-tensors integration) in each
--dtypes, and the log-prob of every window token but the first is written to --scores together
with how the model was loaded (module classes, weight dtypes, quantization status, whether input
activations are fake-quantized in the forward pass).
"""
from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def padded_activation_groups():
    """Reference-only shim for FP8_BLOCK's dynamic 1x128 activation groups, whose K (576, 1536 here)
    is not a multiple of 128: compressed-tensors 0.19 then fails in the forward pass (unflatten).
    While active, a dynamic group-quantized INPUT whose last dimension K is not a multiple of the
    group size is zero-padded to the next multiple, fake-quantized by compressed-tensors' own
    forward_quantize, and cut back to K. Exactly a partial last group of K % group_size columns:
    the zeros are quantized alone in their own columns, and a group's scale comes from its
    min/max, which calculate_qparams clamps through 0 anyway, so zeros never change it. Weights
    and static or non-group activations are untouched."""
    import torch
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.lifecycle import forward as fwd

    orig = fwd.forward_quantize
    groups = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)

    def padded(module, value, base_name, args):
        g = args.group_size
        if base_name != "input" or args.strategy not in groups or not args.dynamic or not g or value.shape[-1] % g == 0:
            return orig(module, value, base_name, args)
        k = value.shape[-1]
        return orig(module, torch.nn.functional.pad(value, (0, g - k % g)), base_name, args)[..., :k]

    fwd.forward_quantize = padded  # quantized_forward looks the name up in this module at call time
    try:
        yield
    finally:
        fwd.forward_quantize = orig


def check_padded_groups(ckpt: Path) -> str:
    """The shim on one real FP8_BLOCK input layer (K = 576, group 128): the padded fake-quant must
    equal compressed-tensors' own on the whole groups, and on the partial last group the
    fake-quant of those 64 columns with their own amax / 448 scale, in fp32; raises otherwise."""
    import torch
    from compressed_tensors.quantization.lifecycle import forward as fwd
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    mod = model.model.layers[0].self_attn.q_proj
    args = mod.quantization_scheme.input_activations
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, mod.in_features, generator=gen) * torch.logspace(-3, 2, mod.in_features)
    g = args.group_size
    k_full = mod.in_features // g * g
    with padded_activation_groups():
        y = fwd.forward_quantize(mod, x, "input", args)
    y_full = fwd.forward_quantize(mod, x[..., :k_full].contiguous(), "input", args)
    tail = x[..., k_full:]
    scale = tail.abs().amax(-1, keepdim=True) / 448.0
    y_tail = (tail / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    if not (torch.equal(y[..., :k_full], y_full) and torch.allclose(y[..., k_full:], y_tail, rtol=0, atol=0)):
        raise SystemExit(f"padded_activation_groups: {mod.in_features}-column input expected the whole groups "
                         f"as compressed-tensors and the last {mod.in_features - k_full} as their own group; "
                         f"found max differences {(y[..., :k_full] - y_full).abs().max().item()} and "
                         f"{(y[..., k_full:] - y_tail).abs().max().item()}")
    return f"K={mod.in_features}, group {g}: whole groups bit-identical, partial group of {mod.in_features - k_full} exact"


def score(ckpt: Path, windows: list[list[int]], dtype: str, act_quant: bool, threads: int,
          pad_groups: bool = False) -> dict:
    """Log-probs of ``windows`` from transformers + compressed-tensors loading ``ckpt`` in ``dtype``;
    ``act_quant`` False: with :func:`disable_activation_quant`; ``pad_groups``: under
    :func:`padded_activation_groups`. A forward-pass error (e.g.
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
        with torch.no_grad(), (padded_activation_groups() if pad_groups else contextlib.nullcontext()):
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


def jobs(schemes: list[str], dtypes: list[str]) -> list[tuple[str, str, str]]:
    """(scheme, dtype, mode) runs: the base model ("bf16") in each dtype; each checkpoint as
    compressed-tensors runs it (mode "act": activation fake-quant on) and "weights" only (the check
    of weight loading alone; bf16 as the engine's activations, fp32 as the exact math) in each
    dtype; FP8_BLOCK also "act-padded" in each dtype (:func:`padded_activation_groups`, since "act"
    fails on K = 576)."""
    out = [("bf16", d, "weights") for d in dtypes]
    for s in schemes:
        out += [(s, d, "act") for d in dtypes] + [(s, d, "weights") for d in dtypes]
        if s == "FP8_BLOCK":
            out += [(s, d, "act-padded") for d in dtypes]
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
    ap.add_argument("--resume", action="store_true", help="keep the runs an existing --scores file has (same windows!)")
    ap.add_argument("--keys", help="score only these runs, ','-separated scheme/dtype/mode keys "
                    "(mode act or weights), e.g. bf16/float32/weights,FP8/bfloat16/act")
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
    todo = jobs(schemes, args.dtypes.split(","))
    if args.keys:
        want = [k for k in args.keys.split(",") if k]
        known = {f"{s}/{d}/{m}": (s, d, m) for s, d, m in todo}
        unknown = [k for k in want if k not in known]
        if unknown:
            raise SystemExit(f"--keys: expected keys from {sorted(known)}, found {unknown}")
        todo = [known[k] for k in want]
    if args.resume and Path(args.scores).is_file():
        done = json.loads(Path(args.scores).read_text())["scores"]
        res["scores"].update({k: v for k, v in done.items() if "logprobs" in v})
        todo = [(s, d, m) for s, d, m in todo if f"{s}/{d}/{m}" not in res["scores"]]
        print(f"--resume: {len(res['scores'])} runs already in {args.scores}", flush=True)
    if any(m == "act-padded" for _, _, m in todo):
        res["padded_groups_check"] = check_padded_groups(out / "FP8_BLOCK")
        print("padded_activation_groups:", res["padded_groups_check"], flush=True)
    for s, dtype, mode in todo:
        ckpt = Path(args.model) if s == "bf16" else out / s
        r = score(ckpt, windows, dtype, mode != "weights", args.threads, pad_groups=mode == "act-padded")
        key = f"{s}/{dtype}/{mode}"
        res["scores"][key] = r
        Path(args.scores).write_text(json.dumps(res))  # after every run: an interrupted job keeps what it did
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
