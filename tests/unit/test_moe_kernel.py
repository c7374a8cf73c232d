"""torch.ops.fp8_backend.fused_moe_w8a16 (csrc/cpu/moe_w8a16.cpp) against numerics.fused_moe_w8a16,
on every CPU kernel path this machine supports, with the GEMV and the decode + GEMM kernels both
forced (the per-expert row count decides between them in production).

Tolerance: both sides round at the same points (g and u to x.dtype, silu(g) * u to x.dtype, one
final rounding) and differ only in the order of fp32 sums. A different order can move a g or u
sum across a rounding boundary of x.dtype: one ulp (relative eps = 2^-7 bf16, 2^-10 fp16) of g
or u, which moves silu(g) * u by at most ~2 ulps relative (|d silu / dg| <= 1.1, and silu(g)
~ g / 2 near 0), and a's own rounding by one more. Each product a_i * w_i of the down projection
then moves by <= 3 eps |a_i w_i|, so a token's output moves by <= 3 eps * mag, where mag is
sum_j |w_j| sum_i |a_i| |w2_i| (computed below from the reference's own a), plus one ulp of the
final rounding: |out - ref| <= 3 eps mag + eps |ref| (+ a tiny absolute term for fp32 noise).
"""

from __future__ import annotations

import pytest
import torch

from moe_experts import experts

from fp8_backend import _C, kernels
from fp8_backend import numerics as nx

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(params=kernels.supported_cpu_isas())
def isa(request):
    before = kernels.cpu_isa()
    kernels.set_cpu_isa(request.param)
    yield request.param
    kernels.set_cpu_isa(before)


@pytest.fixture(params=["planned", "gemv", "decode_gemm"])
def plan(request):
    """Force the fp32 kernels' choice (w8a16_plan's small_m_max): all GEMV or all decode + GEMM."""
    before = _C.small_m_max()
    _C.set_small_m_max({"planned": -1, "gemv": 1 << 30, "decode_gemm": 0}[request.param])
    yield request.param
    _C.set_small_m_max(before)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def routing(t, k, e, seed=1, ids_dtype=torch.int64):
    """Random routing with replacement: a token may name an expert twice; some experts idle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (t, k), generator=g).to(ids_dtype)
    return torch.rand(t, k, generator=g), ids


def magnitude(x, q13, s13, q2, s2, wts, ids, block_size):
    """mag[t, n] = sum_j |w_tj| sum_i |a_i| |w2[n, i]| (the module docstring's bound), with a the
    reference's rounded silu(g) * u."""
    t, h = x.shape
    i = q13.shape[1] // 2
    half = s13.shape[1] // 2
    mag = torch.zeros(t, h, dtype=torch.float64)
    for ex in torch.unique(ids).tolist():
        tok, slot = (ids == ex).nonzero(as_tuple=True)
        g = nx.w8a16_linear(x[tok], q13[ex, :i], s13[ex, :half], None, block_size)
        u = nx.w8a16_linear(x[tok], q13[ex, i:], s13[ex, half:], None, block_size)
        a = (torch.nn.functional.silu(g.float()) * u.float()).to(x.dtype).double().abs()
        d2 = nx.dequantize(q2[ex], s2[ex], block_size).double().abs()
        mag.index_add_(0, tok, (a @ d2.T) * wts[tok, slot].double().abs().reshape(-1, 1))
    return mag


def check(out, x, q13, s13, q2, s2, wts, ids, block_size):
    ref = nx.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids, block_size)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.double(), ref.double()
    assert torch.equal(torch.isnan(o), torch.isnan(r)), "NaN positions differ"
    fin = torch.isfinite(r)
    assert torch.equal(o[~fin & ~torch.isnan(r)], r[~fin & ~torch.isnan(r)]), "infinities differ"
    eps = EPS[x.dtype]
    tol = 3 * eps * magnitude(x, q13, s13, q2, s2, wts, ids, block_size) + eps * r.abs() + 1e-30
    err = (o - r).abs()
    bad = fin & ~(err <= tol)
    assert not bool(bad.any()), f"{int(bad.sum())} elements off; worst err {float(err[fin].max())}"
    return ref


