"""Command-line options shared by the accuracy reports (scripts/accuracy_report.py and
research/llmcompressor/llmcompressor_report.py), so that both score the same windows of the same
text and calibrate on the same held-out articles."""

from __future__ import annotations

import argparse

#: the demo's model and text (scripts/get_smollm2.py, scripts/get_wikitext.py), relative to the repository
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
DEFAULT_DATA = "data/wiki.txt"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--model, --data, --windows, --window-len, --per-article, --threads, --calib-samples, --calib-len."""
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--per-article", type=int, default=1,
                    help="up to this many consecutive windows per article (default 1: its first window-len tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration windows (producer num_samples)")
    ap.add_argument("--calib-len", type=int, default=256, help="calibration window length (producer seq_len)")
