#!/usr/bin/env python3
"""A random-weight Llama for end-to-end speed runs at a size where the linear layers dominate.

    .venv/bin/python benchmarks/make_random_llama.py [OUT] [--hidden 1536 --intermediate 4096
                                                       --layers 16 --heads 12 --kv-heads 4]

Defaults: 16 layers of hidden 1536 / intermediate 4096 (GQA 12/4 heads), ~400M linear parameters
(~800 MB bf16), a small locally trained tokenizer (fp8_backend/testing/tiny_model.py), no hub. Only for speed:
bench_e2e.py with E2E_MODEL=OUT E2E_SECTION=e2e_random; its text is meaningless.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from fp8_backend.testing.tiny_model import build_tiny_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(ROOT / "models" / "random-llama-400m"))
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    a = ap.parse_args()
    out = build_tiny_llama(a.out, hidden_size=a.hidden, intermediate_size=a.intermediate,
                           num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
                           init_std=0.02)
    print(out)


if __name__ == "__main__":
    main()