CASES = [  # (E, I, H, T, k)
    (4, 1, 5, 3, 1),       # I = 1
    (6, 24, 40, 7, 2),     # partial 16-blocks in gate, up and down
    (16, 37, 70, 1, 8),    # decode batch 1, top-8, most experts idle
    (8, 130, 200, 64, 2),  # I, H not multiples of 128 or 64
    (5, 64, 96, 300, 8),   # many rows per expert
    (3, 20, 33, 0, 2),     # no tokens
    (8, 128, 256, 2, 8),   # 128x128 blocks split nothing: gate and up in one pass
]


@pytest.mark.parametrize("block_size", [None, (128, 128), (16, 16)], ids=["channel", "b128", "b16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"E{c[0]}I{c[1]}H{c[2]}T{c[3]}k{c[4]}" for c in CASES])
def test_matches_reference(isa, plan, case, dtype, block_size):
    e, i, h, t, k = case
    q13, s13, q2, s2 = experts(e, i, h, block_size)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(3)).to(dtype)
    wts, ids = routing(t, k, e)
    out = kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids, block_size)
    check(out, x, q13, s13, q2, s2, wts, ids, block_size)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("block_size", [None, (128, 128)], ids=["channel", "b128"])
def test_threads(isa, threads, nthreads, block_size):
    threads(nthreads)
    e, i, h, t, k = 8, 96, 160, 40, 4
    q13, s13, q2, s2 = experts(e, i, h, block_size)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    wts, ids = routing(t, k, e, seed=6)
    check(kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids, block_size), x, q13, s13, q2, s2, wts, ids, block_size)


def test_ids_int32_and_int64_agree(isa):
    q13, s13, q2, s2 = experts(6, 24, 40, None)
    x = torch.randn(9, 40).to(torch.bfloat16)
    wts, ids = routing(9, 3, 6)
    a = kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids.to(torch.int32))
    b = kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids.to(torch.int64))
    assert torch.equal(a, b)
    check(a, x, q13, s13, q2, s2, wts, ids, None)


def test_idle_experts_and_token_routed_twice(isa):
    q13, s13, q2, s2 = experts(5, 24, 40, None)
    x = torch.randn(4, 40).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [1, 1], [4, 0], [4, 4]])  # experts 2 and 3 idle; 1 and 4 twice
    wts = torch.rand(4, 2)
    check(kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids), x, q13, s13, q2, s2, wts, ids, None)
    # Twice with half the weight is exactly once with the whole weight (d * 0.5 is exact).
    once = kernels.fused_moe_w8a16(x[:1], q13, s13, q2, s2, torch.tensor([[1.0]]), torch.tensor([[1]]))
    twice = kernels.fused_moe_w8a16(x[:1], q13, s13, q2, s2, torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 1]]))
    assert torch.equal(once, twice)


