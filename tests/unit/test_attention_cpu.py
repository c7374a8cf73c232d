"""The C++ FP8 KV-cache kernels (cache write, paged attention) against numerics.py, on every
attention code path this CPU can run (amx, and the forced avx512, avx2 and portable paths).

Tolerances: the cache write is bit-exact (same RNE + saturation as numerics). Attention sums in
fp32 in a different order (tiled online softmax, vectorized exp with rel. error < 2e-7), so fp32
outputs agree to ~1e-6 of the output magnitude (bound used: 2e-5 relative + 2e-6 absolute);
bf16/fp16 outputs are both rounded from fp32 values that close, so they differ by at most one
unit in the last place (rtol 2^-7 for bf16, 2^-10 for fp16). The avx2 path (general driver and
decode kernel) computes the same fp32 products and sums (8-lane FMAs, horizontal-add trees, the
same exp polynomial), so the same bounds. The amx path has the same bounds:
its tile products multiply exact bf16 splits of q (1/2/3 parts for bf16/fp16/fp32 queries) and
of the fp32 probabilities by K/V values that are exact in bf16, so every product is the fp32
product and only the fp32 summation order differs (denormals below 2^-126 aside). With fp32
queries the probabilities take 3 bf16 parts (exact); with bf16 / fp16 queries 2 parts, which
leave each probability p off by at most 2^-17 p, so the fp32 output (sum_j p_j v_j / l) moves by
at most 2^-17 max|v| (v dequantized, times v_scale) before its rounding to bf16 / fp16: that
bound is added to atol for 16-bit outputs (check_attention's vmax; it matters only where |v|
is large and the output cancels to near zero, as in the FP8 range-edge test).
"""

import pytest
import torch

from fp8_backend import kernels
from fp8_backend import numerics as N
from fp8_backend.kernels import attention as A

KV = {"fp8": N.E4M3, "fp8_e4m3": N.E4M3, "fp8_e5m2": N.E5M2}
TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2**-7, 1e-5), torch.float16: (2**-10, 1e-5)}


@pytest.fixture(params=["amx", "avx512", "avx2", "portable"])  # one CPU path per attention kernel
def isa(request):
    if request.param not in kernels.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    with kernels.using_cpu_isa(request.param):
        yield request.param


