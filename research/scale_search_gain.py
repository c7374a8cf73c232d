#!/usr/bin/env python3
"""What the MSE scale search gains over amax scales, on a model's linear weights (no model run).

    .venv/bin/python research/scale_search_gain.py MODEL_DIR [--strategies tensor channel block]

For each strategy prints sum over all quantized linear weights of the squared FP8 quantization
error with MSE-searched scales, divided by the same with amax scales (< 1 = the search helps;
never > 1), plus the median per-layer ratio. Reads the safetensors tensor by tensor.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from safetensors import safe_open

from fp8_backend.quantize.layers import model_layers, quantized_layers
from fp8_backend.quantize.shards import input_shards
from fp8_backend.formats.scheme import PER_ROW, PER_TENSOR, blocks
from fp8_backend.quantize.weights import choose_scale

GRANULARITIES = {"tensor": PER_TENSOR, "channel": PER_ROW, "block": blocks(128, 128)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--strategies", nargs="+", choices=list(GRANULARITIES), default=list(GRANULARITIES))
    args = ap.parse_args()
    quant, _, _ = quantized_layers(model_layers(args.model_dir), ["lm_head"])
    wanted = {f"{n}.weight" for n in quant}
    for strategy in args.strategies:
        tot = tot_amax = 0.0
        ratios = []
        for shard in input_shards(args.model_dir):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    if name not in wanted:
                        continue
                    w = f.get_tensor(name).float()
                    e = float(choose_scale(w, GRANULARITIES[strategy], "mse")[1].sum())
                    e0 = float(choose_scale(w, GRANULARITIES[strategy], "none")[1].sum())
                    tot, tot_amax = tot + e, tot_amax + e0
                    ratios.append(e / e0 if e0 else 1.0)
        print(f"{strategy:8s} MSE(search)/MSE(amax) = {tot / tot_amax:.4f} over {len(ratios)} weights "
              f"(median per weight {statistics.median(ratios):.4f}, best {min(ratios):.4f})")


if __name__ == "__main__":
    main()
