"""The speed-up plot every benchmark draws beside its RESULTS.md section (matplotlib, Agg).

One line per series of (x, speed-up) points, x on a log-2 axis, speed-up on a linear axis from
0, a dashed line at 1x (below it the baseline is faster). Used by bench_attention.py (vs
context), bench_moe.py (vs tokens) and plot_w8a16.py (vs M).
"""

from __future__ import annotations

from pathlib import Path


def speedup_plot(series: dict[str, list[tuple[float, float]]], out: Path | str, *, xlabel: str,
                 ylabel: str, title: str, xlog: bool = True) -> Path:
    """Draw `series` ({label: [(x, speed-up), ...]}) to the PNG `out` and return its path.
    Series without points are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, pts in series.items():
        pts = sorted(p for p in pts if p[1] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    if xlog:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
