"""The accuracy reports' windowing and statistics (fp8_backend.eval: windows, metrics, simulate):
more windows per article, standard errors over articles, and which reference a row is judged
against. Pure Python, no model."""
from __future__ import annotations

import math
import random
import statistics

import pytest

from fp8_backend.eval import make_windows
from fp8_backend.eval.metrics import ppl_diff_se
from fp8_backend.eval.simulate import like_for_like


def test_make_windows_one_per_article_unchanged():
    texts = [list(range(5)), list(range(100, 112)), list(range(200, 208)), list(range(300, 303))]
    groups: list[int] = []
    w = make_windows(texts, n_windows=2, window_len=4, groups=groups)
    # the 5-token text gives its first 4 tokens, the 12-token one only its first window
    assert w == [[0, 1, 2, 3], [100, 101, 102, 103]]
    assert groups == [0, 1]
    with pytest.raises(ValueError, match="only 3 windows of 4 tokens"):
        make_windows(texts, n_windows=4, window_len=4)


def test_make_windows_per_article_consecutive_and_grouped():
    texts = [list(range(5)), [7, 7], list(range(100, 112)), list(range(200, 208))]
    groups: list[int] = []
    w = make_windows(texts, n_windows=5, window_len=4, per_article=3, groups=groups)
    # non-overlapping consecutive windows; 5 tokens hold one window, 12 hold three; the short
    # text [7, 7] is skipped and does not count as an article
    assert w == [[0, 1, 2, 3], [100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110, 111], [200, 201, 202, 203]]
    assert groups == [0, 1, 1, 1, 2]
    # per_article caps the windows an article gives
    assert make_windows(texts, n_windows=4, window_len=4, per_article=2)[2:] == [[104, 105, 106, 107], [200, 201, 202, 203]]
    with pytest.raises(ValueError, match="per_article"):
        make_windows(texts, n_windows=1, window_len=4, per_article=0)


def test_ppl_diff_se_windows_and_groups():
    rnd = random.Random(0)
    a = [[rnd.gauss(-3, 1) for _ in range(50)] for _ in range(12)]
    b = [[x + rnd.gauss(0.05 * (i % 3), 0.05) for x in w] for i, w in enumerate(a)]
    d, se = ppl_diff_se(a, b)
    per = [sum(y - x for x, y in zip(wa, wb)) / 50 for wa, wb in zip(a, b)]
    mean = sum(per) / len(per)
    # equal window lengths, one window per group: the plain standard error of the mean
    assert d == pytest.approx(100 * (math.exp(-mean) - 1), rel=1e-12)
    assert se == pytest.approx(100 * statistics.stdev(per) / len(per) ** 0.5, rel=1e-9)
    # grouping windows whose differences are correlated (0, 1, 2 repeating) by residue class: three
    # clusters of 4 windows with group means 0, 0.05, 0.1 apart, so the clustered s.e. is larger
    d_g, se_g = ppl_diff_se(a, b, [i % 3 for i in range(12)])
    assert d_g == pytest.approx(d, rel=1e-12)
    assert se_g > 1.5 * se  # about 2.3x for these offsets
    # hand computation of the ratio estimator for groups of unequal size
    a2 = [[0.0, 0.0], [0.0], [0.0, 0.0, 0.0]]
    b2 = [[0.1, 0.3], [0.2], [0.0, 0.0, 0.3]]
    g2 = [0, 0, 1]
    d_sum, n = 0.9, 6
    dm = d_sum / n
    var = 2 / 1 * ((0.6 - dm * 3) ** 2 + (0.3 - dm * 3) ** 2) / n ** 2
    d2, se2 = ppl_diff_se(a2, b2, g2)
    assert d2 == pytest.approx(100 * (math.exp(-dm) - 1), rel=1e-12)
    assert se2 == pytest.approx(100 * var ** 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="2 groups"):
        ppl_diff_se(a2, b2, [0, 1])


def test_like_for_like_reference():
    # FP8 rounding of values the engine computes in bf16 (W8A8 emulation, FP8 KV): bf16 reference
    assert like_for_like("fp8", {}) == "bfloat16"
    assert like_for_like("fp8_e5m2", {}) == "bfloat16"
    assert like_for_like("bfloat16", {"FP8_BACKEND_EMULATE_W8A8": "1"}) == "bfloat16"
    # no such rounding: the exact (fp32) math
    assert like_for_like("bfloat16", {}) == "float32"
    assert like_for_like("bfloat16", {"FP8_BACKEND_ATTENTION": "vllm"}) == "float32"
