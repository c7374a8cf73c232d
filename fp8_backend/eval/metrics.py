"""Numbers computed from engine outputs: perplexity, log-prob agreement, linear weight bytes."""

from __future__ import annotations

import math


def perplexity(logprobs: list[list[float]]) -> float:
    """exp(mean -log p) over every scored token of every window together."""
    flat = [x for w in logprobs for x in w]
    if not flat:
        raise ValueError("perplexity: no scored tokens")
    return math.exp(-sum(flat) / len(flat))


def logprob_agreement(ref: list[list[float]], other: list[list[float]]) -> dict:
    """Per-token |delta log-prob| of ``other`` against ``ref`` on the same windows (mean, p99,
    max) and both perplexities."""
    if len(ref) != len(other):
        raise ValueError(f"logprob_agreement: {len(ref)} reference windows, {len(other)} compared")
    deltas = []
    for i, (a, b) in enumerate(zip(ref, other)):
        if len(a) != len(b):
            raise ValueError(f"logprob_agreement: window {i} scored to {len(a)} and {len(b)} tokens")
        deltas += [abs(x - y) for x, y in zip(a, b)]
    n = len(deltas)
    if not n:
        raise ValueError("logprob_agreement: no scored tokens")
    deltas.sort()
    return {"tokens": n, "mean_abs": sum(deltas) / n, "p99_abs": deltas[min(n - 1, int(0.99 * n))],
            "max_abs": deltas[-1], "ppl_ref": perplexity(ref), "ppl": perplexity(other)}


_DTYPE_BYTES = {"torch.bfloat16": 2, "torch.float16": 2, "torch.float32": 4, "torch.float8_e4m3fn": 1,
                "torch.float8_e5m2": 1, "torch.uint8": 1, "torch.int8": 1}


def linear_summary(report: dict) -> dict:
    """Weight bytes of the linear layers from ``vllm_adapter.evaluate.layer_report``: FP8 layers by
    their storage (weight + fp32 scales), 16-bit ones by their logical size (vLLM's CPU bf16 path
    keeps weights in oneDNN handles and leaves an empty tensor behind)."""
    stored, logical_bf16, params, n_fp8 = 0, 0, 0, 0
    for entry in report["linear"].values():
        numel = entry["in_features"] * entry["out_features"]
        params += numel
        logical_bf16 += 2 * numel
        if "float8" in entry["weight_dtype"]:
            n_fp8 += 1
            stored += entry["weight_nbytes"] + 4 * (entry["scale_numel"] or 0)
        else:
            stored += numel * _DTYPE_BYTES.get(entry["weight_dtype"], 2)
    return {"n_linear": len(report["linear"]), "n_fp8": n_fp8, "params": params,
            "bytes": stored, "bf16_bytes": logical_bf16,
            "dtypes": sorted({e["weight_dtype"] for e in report["linear"].values()}),
            "quant_methods": sorted({e["quant_method"].rsplit(".", 1)[-1] for e in report["linear"].values()})}
