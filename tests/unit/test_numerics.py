"""numerics.py is the specification: pin each rule with exact values."""

import math

import pytest
import torch

from moe_experts import experts

from fp8_backend import numerics as nx

E4M3, E5M2, FNUZ = nx.E4M3, nx.E5M2, nx.E4M3FNUZ


def f(x):
    return torch.tensor(x, dtype=torch.float32)


def all_e4m3_values() -> torch.Tensor:
    """The 254 finite e4m3fn values (every byte but 0x7F / 0xFF, which are NaN)."""
    b = torch.arange(256, dtype=torch.uint8)
    v = b.view(E4M3).float()
    return v[torch.isfinite(v)]


class TestRounding:
    def test_max_values(self):
        assert nx.fp8_max(E4M3) == 448.0 and nx.fp8_max(E5M2) == 57344.0 and nx.fp8_max(FNUZ) == 240.0
        assert all_e4m3_values().abs().max().item() == 448.0

    def test_unsupported_dtype(self):
        with pytest.raises(ValueError, match="unsupported FP8 dtype"):
            nx.fp8_max(torch.int8)

    @pytest.mark.parametrize(
        "x, want",
        [
            (1.0625, 1.0),  # tie between 1.0 (mantissa 000) and 1.125 (001): even wins
            (1.1875, 1.25),  # tie between 1.125 (001) and 1.25 (010): even wins
            (1.2, 1.25),
            (-1.0625, -1.0),
            (3 * 2.0**-10, 2.0**-8),  # subnormal tie 1.5 * 2^-9 -> 2 * 2^-9 (even)
            (2.0**-10, 0.0),  # half the smallest subnormal: tie to 0 (even)
            (1.01 * 2.0**-10, 2.0**-9),  # just above half: rounds up to the smallest subnormal
            (7 * 2.0**-9, 7 * 2.0**-9),  # largest subnormal is exact
            (448.0, 448.0),
            (449.0, 448.0),  # beyond max saturates (torch alone would give NaN)
            (464.0, 448.0),  # the midpoint to the next binade also saturates
            (1e9, 448.0),
            (-1e9, -448.0),
            (math.inf, 448.0),
            (-math.inf, -448.0),
            (0.0, 0.0),
        ],
    )
    def test_e4m3_round_half_even_and_saturate(self, x, want):
        assert nx.round_to_fp8(f([x]), E4M3).float().item() == want

    def test_negative_zero_kept(self):
        assert torch.signbit(nx.round_to_fp8(f([-0.0]), E4M3).float()).item()

    def test_nan_stays_nan(self):
        assert torch.isnan(nx.round_to_fp8(f([math.nan]), E4M3).float()).item()

    @pytest.mark.parametrize(
        "x, want",
        [(57344.0, 57344.0), (61440.0, 57344.0), (1e6, 57344.0), (math.inf, 57344.0), (1.125, 1.0), (1.375, 1.5)],
    )
    def test_e5m2(self, x, want):
        assert nx.round_to_fp8(f([x]), E5M2).float().item() == want

    def test_every_e4m3_value_is_a_fixed_point(self):
        v = all_e4m3_values()
        assert torch.equal(nx.round_to_fp8(v, E4M3).float(), v)