def make_batch(lens, qlens, H, D, bs, gen, nb_extra=3):
    """Block table (shuffled blocks) and slots of sequences of the given lengths."""
    nblks = [-(-L // bs) for L in lens]
    nb = sum(nblks) + nb_extra
    perm = torch.randperm(nb, generator=gen).int()
    bt = torch.full((len(lens), max(nblks) + 1), nb - 1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblks):
        bt[i, :n] = perm[used : used + n]
        used += n
    slots = torch.cat([bt[i, torch.arange(L) // bs].long() * bs + torch.arange(L) % bs for i, L in enumerate(lens)])
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    return nb, bt, slots, qsl, torch.tensor(lens, dtype=torch.int32)


def fill_caches(kv, k, v, nb, H, bs, D, slots, ks, vs):
    """Kernel-written caches (uint8 / 16-bit) and numerics-written reference caches."""
    ref_dtype = KV.get(kv, k.dtype)
    cache_dtype = torch.uint8 if kv in KV else k.dtype
    kc = torch.zeros(nb, H, bs, D, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    A.kv_cache_write(k, v, kc, vc, slots, kv, ks, vs)
    kr = torch.zeros(nb, H, bs, D, dtype=ref_dtype)
    vr = torch.zeros_like(kr)
    N.paged_kv_write(k, kr, slots, ks if kv in KV else None)
    N.paged_kv_write(v, vr, slots, vs if kv in KV else None)
    return kc, vc, kr, vr


def check_attention(o, ref, D=128, vmax=0.0):
    """fp32 bounds are for head sizes up to 128; the fp32 rounding of a longer q.k grows with D.
    vmax: max |v| * v_scale of the cache, for the amx path's 2-part probabilities (module doc)."""
    rtol, atol = TOL[o.dtype]
    if o.dtype != torch.float32:
        atol = atol + 2**-17 * vmax
    scale = max(1.0, ref.float().abs().max().item()) if o.dtype == torch.float32 else 1.0
    if o.dtype == torch.float32 and D > 128:
        rtol, atol = rtol * D / 128, atol * D / 128
    torch.testing.assert_close(o.float(), ref.float(), rtol=rtol, atol=atol * scale, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# cache write
# ---------------------------------------------------------------------------------------------


def edge_values(dtype):
    m = N.fp8_max(dtype)
    tiny = 2.0**-9 if dtype == N.E4M3 else 2.0**-16  # smallest subnormal
    vals = [0.0, -0.0, tiny, tiny / 2, tiny * 1.5, -tiny * 0.49, 1.0625, 1.1875, -1.0625, m, -m, m * 1.03,
            m * 1.2, -m * 5, 1e30, float("inf"), float("-inf"), float("nan"), 2.5, 3.5, 0.3]
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0**-20, 1e-30, 3e30])
def test_cache_write_bit_exact_edges(kv, scale):
    """Edge values (subnormals, RNE ties, +-max, beyond max, Inf, NaN) and scales near the fp32
    limits: the bytes equal numerics' saturating round-half-even (not vLLM's round toward zero)."""
    vals = edge_values(KV[kv])
    D = 32
    x = vals.repeat(D * 2 // len(vals) + 1)[: 2 * D].reshape(1, 2, D) * scale  # fp32 input
    kc = torch.zeros(2, 2, 4, D, dtype=torch.uint8)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([5])
    A.kv_cache_write(x, -x, kc, vc, slots, kv, torch.tensor(scale), torch.tensor([scale, scale * 2]))
    ref_k = N.quantize_kv(x, scale, KV[kv]).view(torch.uint8)
    ref_v = N.quantize_kv(-x, torch.tensor([scale, scale * 2]), KV[kv]).view(torch.uint8)
    got_k, got_v = kc[1, :, 1], vc[1, :, 1]
    for got, ref in ((got_k, ref_k[0]), (got_v, ref_v[0])):
        fgot, fref = got.view(KV[kv]).float(), ref.view(KV[kv]).float()
        assert torch.equal(torch.isnan(fgot), torch.isnan(fref))
        ok = ~torch.isnan(fref)
        assert torch.equal(got[ok], ref[ok]), (got[ok], ref[ok])
        assert not torch.isinf(fgot).any(), "saturating: never Inf"
    assert kc[0].eq(0).all() and kc[1, :, [0, 2, 3]].eq(0).all(), "only slot 5 written"
    if kv == "fp8_e4m3" and scale == 1.0:  # the tie 1.0625 rounds to even 1.0, 1.1875 up to 1.25
        row = kc[1, 0, 1].view(N.E4M3).float()
        assert row[6].item() == 1.0 and row[7].item() == 1.25 and row[12].item() == 448.0


@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2", "auto"])
def test_cache_write_random_slots(kv):
    """Random tokens into shuffled slots, per-head scales, slot -1 skipped, 16-bit cache copies."""
    gen = torch.Generator().manual_seed(1)
    T, H, D, bs, nb = 37, 3, 80, 16, 5
    k = (torch.randn(T, H, D, generator=gen) * 4).bfloat16()
    v = torch.randn(T, H, D, generator=gen).bfloat16()
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[[3, 20]] = -1
    ks, vs = torch.tensor([0.01, 0.02, 0.05]), torch.tensor([0.004])
    kc, vc, kr, vr = fill_caches(kv, k, v, nb, H, bs, D, slots, ks, vs)
    assert torch.equal(kc.view(-1), kr.view(kc.dtype).view(-1))
    assert torch.equal(vc.view(-1), vr.view(vc.dtype).view(-1))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scales_refused(bad):
    kc = torch.zeros(1, 2, 4, 16, dtype=torch.uint8)
    x = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="v_scale must be finite and > 0"):
        A.kv_cache_write(x, x, kc, kc.clone(), torch.tensor([0]), "fp8", 1.0, torch.tensor([1.0, bad]))
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="k_scale must be finite and > 0"):
        A.paged_attention(q, kc, kc, torch.tensor([0, 1]), torch.tensor([1]), torch.zeros(1, 1, dtype=torch.int32),
                          0.25, "fp8", bad, 1.0)


def test_bad_inputs_named():
    kc = torch.zeros(2, 2, 4, 16, dtype=torch.uint8)
    q = torch.randn(1, 2, 16)
    bt = torch.tensor([[0, 7]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] = 7 is outside the cache"):
        A.paged_attention(q, kc, kc, torch.tensor([0, 1]), torch.tensor([6]), bt, 0.25)
    with pytest.raises(RuntimeError, match="head_size=16"):
        A.paged_attention(torch.randn(1, 2, 32), kc, kc, torch.tensor([0, 1]), torch.tensor([1]), bt, 0.25)
    with pytest.raises(RuntimeError, match="kv_cache_dtype must be"):
        A.kv_cache_write(q, q, kc, kc.clone(), torch.tensor([0]), "int8")
    with pytest.raises(RuntimeError, match=r"slot_mapping\[0\] = 8 is outside"):
        A.kv_cache_write(q, q, kc, kc.clone(), torch.tensor([8]), "fp8")
    with pytest.raises(RuntimeError, match="fp8_e5m2' needs a uint8 or float8_e5m2 cache"):
        A.kv_cache_write(q, q, kc.view(N.E4M3), kc.view(N.E4M3).clone(), torch.tensor([0]), "fp8_e5m2")


# ---------------------------------------------------------------------------------------------
# paged attention
# ---------------------------------------------------------------------------------------------

# (seq lens, query lens): decode of one token at block boundaries, prefill with no cached prefix
# (query = whole sequence), chunked prefill over a cached prefix, a 1-token sequence.
BATCH = ([1, 16, 17, 33, 64, 5, 40], [1, 1, 1, 7, 64, 5, 1])


@pytest.mark.parametrize("D", [128, 64, 80, 72])
@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
def test_attention_head_sizes(isa, D, kv):
    run_case(isa, D, kv, torch.bfloat16, hq=8, hkv=2, bs=16, window=-1, seed=D)


@pytest.mark.parametrize("qdtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kv", ["fp8_e4m3", "auto"])
def test_attention_query_dtypes(isa, qdtype, kv):
    run_case(isa, 128, kv, qdtype, hq=4, hkv=4, bs=32, window=-1, seed=3)


@pytest.mark.parametrize("hq,hkv", [(1, 1), (8, 1), (12, 3), (32, 8)])
@pytest.mark.parametrize("window", [-1, 1, 9, 40])
def test_attention_gqa_window(isa, hq, hkv, window):
    run_case(isa, 64, "fp8", torch.bfloat16, hq=hq, hkv=hkv, bs=16, window=window, seed=hq * 100 + window)


def run_case(isa, D, kv, qdtype, hq, hkv, bs, window, seed, batch=BATCH):
    gen = torch.Generator().manual_seed(seed)
    lens, qlens = batch
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, hkv, D, bs, gen)
    T = sum(lens)
    cdt = qdtype if kv == "auto" else torch.bfloat16
    k = (torch.randn(T, hkv, D, generator=gen) * 2).to(cdt)
    v = torch.randn(T, hkv, D, generator=gen).to(cdt)
    ks = torch.rand(hkv, generator=gen) * 0.02 + 0.005
    vs = torch.tensor(0.004)
    kc, vc, kr, vr = fill_caches(kv, k, v, nb, hkv, bs, D, slots, ks, vs)
    q = torch.randn(sum(qlens), hq, D, generator=gen).to(qdtype)
    o = A.paged_attention(q, kc, vc, qsl, sl, bt, D**-0.5, kv, ks, vs, window)
    ks_ref, vs_ref = (ks, vs) if kv != "auto" else (1.0, 1.0)
    ref = N.paged_attention(q, kr, vr, qsl, sl, bt, D**-0.5, ks_ref, vs_ref, window)
    check_attention(o, ref, D)


def test_attention_scale_limits_and_extremes(isa):
    """Large scores (scales near the fp8/fp32 limits: softmax nearly one-hot) and saturated cache
    values: the online softmax's running max keeps exp() in range like the reference."""
    gen = torch.Generator().manual_seed(7)
    lens, qlens = [50, 3], [1, 3]
    D, H, bs = 64, 2, 16
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, H, D, bs, gen)
    k = torch.randn(53, H, D, generator=gen) * 1e3  # saturates at e4m3's 448 with scale 1
    v = torch.randn(53, H, D, generator=gen) * 1e3
    for ks in (1.0, 1e-3, 40.0):
        kc, vc, kr, vr = fill_caches("fp8", k, v, nb, H, bs, D, slots, ks, 1.0)
        q = torch.randn(4, 4, D, generator=gen)
        o = A.paged_attention(q, kc, vc, qsl, sl, bt, D**-0.5, "fp8", ks, 1.0)
        ref = N.paged_attention(q, kr, vr, qsl, sl, bt, D**-0.5, ks, 1.0)
        check_attention(o, ref)
        assert torch.isfinite(o).all()


def test_attention_nan_policy(isa):
    """A NaN in an attended K or V makes that row NaN (as dequantize-then-attend would); a NaN in
    a position the row does not attend (the future, or outside the window) is never read."""
    gen = torch.Generator().manual_seed(11)
    D, H, bs = 64, 1, 16
    lens, qlens = [20], [20]
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, H, D, bs, gen)
    k = torch.randn(20, H, D, generator=gen)
    v = torch.randn(20, H, D, generator=gen)
    v[10, 0, 3] = float("nan")  # token 10
    kc, vc, kr, vr = fill_caches("fp8", k, v, nb, H, bs, D, slots, 0.01, 0.01)
    q = torch.randn(20, 2, D, generator=gen)
    for window in (-1, 4):
        o = A.paged_attention(q, kc, vc, qsl, sl, bt, 0.125, "fp8", 0.01, 0.01, window)
        ref = N.paged_attention(q, kr, vr, qsl, sl, bt, 0.125, 0.01, 0.01, window)
        check_attention(o, ref)
        nan_rows = torch.isnan(o).any(dim=(1, 2))
        attends = torch.arange(20) >= 10
        if window > 0:
            attends &= torch.arange(20) - 10 < window
        assert torch.equal(nan_rows, attends)


def test_attention_strided_vllm_layout(isa):
    """vLLM's CPU cache [num_blocks, kv_heads, 2 * block_size, head_size] split into K and V halves
    (non-contiguous views) reads the same as separate contiguous caches."""
    gen = torch.Generator().manual_seed(5)
    D, H, bs = 128, 2, 32
    lens, qlens = [70, 9], [1, 4]
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, H, D, bs, gen)
    kv_cache = torch.zeros(nb, H, 2 * bs, D, dtype=torch.uint8)
    kc, vc = kv_cache.chunk(2, dim=2)
    k = torch.randn(79, H, D, generator=gen).bfloat16()
    v = torch.randn(79, H, D, generator=gen).bfloat16()
    A.kv_cache_write(k, v, kc, vc, slots, "fp8", 0.02, 0.01)
    kc2, vc2, kr, vr = fill_caches("fp8", k, v, nb, H, bs, D, slots, 0.02, 0.01)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    q = torch.randn(5, 8, D, generator=gen).bfloat16()
    o = A.paged_attention(q, kc, vc, qsl, sl, bt, D**-0.5, "fp8", 0.02, 0.01)
    check_attention(o, N.paged_attention(q, kr, vr, qsl, sl, bt, D**-0.5, 0.02, 0.01))


@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2", "auto"])
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
def test_attention_amx_shapes(isa, D, kv, qdtype):
    """Head sizes the amx path takes besides 64/128 (multiples of 32 up to 256), a bf16 cache
    ("auto" with bf16 K/V), GQA 8 and 10 (query rows in groups of 16 / 8 / 5 for 1 / 2 / 3 bf16
    parts per query, 2 or 3 parts per probability): every path against the reference."""
    for hq, hkv in ((16, 2), (10, 1)):
        if kv == "auto":
            run_case_cache(isa, D, torch.bfloat16, qdtype, hq, hkv, bs=32, seed=D + hq)
        else:
            run_case(isa, D, kv, qdtype, hq=hq, hkv=hkv, bs=32, window=-1, seed=D + hq)


def run_case_cache(isa, D, cdt, qdtype, hq, hkv, bs, seed):
    """run_case with a 16-bit cache of dtype cdt and queries of another dtype."""
    gen = torch.Generator().manual_seed(seed)
    lens, qlens = BATCH
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, hkv, D, bs, gen)
    T = sum(lens)
    k = (torch.randn(T, hkv, D, generator=gen) * 2).to(cdt)
    v = torch.randn(T, hkv, D, generator=gen).to(cdt)
    kc, vc, kr, vr = fill_caches("auto", k, v, nb, hkv, bs, D, slots, 1.0, 1.0)
    q = torch.randn(sum(qlens), hq, D, generator=gen).to(qdtype)
    o = A.paged_attention(q, kc, vc, qsl, sl, bt, D**-0.5, "auto", 1.0, 1.0, 9)
    check_attention(o, N.paged_attention(q, kr, vr, qsl, sl, bt, D**-0.5, 1.0, 1.0, 9), D)


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_attention_fp8_range_edges(isa, kv):
    """Cache values over the whole FP8 range: subnormals, +-max (saturated) and zeros, in K and
    V, with a decode row over 300 keys (several cache blocks and tiles) and a prefill chunk."""
    gen = torch.Generator().manual_seed(13)
    D, H, bs = 128, 2, 64
    fmt = KV[kv]
    tiny, big = torch.finfo(fmt).smallest_normal / 4, torch.finfo(fmt).max
    lens, qlens = [300, 45], [1, 9]
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, H, D, bs, gen)
    k = torch.randn(345, H, D, generator=gen)
    v = torch.randn(345, H, D, generator=gen)
    for x in (k, v):
        r = torch.rand(x.shape, generator=gen)
        x[r < 0.1] = tiny  # subnormal after quantizing with scale 1
        x[(r >= 0.1) & (r < 0.15)] = big * 2  # saturates to +max
        x[(r >= 0.15) & (r < 0.2)] = -big
        x[(r >= 0.2) & (r < 0.25)] = 0.0
    kc, vc, kr, vr = fill_caches(kv, k, v, nb, H, bs, D, slots, 1.0, 1.0)
    # A small softmax scale keeps scores of +-max keys finite and the softmax not one-hot.
    q = torch.randn(10, 8, D, generator=gen).bfloat16()
    sm = 1.0 / (big * D**0.5)
    o = A.paged_attention(q, kc, vc, qsl, sl, bt, sm, kv, 1.0, 1.0)
    check_attention(o, N.paged_attention(q, kr, vr, qsl, sl, bt, sm, 1.0, 1.0), vmax=vr.float().abs().max().item())