def edge_experts(e, i, h, seed=0):
    """FP8 bytes over the whole code space except NaN: zeros, subnormals (e = 0), +-448."""
    g = torch.Generator().manual_seed(seed)
    def fp8(*shape):
        b = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        b[(b & 0x7F) == 0x7F] = 0x7E  # NaN encodings -> +-448
        flat = b.view(-1)
        flat[:8] = torch.tensor([0x00, 0x80, 0x01, 0x81, 0x07, 0x87, 0x7E, 0xFE], dtype=torch.uint8)
        return b.view(torch.float8_e4m3fn)
    q13, q2 = fp8(e, 2 * i, h), fp8(e, h, i)
    # Scales that keep sums of +-448-sized products well inside every format's range.
    s13 = torch.full((e, 2 * i), 1.0 / (448 * h))
    s2 = torch.full((e, h), 1.0 / (448 * max(i, 1)))
    return q13, s13, q2, s2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_edge_values(isa, plan, dtype):
    e, i, h, t, k = 4, 40, 72, 6, 2
    q13, s13, q2, s2 = edge_experts(e, i, h)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(8))
    x[0] = 0.0
    x[1] *= 100.0 if dtype == torch.float16 else 1e4  # large, still finite through silu(g) * u
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    x[4, 0] = -float("inf")
    x = x.to(dtype)
    wts, ids = routing(t, k, e, seed=9)
    ids[2] = ids[5]  # token 5 shares token 2's experts: NaN must not leak into its row
    out = kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids)
    ref = check(out, x, q13, s13, q2, s2, wts, ids, None)
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 1, 5]]).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_errors_name_the_argument():
    q13, s13, q2, s2 = experts(2, 8, 16, None)
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    w, ids = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64)
    op = kernels.fused_moe_w8a16
    with pytest.raises(RuntimeError, match=r"w13_scale \(per-channel scales\) must have shape \[2, 16\]; found \[2, 8\]"):
        op(x, q13, s13[:, :8], q2, s2, w, ids)
    with pytest.raises(RuntimeError, match=r"w2_scale \(block scales\) must have shape \[2, 1, 1\]"):
        op(x, q13, torch.ones(2, 2, 1), q2, s2, w, ids, [128, 128])
    with pytest.raises(RuntimeError, match=r"w2 must be \[E, H, I\] = \[2, 16, 8\]"):
        op(x, q13, s13, q2[:, :8], s2, w, ids)
    with pytest.raises(RuntimeError, match=r"topk_ids must lie in \[0, E=2\); found 2 at \[0, 0\]"):
        op(x, q13, s13, q2, s2, w, ids + 2)
    with pytest.raises(RuntimeError, match=r"topk_ids must lie in \[0, E=2\); found -1"):
        op(x, q13, s13, q2, s2, w, ids - 1)
    with pytest.raises(RuntimeError, match=r"topk_ids must be int32 or int64; found Float"):
        op(x, q13, s13, q2, s2, w, ids.float())
    with pytest.raises(RuntimeError, match=r"topk_weights must have the shape of topk_ids \[1, 1\]"):
        op(x, q13, s13, q2, s2, torch.ones(1, 2), ids)
    with pytest.raises(RuntimeError, match=r"x must be bfloat16 or float16"):
        op(x.float(), q13, s13, q2, s2, w, ids)
    with pytest.raises(RuntimeError, match=r"w13 must be float8_e4m3fn"):
        op(x, q13.float(), s13, q2, s2, w, ids)
    with pytest.raises(RuntimeError, match=r"w13 must be \[E, 2I, H\] with H=16"):
        op(x, q13[:, :, :8], s13, q2, s2, w, ids)


def test_fake_shape():
    q13, s13, q2, s2 = experts(2, 8, 16, None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) for a in (torch.zeros(3, 16, dtype=torch.bfloat16), q13, s13, q2, s2,
                                             torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64))]
        out = torch.ops.fp8_backend.fused_moe_w8a16(*args)
    assert out.shape == (3, 16) and out.dtype == torch.bfloat16


def test_threads_by_expert_is_bit_identical(isa, threads):
    """Many rows per expert with 2 threads: whole experts per thread, then the reduction in the
    serial path's order, so the output equals the 1-thread one bit for bit."""
    e, i, h, t, k = 6, 48, 96, 120, 4
    q13, s13, q2, s2 = experts(e, i, h, None)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    wts, ids = routing(t, k, e, seed=12)
    threads(1)
    one = kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids)
    threads(2)
    two = kernels.fused_moe_w8a16(x, q13, s13, q2, s2, wts, ids)
    assert torch.equal(one, two)
    check(two, x, q13, s13, q2, s2, wts, ids, None)