class TestScales:
    def test_scale_is_amax_over_max(self):
        x = f([[-2.0, 1.0], [0.5, 0.25]])
        q, s = nx.quantize_per_tensor(x)
        assert s.item() == torch.tensor(2.0 / 448.0, dtype=torch.float32).item()  # fp32 division, exactly
        assert s.shape == ()
        assert q.float()[0, 0].item() == -448.0

    def test_all_zero_scale_is_positive_floor(self):
        q, s = nx.quantize_per_tensor(torch.zeros(4, 4))
        assert s.item() == pytest.approx(1.0 / (448.0 * 512.0))
        assert s.item() > 0 and torch.all(q.float() == 0)
        _, sc = nx.quantize_per_channel(torch.zeros(3, 5))
        assert torch.all(sc > 0)

    def test_per_channel(self):
        w = f([[1.0, -4.0], [0.0, 0.0], [448.0, 1.0]])
        q, s = nx.quantize_per_channel(w)
        assert s.shape == (3, 1)
        assert s[:, 0].tolist() == pytest.approx([4.0 / 448, 1.0 / (448 * 512), 1.0])
        assert q.float()[0].tolist() == [112.0, -448.0]

    def test_per_token_with_upper_bound(self):
        x = f([[1000.0, 1.0], [2.0, -1.0]])
        q, s = nx.quantize_per_token(x, scale_ub=10.0)
        assert s[:, 0].tolist() == pytest.approx([10.0 / 448, 2.0 / 448])
        assert q.float()[0, 0].item() == 448.0  # the outlier saturates instead of stretching the scale

    def test_block_partial_last_block(self):
        # 576 = 4 * 128 + 64: the last block along each dim covers 64 elements.
        w = torch.zeros(130, 576)
        w[129, 575] = 8.0  # in the last (partial) block of both dims
        w[0, 0] = 2.0
        q, s = nx.quantize_block(w)
        assert s.shape == (2, 5)
        assert s[1, 4].item() == pytest.approx(8.0 / 448)
        assert s[0, 0].item() == pytest.approx(2.0 / 448)
        assert s[0, 4].item() == pytest.approx(1.0 / (448 * 512))
        assert nx.dequantize(q, s, (128, 128))[129, 575].item() == 8.0

    def test_block_scale_shape_checked(self):
        with pytest.raises(ValueError, match=r"expected shape \(2, 5\)"):
            nx.dequantize(torch.zeros(130, 576, dtype=E4M3), torch.ones(2, 4), (128, 128))

    def test_group_quant(self):
        x = torch.arange(1, 201, dtype=torch.float32).reshape(1, 200)
        q, s = nx.quantize_group(x, 128)
        assert s.shape == (1, 2)
        assert s[0].tolist() == pytest.approx([128 / 448, 200 / 448])
        assert q.shape == (1, 200)

    def test_check_finite_names_tensor(self):
        with pytest.raises(ValueError, match=r"layers\.0\.w: expected finite values, found 1 NaN and 1 Inf"):
            nx.check_finite(f([1.0, math.nan, math.inf]), "layers.0.w")
        nx.check_finite(f([1.0, 2.0]), "ok")

    @pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
    def test_check_scale(self, bad):
        with pytest.raises(ValueError, match="s:"):
            nx.check_scale(f([1.0, bad]), "s")


class TestRoundTrip:
    @pytest.mark.parametrize("fn", [nx.quantize_per_tensor, nx.quantize_per_channel, nx.quantize_block])
    def test_relative_error_bound(self, fn):
        # e4m3 has 3 mantissa bits: for values in the normal range, |q*s - x| <= 2^-4 |x|.
        torch.manual_seed(0)
        w = torch.randn(300, 260)
        q, s = fn(w)
        bs = (128, 128) if fn is nx.quantize_block else None
        d = nx.dequantize(q, s, bs)
        scale_full = nx.expand_block_scale(s, (300, 260), bs) if bs else s.expand_as(w) if s.dim() else s.expand(300, 260)
        normal = w.abs() >= scale_full * 2.0**-6
        assert torch.all((d - w).abs()[normal] <= w.abs()[normal] * 2.0**-4 + 1e-12)
        assert torch.all((d - w).abs()[~normal] <= scale_full[~normal] * 2.0**-10 + 1e-12)


class TestFnuz:
    def test_values_preserved(self):
        b = torch.arange(256, dtype=torch.uint8)
        b = b[b != 0x80]  # the fnuz NaN
        v = b.view(FNUZ).float()
        q, s = nx.e4m3fnuz_to_e4m3fn(b, torch.tensor(0.5))
        out = q.float()
        big = v.abs() >= 2.0**-6
        assert torch.equal(out[big], v[big])  # every value >= 2^-6 is kept exactly, 240 included
        assert (out[~big] - v[~big]).abs().max().item() <= 2.0**-10
        assert s.item() == 0.5

    def test_nan_refused(self):
        with pytest.raises(ValueError, match="0x80"):
            nx.e4m3fnuz_to_e4m3fn(torch.tensor([0x80], dtype=torch.uint8), torch.tensor(1.0))


