#!/usr/bin/env python3
"""Do the engine's FP8 linear layers compute what the checkpoint stores? One vLLM engine (this
plugin, W8A16 unless FP8_BACKEND_EMULATE_W8A8=1) on an FP8 checkpoint with per-tensor or
per-channel weight scales (AutoFP8 or compressed-tensors); for the fused q/k/v, o, gate/up and
down layers of three decoder layers, random bf16 inputs go through the loaded vLLM layer and are
compared with x @ W^T in fp32, W = the checkpoint's FP8 weight x weight_scale of each shard.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python research/llmcompressor/engine_layer_check.py CKPT [--json out.json]

Reports per layer the relative error (norm), the mean signed error relative to mean |ref| (a
bias would show here) and the fraction of outputs equal to the reference rounded to bf16 (1.0:
the layer is the correctly rounded product of the stored weights; bf16 output rounding alone
gives a relative error of ~2^-9 / sqrt(3) = 1.1e-3 to 1.7e-3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SHARDS = (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("self_attn.o_proj", ("self_attn.o_proj",)),
          ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp.down_proj", ("mlp.down_proj",)))


def check(model, ckpt: str, layers: list[int]) -> dict:
    """Runs inside the engine (LLM.apply_model): per fused layer, engine output vs x @ W^T."""
    import glob

    import torch
    from safetensors.torch import load_file

    t = {}
    for f in glob.glob(os.path.join(ckpt, "*.safetensors")):
        t.update(load_file(f))
    gen = torch.Generator().manual_seed(0)
    res = {}
    for i in layers:
        p = f"model.layers.{i}"
        for fused, shards in SHARDS:
            ws = []
            for s in shards:
                if f"{p}.{s}.weight_scale" not in t:
                    raise SystemExit(f"{ckpt}: expected {p}.{s}.weight_scale (per-tensor or per-channel FP8), found none")
                sc = t[f"{p}.{s}.weight_scale"].float()
                ws.append(t[f"{p}.{s}.weight"].float() * (sc.reshape(-1, 1) if sc.numel() > 1 else sc.reshape(())))
            w = torch.cat(ws)
            x = torch.randn(64, w.shape[1], generator=gen).bfloat16()
            with torch.no_grad():
                out = model.get_submodule(f"{p}.{fused}")(x)[0].float()
            ref = x.float() @ w.T
            res[f"{i}.{fused}"] = {"rel_err": ((out - ref).norm() / ref.norm()).item(),
                                   "bias_rel": ((out - ref).mean() / ref.abs().mean()).item(),
                                   "frac_eq_bf16_ref": (out == ref.bfloat16().float()).float().mean().item()}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    ckpt = str(Path(args.ckpt).resolve())
    layers = [int(x) for x in args.layers.split(",")]
    llm = LLM(model=ckpt, dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=256 << 20,
              max_model_len=2048, seed=0)
    res = llm.apply_model(lambda m: check(m, ckpt, layers))[0]
    for k, v in res.items():
        print(f"{k:24s} rel. error {v['rel_err']:.2e}, mean signed error {v['bias_rel']:+.1e}, "
              f"equal to bf16(x @ W^T): {100 * v['frac_eq_bf16_ref']:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow engine teardown


if __name__ == "__main__":
    sys.exit(main())