def test_attention_auto_picks_fastest_path():
    """auto selects the fastest kernel this CPU supports: amx where AMX-BF16 is usable."""
    fastest = {"avx512_vbmi": "avx512"}.get(kernels.supported_cpu_isas()[0], kernels.supported_cpu_isas()[0])
    with kernels.using_cpu_isa("auto"):
        assert A.attention_path(128, torch.uint8) == fastest


def test_reference_matches_dequantize_then_sdpa():
    """The spec itself: folding k/v scales equals dequantize-then-attend (torch SDPA, causal)."""
    gen = torch.Generator().manual_seed(2)
    D, H, bs, L = 32, 2, 8, 21
    nb, bt, slots, qsl, sl = make_batch([L], [L], H, D, bs, gen)
    k, v = torch.randn(L, H, D, generator=gen), torch.randn(L, H, D, generator=gen)
    ks, vs = torch.tensor([0.01, 0.03]), torch.tensor([0.02, 0.005])
    kr = torch.zeros(nb, H, bs, D, dtype=N.E4M3)
    vr = torch.zeros_like(kr)
    N.paged_kv_write(k, kr, slots, ks)
    N.paged_kv_write(v, vr, slots, vs)
    q = torch.randn(L, 4, D, generator=gen)
    o = N.paged_attention(q, kr, vr, qsl, sl, bt, 0.2, ks, vs)
    kd = (N.quantize_kv(k, ks).float() * ks.reshape(H, 1)).repeat_interleave(2, 1)
    vd = (N.quantize_kv(v, vs).float() * vs.reshape(H, 1)).repeat_interleave(2, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kd.transpose(0, 1), vd.transpose(0, 1), is_causal=True, scale=0.2
    ).transpose(0, 1)
    torch.testing.assert_close(o, sdpa, rtol=1e-5, atol=1e-6)


