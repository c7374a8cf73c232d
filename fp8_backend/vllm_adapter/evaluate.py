"""Measure an engine: prompt log-probs, what each linear layer runs, weight bytes."""

from __future__ import annotations

from typing import Any


def prompt_logprobs(llm, token_ids: list[list[int]]) -> list[list[float]]:
    """Log-prob of each prompt token given the ones before it (the first token has none)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in token_ids], params, use_tqdm=False)
    result = []
    for ids, out in zip(token_ids, outs):
        lps = []
        for pos, d in enumerate(out.prompt_logprobs[1:], start=1):
            lps.append(float(d[ids[pos]].logprob))
        result.append(lps)
    return result


def _layer_report(model) -> dict[str, Any]:
    """Runs inside the worker: quant method and weight dtype of every linear layer."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    layers = {}
    weight_bytes = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            w = module.weight
            layers[name] = {
                "quant_method": type(module.quant_method).__module__ + "." + type(module.quant_method).__qualname__,
                "weight_dtype": str(w.dtype),
                "weight_shape": list(w.shape),
                "weight_nbytes": w.numel() * w.element_size(),
                # Logical size: vLLM's CPU bf16 path moves the weight into a oneDNN handle and
                # leaves an empty tensor behind, so shapes alone do not tell the layer's size.
                "in_features": _features(module, "input"),
                "out_features": _features(module, "output"),
                "scale_numel": int(module.weight_scale.numel()) if hasattr(module, "weight_scale") else None,
            }
    moe = {}
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            method = getattr(module, "quant_method", None)
            inner = getattr(method, "delegate", method)  # fp8-backend's delegation wrapper
            w13 = getattr(module, "w13_weight", None)
            moe[name] = {
                "quant_method": type(method).__module__ + "." + type(method).__qualname__,
                "runs": type(inner).__module__ + "." + type(inner).__qualname__,
                "num_experts": int(getattr(module, "local_num_experts", 0) or getattr(module, "global_num_experts", 0)),
                "w13_dtype": None if w13 is None else str(w13.dtype),
            }
    attention = {}
    from vllm.model_executor.layers.attention import Attention

    for name, module in model.named_modules():
        if isinstance(module, Attention):
            kh = getattr(module, "_fp8b_k_heads", None)
            vh = getattr(module, "_fp8b_v_heads", None)
            attention[name] = {
                "impl": type(module.impl).__module__ + "." + type(module.impl).__qualname__,
                "own_kernels": bool(getattr(module.impl, "own", False)),
                "kv_cache_dtype": str(module.kv_cache_dtype),
                "k_scale": float(module._k_scale_float),
                "v_scale": float(module._v_scale_float),
                "k_scale_heads": None if kh is None else kh.tolist(),
                "v_scale_heads": None if vh is None else vh.tolist(),
            }
    for p in model.parameters():
        weight_bytes += p.numel() * p.element_size()
    for b in model.buffers():
        if b.dtype != torch.bool:
            weight_bytes += b.numel() * b.element_size()
    return {"linear": layers, "moe": moe, "attention": attention, "param_bytes": weight_bytes}


def _features(module, side: str) -> int:
    """A linear layer's logical in/out size on this rank (vLLM's router GateLinear has no
    per-partition sizes: it is never sharded)."""
    for attr in (f"{side}_size_per_partition", f"{side}_size"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    w = module.weight
    return int(w.shape[1] if side == "input" else w.shape[0])


def layer_report(llm) -> dict[str, Any]:
    """Quant method / dtype per linear layer and total parameter bytes, from the worker."""
    return llm.apply_model(_layer_report)[0]


def _worker(argv: list[str] | None = None) -> None:
    """One engine scoring token windows: ``python -m fp8_backend.vllm_adapter.evaluate`` (run by
    :mod:`fp8_backend.eval.run`, one process per configuration). Prints ``RESULT {json}``."""
    import argparse
    import json
    import os
    import sys
    import time

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--windows-file", required=True, help="JSON list of token-id windows")
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args(argv)

    from vllm import LLM

    from ..eval.metrics import linear_summary

    windows = json.loads(open(args.windows_file).read())
    t0 = time.perf_counter()
    llm = LLM(model=args.model, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              enforce_eager=True, max_model_len=max(args.max_model_len, max(map(len, windows))),
              kv_cache_memory_bytes=256 << 20, seed=0)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lps = prompt_logprobs(llm, windows)
    report = layer_report(llm)
    attn = list(report["attention"].values())
    result = {"load_s": load_s, "score_s": time.perf_counter() - t0, "logprobs": lps,
              "linear": linear_summary(report), "moe": report["moe"],
              "attention_own_kernels": bool(attn and attn[0]["own_kernels"])}
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip the engine's slow teardown


if __name__ == "__main__":
    _worker()
