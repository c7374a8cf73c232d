"""Speed-up of fp8_backend's W8A16 op over vLLM's bf16 linear vs M, one line per shape, from the
JSON that bench_w8a16.py writes (BENCH_W8A16_JSON=path). Needs matplotlib (not a project
dependency):  python benchmarks/plot_w8a16.py results.json out.png "title"
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str, title: str) -> None:
    d = json.load(open(src))
    res = {tuple(r[:4]): r[4] for r in d["results"]}
    shapes = sorted({(n, k) for n, k, _, _ in res})
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for n, k in shapes:
        ms = sorted(m for (nn, kk, m, i) in res if (nn, kk, i) == (n, k, "fp8_backend"))
        base = "vllm_onednn" if any((n, k, m, "vllm_onednn") in res for m in ms) else "F.linear"
        pts = [(m, res[(n, k, m, base)] / res[(n, k, m, "fp8_backend")]) for m in ms if (n, k, m, base) in res]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"N x K = {n} x {k}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("M (activation rows)")
    ax.set_ylabel(f"speed-up vs vLLM bf16 ({'oneDNN' if base == 'vllm_onednn' else 'F.linear'})")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