def test_attention_path_names_the_kernel_that_runs():
    """attention_path (logged by the vLLM backend) falls back from amx where the amx kernel does
    not take the shape or cache dtype, from avx512 to avx2 for head sizes that are multiples of 8
    but not 16, and to portable for head sizes not a multiple of 8."""
    for isa in kernels.supported_cpu_isas():
        with kernels.using_cpu_isa(isa):
            vec = "portable" if isa == "portable" else "avx2"
            wide = "avx512" if isa in ("amx", "avx512_vbmi", "avx512") else vec  # AVX-512 kernels: D % 16 == 0
            best = {"avx512_vbmi": "avx512"}.get(isa, isa)
            assert A.attention_path(100, torch.uint8) == "portable"
            assert A.attention_path(72, torch.uint8) == vec
            assert A.attention_path(128, torch.uint8) == best
            assert A.attention_path(128, torch.float8_e5m2) == best
            assert A.attention_path(128, torch.bfloat16) == best
            assert A.attention_path(80, torch.uint8) == wide
            assert A.attention_path(128, torch.float16) == wide
            assert A.attention_path(128, torch.float32) == wide
            assert A.attention_path(288, torch.uint8) == wide  # amx: head sizes up to 256
    with pytest.raises(RuntimeError, match="cache_dtype must be"):
        A.attention_path(128, torch.int32)


