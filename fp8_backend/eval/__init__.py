"""Accuracy of FP8 against 16-bit on real text: ``fp8-backend eval``.

Each configuration runs in its own engine process (:mod:`fp8_backend.vllm_adapter.evaluate` is
the worker); this package cuts the token windows, compares the prompt log-probs with the 16-bit
reference and writes the Markdown table and the plot. With ``--simulate`` it also scores the
windows with a transformers simulation of numerics.py (:mod:`.simulate`, FP8 KV: :mod:`.kv_sim`)
and judges the engine against it. Also the accuracy reports' shared helpers (statistics, tables,
calibration text, report options). It imports neither vLLM nor the kernels; transformers lazily.
"""

from .metrics import linear_summary, logprob_agreement, perplexity
from .windows import load_articles, make_windows, text_windows

__all__ = ["linear_summary", "load_articles", "logprob_agreement", "make_windows", "perplexity", "text_windows"]
