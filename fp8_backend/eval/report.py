"""The Markdown table and the plot of an evaluation."""

from __future__ import annotations

from pathlib import Path

MIB = 1 << 20


def markdown(rows: list[dict], labels: dict[str, str], n_windows: int, window_len: int) -> str:
    """Perplexity, its change, per-token |delta log-prob| (mean / p99 / max) and linear weights."""
    out = [f"{n_windows} windows x {window_len} tokens (first token of each unscored).", "",
           "| configuration | perplexity | vs reference | mean abs. delta log-prob | p99 | max | linear weights MiB (FP8 layers) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lin = r["linear"]
        w = f"{lin['bytes'] / MIB:.1f} ({lin['n_fp8']}/{lin['n_linear']})"
        if "agreement" not in r:
            out.append(f"| {labels[r['config']]} (reference) | {r['ppl']:.3f} | | | | | {w} |")
            continue
        a = r["agreement"]
        out.append(f"| {labels[r['config']]} | {r['ppl']:.3f} | {100 * r['ppl_change']:+.2f}% | "
                   f"{a['mean_abs']:.4f} | {a['p99_abs']:.3f} | {a['max_abs']:.3f} | {w} |")
    return "\n".join(out)


def plot(reference: dict, results: dict[str, dict], labels: dict[str, str], path: Path) -> Path:
    """Distribution of per-token |delta log-prob| against the reference, one curve per
    configuration (complementary CDF, log-log: the tail is where quantization hurts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ref = [x for w in reference["logprobs"] for x in w]
    for name, r in results.items():
        d = sorted(abs(a - b) for a, b in zip(ref, (x for w in r["logprobs"] for x in w)))
        n = len(d)
        pos = [(v, 1 - i / n) for i, v in enumerate(d) if v > 0]
        if pos:
            ax.plot([p[0] for p in pos], [p[1] for p in pos], label=labels[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|delta log-prob| per token vs reference")
    ax.set_ylabel("fraction of tokens above")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