def test_one_cpu_path_for_linear_and_attention():
    """The registry is shared: selecting a path for the linear kernels selects it for attention."""
    before = kernels.cpu_isa()
    with pytest.raises(KeyError):  # using_cpu_isa restores the path however its block ends
        with kernels.using_cpu_isa("portable"):
            assert kernels.cpu_isa() == "portable" and A.attention_path(128, torch.uint8) == "portable"
            raise KeyError("leave the block")
    assert kernels.cpu_isa() == before
    with pytest.raises(RuntimeError, match="unknown CPU kernel path 'avx3'"):
        kernels.set_cpu_isa("avx3")
    assert kernels.cpu_isa() == before


@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2", "auto"])
def test_attention_large_blocks(isa, bs, kv):
    """vLLM's CPU block size 128 (and 64): the amx path's tiles of up to 64 keys (four score
    chains, both 32-key probability halves), several tiles per block and tiles that end a block
    (the next tile's K decoded ahead, rows prefetched two tiles ahead), for decode rows and for
    chunked-prefill rows, with and without a window, GQA 4 as in the benchmark."""
    batch = ([1, 33, 64, 65, 130, 300], [1, 1, 1, 5, 1, 70])
    for window in (-1, 100):
        run_case(isa, 128, kv, torch.bfloat16, hq=8, hkv=2, bs=bs, window=window, seed=bs + window, batch=batch)


