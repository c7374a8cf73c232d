"""Speed-up of fp8_backend's W8A16 op over vLLM's bf16 linear vs M, one line per shape, from the
JSON that bench_w8a16.py writes (BENCH_W8A16_JSON=path):
    python benchmarks/plot_w8a16.py results.json out.png "title"
"""

import json
import sys

from plotting import speedup_plot


def main(src: str, out: str, title: str) -> None:
    d = json.load(open(src))
    res = {tuple(r[:4]): r[4] for r in d["results"]}
    shapes = sorted({(n, k) for n, k, _, _ in res})
    series, base = {}, "F.linear"
    for n, k in shapes:
        ms = sorted(m for (nn, kk, m, i) in res if (nn, kk, i) == (n, k, "fp8_backend"))
        base = "vllm_onednn" if any((n, k, m, "vllm_onednn") in res for m in ms) else "F.linear"
        series[f"N x K = {n} x {k}"] = [(m, res[(n, k, m, base)] / res[(n, k, m, "fp8_backend")])
                                        for m in ms if (n, k, m, base) in res]
    speedup_plot(series, out, xlabel="M (activation rows)",
                 ylabel=f"speed-up vs vLLM bf16 ({'oneDNN' if base == 'vllm_onednn' else 'F.linear'})",
                 title=title)


if __name__ == "__main__":
    main(*sys.argv[1:4])