class TestLinearReference:
    def test_scales_factor_out_of_the_dot_product(self):
        x = f([[1.0, 2.0, 3.0]]).to(torch.bfloat16)
        q = f([[1.0, 1.0, 1.0], [448.0, 0.0, -2.0]]).to(E4M3)
        y = nx.w8a16_linear(x, q, f([0.5, 2.0]), bias=f([1.0, 0.0]))
        assert y.dtype == torch.bfloat16
        assert y.float().tolist() == [[4.0, 884.0]]

    def test_matches_dequantize_then_matmul(self):
        torch.manual_seed(1)
        w = torch.randn(33, 70)
        q, s = nx.quantize_per_channel(w)
        x = torch.randn(5, 70)
        ref = x @ nx.dequantize(q, s).T
        assert torch.allclose(nx.w8a16_linear(x, q, s), ref, rtol=1e-5, atol=1e-5)

    def test_k_mismatch(self):
        with pytest.raises(ValueError, match="K=3"):
            nx.w8a16_linear(torch.zeros(1, 3), torch.zeros(2, 4, dtype=E4M3), f([1.0]))

    def test_w8a8_static_vs_dynamic(self):
        torch.manual_seed(2)
        w = torch.randn(16, 64)
        q, s = nx.quantize_per_channel(w)
        x = torch.randn(4, 64)
        exact = x @ nx.dequantize(q, s).T
        for kw in [{"act_block": (1, 0)}, {"act_block": (0, 0)}, {"input_scale": x.abs().max() / 448}]:
            y = nx.w8a8_linear(x, q, s.reshape(-1), **kw)
            assert (y - exact).abs().max() < 0.1 * exact.abs().max()
        # per token: each row's scale is its own amax / 448, as quantize_per_token's
        xq, xs = nx.quantize_per_token(x)
        assert torch.equal(nx.w8a8_linear(x, q, s.reshape(-1)),
                           (xq.float() @ q.float().T) * xs * s.reshape(1, -1))
        with pytest.raises(ValueError, match="act_block"):
            nx.w8a8_linear(x, q, s, (1, 32))


class TestFusedMoe:
    """fused_moe_w8a16 against a plain per-token loop over dequantized fp32 experts."""

    @pytest.mark.parametrize("block_size", [None, (16, 16)])
    def test_matches_token_loop(self, block_size):
        e, i, h, t, k = 5, 24, 40, 7, 2  # I = 24 leaves a partial 16-row block in gate and up
        q13, s13, q2, s2 = experts(e, i, h, block_size)
        x = torch.randn(t, h, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        ids = torch.tensor([[0, 1], [1, 1], [4, 0], [0, 4], [1, 0], [4, 4], [0, 1]])  # expert 2, 3 idle
        wts = torch.rand(t, k, generator=torch.Generator().manual_seed(4))
        out = nx.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids, block_size)
        assert out.dtype == torch.bfloat16 and out.shape == (t, h)
        for tok in range(t):
            ref = torch.zeros(h)
            for j in range(k):
                ex = int(ids[tok, j])
                if block_size is None:
                    d13, d2 = nx.dequantize(q13[ex], s13[ex]), nx.dequantize(q2[ex], s2[ex])
                else:
                    half = s13.shape[1] // 2
                    d13 = torch.cat([nx.dequantize(q13[ex, :i], s13[ex, :half], block_size),
                                     nx.dequantize(q13[ex, i:], s13[ex, half:], block_size)])
                    d2 = nx.dequantize(q2[ex], s2[ex], block_size)
                gu = (x[tok].float() @ d13.T).to(torch.bfloat16).float()
                a = (torch.nn.functional.silu(gu[:i]) * gu[i:]).to(torch.bfloat16).float()
                ref += float(wts[tok, j]) * (a @ d2.T)
            # Both sides round at the same points; only fp32 summation order differs.
            assert torch.allclose(out[tok].float(), ref.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3), tok

    def test_token_routed_twice_counts_twice(self):
        q13, s13, q2, s2 = experts(2, 8, 16, None)
        x = torch.randn(1, 16).to(torch.bfloat16)
        once = nx.fused_moe_w8a16(x, q13, s13, q2, s2, f([[1.0]]), torch.tensor([[1]]))
        twice = nx.fused_moe_w8a16(x, q13, s13, q2, s2, f([[0.5, 0.5]]), torch.tensor([[1, 1]]))
        assert torch.equal(once, twice)

    def test_bad_shapes_and_ids(self):
        q13, s13, q2, s2 = experts(2, 8, 16, None)
        x = torch.zeros(1, 16, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"w13_scale \(2, 16\)"):
            nx.fused_moe_w8a16(x, q13, s13[:, :8], q2, s2, f([[1.0]]), torch.tensor([[0]]))
        with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 2\)"):
            nx.fused_moe_w8a16(x, q13, s13, q2, s2, f([[1.0]]), torch.tensor([[2]]))
        with pytest.raises(ValueError, match="w13 \\[E, 2I, H\\]"):
            nx.fused_moe_w8a16(torch.zeros(1, 15, dtype=torch.bfloat16), q13, s13, q2, s2, f([[1.0]]), torch.tensor([[0]]))
