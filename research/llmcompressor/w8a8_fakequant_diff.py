#!/usr/bin/env python3
"""Layer by layer: compressed-tensors' activation fake-quant vs this plugin's W8A8 emulation on the
SAME inputs, to tell a semantic difference (bias) from rounding noise.

Runs in the llm-compressor venv (research/llmcompressor/setup_llmcompressor.sh; it loads the checkpoint with
transformers + compressed-tensors) and imports only fp8_backend/numerics.py from this repository
(torch only, no vLLM):

    .venv-llmc/bin/python research/llmcompressor/w8a8_fakequant_diff.py --ckpt DIR --windows windows.json \\
        [--window 0] [--dtype bfloat16] [--json out.json]

One window goes through the checkpoint as compressed-tensors runs it (activation fake-quant on).
A forward pre-hook on every quantized Linear takes its input x (the value compressed-tensors
fake-quantizes, computed by compressed-tensors' own model) and compares, element by element:

  ct    compressed-tensors' forward_quantize(module, x, "input", args) (the value its matmul uses)
  ours  what the plugin's emulation (fp8_backend/vllm_adapter/linear_paths.py fake_quant_activations, i.e.
        numerics.py) makes of the same x: static per-tensor: q = round(x.float() / s) and the
        GEMM uses q * s exactly (s is folded into the fp32 weight scale); dynamic per-token and
        1x128 groups: (q * s) rounded to x.dtype

Reported per layer kind (q/k/v, o, gate/up, down; summed over the 30 layers): the fraction of
elements whose FP8 code differs (codes of ct recovered as round(ct / s)), the mean signed relative
difference (ct - ours) / |ours| (a bias would show here; rounding noise averages to ~0), and the
mean |relative difference|. Static: s = the layer's input_scale. The scored window gives the same
x to both sides, so any difference is the fake-quant arithmetic, not upstream drift.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def load_numerics():
    """fp8_backend/numerics.py by path (it imports only torch), without importing the package."""
    spec = importlib.util.spec_from_file_location("fp8_numerics", ROOT / "fp8_backend" / "numerics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ours(numerics, x, args, module):
    """The plugin's emulated activation for x (fp32) and the per-element scale it used."""
    import torch

    strategy = str(args.strategy).split(".")[-1].lower()
    if not args.dynamic and strategy == "tensor":
        s = module.input_scale.detach().float().reshape(())
        q = numerics.quantize_with_scale(x, s)
        return q.float() * s, s.expand_as(x)
    if args.dynamic and strategy == "token":
        q, s = numerics.quantize_per_token(x)
        return (q.float() * s).to(x.dtype).float(), s.expand_as(x)
    if args.dynamic and strategy == "group":
        g = args.group_size
        k = x.shape[-1]
        q, s = numerics.quantize_group(x, g)
        pad = torch.nn.functional.pad(q.float(), (0, (-k) % g)).reshape(*x.shape[:-1], -1, g)
        full = (pad * s.unsqueeze(-1)).reshape(*x.shape[:-1], -1)[..., :k]
        s_el = s.unsqueeze(-1).expand(*s.shape, g).reshape(*x.shape[:-1], -1)[..., :k]
        return full.to(x.dtype).float(), s_el
    raise SystemExit(f"unsupported input activation args: strategy {args.strategy}, dynamic {args.dynamic}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--windows", required=True, help="JSON list of token-id lists")
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    numerics = load_numerics()
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=getattr(torch, args.dtype)).eval()
    stats: dict[str, dict[str, float]] = {}

    def hook(mod, inp, name):
        x = inp[0].detach()
        a = mod.quantization_scheme.input_activations
        ct = forward_quantize(mod, x, "input", a).float()
        ref, s = ours(numerics, x, a, mod)
        code_ct = numerics.round_to_fp8(ct / s).float()
        code_ours = numerics.round_to_fp8(ref / s).float()
        nz = ref != 0
        rel = (ct - ref)[nz] / ref[nz].abs()
        kind = name.split(".")[-1]
        st = stats.setdefault(kind, {"n": 0, "code_diff": 0, "rel_sum": 0.0, "abs_rel_sum": 0.0, "n_nz": 0,
                                     "ct_larger": 0, "ct_smaller": 0})
        st["n"] += x.numel()
        diff = code_ct != code_ours
        st["code_diff"] += int(diff.sum())
        st["ct_larger"] += int((diff & (code_ct.abs() > code_ours.abs())).sum())
        st["ct_smaller"] += int((diff & (code_ct.abs() < code_ours.abs())).sum())
        st["rel_sum"] += float(rel.double().sum())
        st["abs_rel_sum"] += float(rel.double().abs().sum())
        st["n_nz"] += int(nz.sum())

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and getattr(mod, "quantization_scheme", None) is not None:
            mod.register_forward_pre_hook(lambda m, i, n=name: hook(m, i, n))
    window = json.loads(Path(args.windows).read_text())[args.window]
    with torch.no_grad():
        model(torch.tensor([window]))
    out = {}
    print(f"{args.ckpt} in {args.dtype}, window {args.window} ({len(window)} tokens): compressed-tensors' "
          "activation fake-quant vs the plugin's emulation on the same inputs")
    for kind, st in stats.items():
        out[kind] = {"elements": st["n"], "code_diff_frac": st["code_diff"] / st["n"],
                     "ct_larger_frac": st["ct_larger"] / st["n"], "ct_smaller_frac": st["ct_smaller"] / st["n"],
                     "mean_rel": st["rel_sum"] / st["n_nz"], "mean_abs_rel": st["abs_rel_sum"] / st["n_nz"]}
        o = out[kind]
        print(f"  {kind:10s} {o['elements']:>10d} elements: FP8 code differs {100 * o['code_diff_frac']:.3f}% "
              f"(ct larger {100 * o['ct_larger_frac']:.3f}%, smaller {100 * o['ct_smaller_frac']:.3f}%); "
              f"mean rel. diff {o['mean_rel']:+.2e}, mean |rel. diff| {o['mean_abs_rel']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