def test_attention_nan_policy_large_tiles(isa):
    """As test_attention_nan_policy with block size 128: the NaN's 64-key tile is partly hidden
    from the rows before it (the fp32 fallback for that tile), fully seen by the later ones."""
    gen = torch.Generator().manual_seed(13)
    D, H, bs, L = 128, 1, 128, 150
    nb, bt, slots, qsl, sl = make_batch([L], [L], H, D, bs, gen)
    k = torch.randn(L, H, D, generator=gen)
    v = torch.randn(L, H, D, generator=gen)
    v[40, 0, 7] = float("nan")
    kc, vc, kr, vr = fill_caches("fp8", k, v, nb, H, bs, D, slots, 0.01, 0.01)
    q = torch.randn(L, 4, D, generator=gen).bfloat16()
    for window in (-1, 30):
        o = A.paged_attention(q, kc, vc, qsl, sl, bt, D**-0.5, "fp8", 0.01, 0.01, window)
        ref = N.paged_attention(q, kr, vr, qsl, sl, bt, D**-0.5, 0.01, 0.01, window)
        check_attention(o, ref)
        attends = torch.arange(L) >= 40
        if window > 0:
            attends &= torch.arange(L) - 40 < window
        assert torch.equal(torch.isnan(o).any(dim=(1, 2)), attends)


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_attention_long_prefill_one_thread(isa, qdtype):
    """Long causal prefills on one thread: tasks of up to 256 query rows (64 tokens x GQA 4), so
    the amx path runs many row groups (16 / 8 / 5 rows for 1 / 2 / 3 query parts) inside each
    decoded K/V tile, with groups entering and leaving the tile range (causal, window)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = ([300, 260], [300, 190])
        for window in (-1, 50):
            run_case(isa, 64, "fp8", qdtype, hq=8, hkv=2, bs=128, window=window, seed=7 + window, batch=batch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,bs", [(32, 8, 128), (8, 1, 32), (5, 1, 16), (2, 2, 64)])
def test_attention_decode_long_contexts(isa, kv, qdtype, hq, hkv, bs):
    """Decode rows (1 to 3 tokens per sequence) over contexts of hundreds of keys: the amx path's
    decode kernel (one row group per task: 1 / 2 / 3 query parts give 1 to 16 score columns),
    with keys whose scores grow along the context so that the running max moves many times
    (lazy rescaling), steps cut short by block ends and sequence ends, and a sliding window."""
    gen = torch.Generator().manual_seed(hq * 31 + bs)
    D = 128
    lens, qlens = [700, 333, 97, 1], [1, 2, 3, 1]
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, hkv, D, bs, gen)
    T = sum(lens)
    ramp = torch.cat([torch.linspace(0.2, 3.0, L) for L in lens])[:, None, None]
    k = (torch.randn(T, hkv, D, generator=gen) * ramp).bfloat16()
    v = torch.randn(T, hkv, D, generator=gen).bfloat16()
    ks, vs = torch.rand(hkv, generator=gen) * 0.01 + 0.005, torch.tensor(0.01)
    kc, vc, kr, vr = fill_caches(kv, k, v, nb, hkv, bs, D, slots, ks, vs)
    q = (torch.randn(sum(qlens), hq, D, generator=gen) * 4).to(qdtype)
    for window in (-1, 150):
        o = A.paged_attention(q, kc, vc, qsl, sl, bt, D**-0.5, kv, ks, vs, window)
        ref = N.paged_attention(q, kr, vr, qsl, sl, bt, D**-0.5, ks, vs, window)
        vmax = vr.float().abs().max().item() * 0.01
        if qdtype == torch.float32:
            # fp32 sums over up to 700 keys in another order: worst case ~700 * 2^-24 of max|v|
            torch.testing.assert_close(o, ref, rtol=1e-4, atol=5e-5 * vmax)
        else:
            check_attention(o, ref, D, vmax=vmax)


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qmul", [30.0, 1000.0])
def test_attention_wide_score_range(isa, qdtype, qmul):
    """Scores spread over hundreds (queries scaled up): most probabilities fall below fp32's
    normal range (exp(s - m) < 2^-126), which the kernels flush to zero (FTZ / DAZ while they
    run: denormal arithmetic took 1.7-1.9x longer); such a term is < 2^-126 of the softmax
    denominator, so the outputs still meet the reference's bounds. The caller's floating-point
    state (denormals kept) is restored afterwards."""
    gen = torch.Generator().manual_seed(int(qmul))
    D, hq, hkv, bs = 128, 8, 2, 32
    lens, qlens = [300, 77, 5], [1, 3, 5]
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, hkv, D, bs, gen)
    T = sum(lens)
    k = torch.randn(T, hkv, D, generator=gen).bfloat16()
    v = torch.randn(T, hkv, D, generator=gen).bfloat16()
    ks, vs = torch.tensor(0.01), torch.tensor(0.01)
    kc, vc, kr, vr = fill_caches("fp8", k, v, nb, hkv, bs, D, slots, ks, vs)
    q = (torch.randn(sum(qlens), hq, D, generator=gen) * qmul).to(qdtype)
    o = A.paged_attention(q, kc, vc, qsl, sl, bt, D**-0.5, "fp8", ks, vs)
    ref = N.paged_attention(q, kr, vr, qsl, sl, bt, D**-0.5, ks, vs)
    assert torch.isfinite(o).all()
    vmax = vr.float().abs().max().item() * 0.01
    if qdtype == torch.float32:
        # Scores of magnitude ~100 summed in fp32 in another order differ by up to D * 2^-24 of
        # sum_d |q_d k_d| (the usual bound on a D-term sum), and a softmax moves its output by at
        # most 2 * max |score error| * max |v|.
        kq = kr.float().reshape(-1, D) * ks.item()  # every cached key, dequantized
        sabs = (q.float().abs().reshape(-1, D) @ kq.abs().T).max().item() * D**-0.5
        torch.testing.assert_close(o, ref, rtol=2e-5, atol=2 * D * 2**-24 * sabs * vmax + 2e-6)
    else:
        check_attention(o, ref, D, vmax=vmax)
    tiny = torch.tensor([2.0**-140]) * torch.tensor([1.0])  # a float32 denormal, computed
    assert tiny.item() != 0.0, "the attention op left flush-to-zero on in the calling thread"


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
def test_attention_decode_nan_policy(isa, kv, qdtype):
    """Decode rows whose keys end or start inside a step (several tokens per sequence, sliding
    window) with an Inf / NaN in V at keys some rows do not see: only rows that see one are not
    finite, and p x Inf stays Inf (not NaN). bf16 queries take the amx decode kernel (6 rows, one
    group), fp32 queries the general one (3 parts x 6 rows > 16 columns)."""
    gen = torch.Generator().manual_seed(17)
    D, hkv, hq, bs = 64, 1, 2, 32
    lens, qlens = [90], [3]
    nb, bt, slots, qsl, sl = make_batch(lens, qlens, hkv, D, bs, gen)
    k = torch.randn(90, hkv, D, generator=gen)
    v = torch.randn(90, hkv, D, generator=gen)
    v[89, 0, 5] = float("nan")  # the last token: seen by the last query token only
    kc, vc, kr, vr = fill_caches(kv, k, v, nb, hkv, bs, D, slots, 0.01, 0.01)
    # token 40: an Inf code in e5m2 (the cache write saturates Inf, so written directly), NaN in e4m3
    blk, off = bt[0, 40 // bs], 40 % bs
    vc[blk, 0, off, 7] = 0x7C if kv == "fp8_e5m2" else 0x7F
    vr[blk, 0, off, 7] = float("inf") if kv == "fp8_e5m2" else float("nan")
    q = torch.randn(3, hq, D, generator=gen).to(qdtype)
    for window in (-1, 30, 49):
        o = A.paged_attention(q, kc, vc, qsl, sl, bt, 0.125, kv, 0.01, 0.01, window)
        ref = N.paged_attention(q, kr, vr, qsl, sl, bt, 0.125, 0.01, 0.01, window)
        check_attention(o, ref)
        pos = torch.arange(87, 90)
        sees = lambda t: (pos >= t) & ((pos - t < window) if window > 0 else True)  # noqa: E731
        expect = (sees(89) | sees(40))[:, None].expand(3, hq)
        bad = ~torch.isfinite(o).all(dim=2)
        assert torch.equal(bad, expect), (window, bad)
