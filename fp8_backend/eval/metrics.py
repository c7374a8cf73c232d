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


def ppl_diff_se(a: list[list[float]], b: list[list[float]], groups: list | None = None) -> tuple[float, float]:
    """Perplexity of log-probs ``b`` relative to ``a`` in percent, and its standard error from the
    spread of the per-window mean log-prob differences (windows as independent samples), or, with
    ``groups`` (one label per window, e.g. its article), of the per-group sums (groups as
    independent samples: windows of one article are not independent). Ratio estimator: the
    difference is sum(delta) / tokens, its variance m/(m-1) * sum_g (D_g - d n_g)^2 / tokens^2 over
    the m groups (D_g, n_g: the group's summed delta and token count); with one window per group of
    equal length this is stdev(per-window means) / sqrt(windows). One group: NaN standard error."""
    if len(a) != len(b) or (groups is not None and len(groups) != len(a)):
        raise ValueError(f"ppl_diff_se: expected equal numbers of windows, found {len(a)}, {len(b)}"
                         + (f", {len(groups)} groups" if groups is not None else ""))
    groups = list(range(len(a))) if groups is None else groups
    dsum, nsum = {}, {}
    for g, wa, wb in zip(groups, a, b):
        dsum[g] = dsum.get(g, 0.0) + sum(y - x for x, y in zip(wa, wb, strict=True))
        nsum[g] = nsum.get(g, 0) + len(wa)
    n = sum(nsum.values())
    if not n:
        raise ValueError("ppl_diff_se: no scored tokens")
    d = sum(dsum.values()) / n
    m = len(dsum)
    se = (m / (m - 1) * sum((dsum[g] - d * nsum[g]) ** 2 for g in dsum)) ** 0.5 / n if m > 1 else float("nan")
    return 100 * (math.exp(-d) - 1), 100 * se


def rel(a: float, b: float) -> str:
    """``a`` relative to ``b`` as a signed percentage with two decimals ("+1.23%")."""
    return f"{100 * (a / b - 1):+.2f}%"


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
