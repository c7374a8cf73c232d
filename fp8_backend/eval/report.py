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
    if any("simulation" in r for r in rows):
        out += ["", simulation_markdown(rows, labels)]
    return "\n".join(out)


def simulation_markdown(rows: list[dict], labels: dict[str, str]) -> str:
    """Engine vs simulation (``fp8-backend eval --simulate``): the simulation's perplexity and
    dtype, the engine's perplexity relative to it directly and after dividing each by its 16-bit
    reference's (+- one standard error over windows), per-token |delta log-prob| engine vs
    simulation, and the verdict (fp8_backend.eval.simulate.verdict)."""
    target = next((r["simulation"]["target_pct"] for r in rows if "target_pct" in r.get("simulation", {})), None)
    out = ["Engine vs simulation (transformers computing what fp8_backend/numerics.py specifies; bfloat16 "
           "where the engine rounds bf16 values to FP8, i.e. FP8 KV cache or W8A8 emulation, else float32). "
           "The verdict judges `each vs its reference`, which cancels the 16-bit engine's own offset "
           "(the reference row); undecided: two standard errors exceed the target.", "",
           "| configuration | engine perplexity | simulated perplexity | sim. dtype | engine vs sim. (+- s.e.) | "
           f"each vs its reference (+- s.e.) | mean abs. delta log-prob vs sim. | max | within {target}% |",
           "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r.get("simulation")
        if s is None:
            continue
        name = labels[r["config"]] + (" (reference)" if r["config"] == "reference" else "")
        if "skipped" in s:
            out.append(f"| {name} | {r['ppl']:.3f} | not simulated: {s['skipped']} | | | | | | |")
            continue
        rel = f"{s['rel_pct']:+.2f}% +- {s['rel_se_pct']:.2f}%" if "rel_pct" in s else ""
        v = "(16-bit offset)" if s["verdict"] == "reference" else s["verdict"]
        out.append(f"| {name} | {s['ppl_engine']:.3f} | {s['ppl_sim']:.3f} | {s['spec']['dtype']} | "
                   f"{s['diff_pct']:+.2f}% +- {s['se_pct']:.2f}% | {rel} | {s['mean_abs']:.4f} | {s['max_abs']:.3f} | {v} |")
    return "\n".join(out)


def table(rows: list[list[str]]) -> str:
    """A Markdown table of string cells, columns padded to their widest cell; ``rows[0]`` is the
    header; the first column is left-aligned, the others right-aligned."""
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"table: expected rows of {len(rows[0]) if rows else '>= 1'} cells, found "
                         f"{sorted({len(r) for r in rows})}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(rows[0]), sep] + [fmt(r) for r in rows[1:]])


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
