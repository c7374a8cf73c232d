"""Triton kernels (fp8_backend/kernels/triton) run by the Triton interpreter on CPU tensors,
checked against numerics.py. Nothing here runs on a GPU; see test_gpu_compile.py for the
ahead-of-time compilation for sm_80/89/90."""

import math

import pytest
import torch

from fp8_backend import numerics as nm
from fp8_backend.kernels.triton import fp8_math, gemm_w8a8, quant, w8a16_marlin, w8a16_repack

E4M3 = nm.E4M3


def same_bits_or_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical FP8/fp32 tensors, except that any NaN matches any NaN."""
    af, bf = a.float(), b.float()
    nan = torch.isnan(af)
    return torch.equal(nan, torch.isnan(bf)) and torch.equal(af[~nan], bf[~nan])


def edge_values() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours (ties) and their fp32
    neighbours, subnormals, ±max, beyond max, ±Inf, NaN, -0."""
    g = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    g = g[torch.isfinite(g)].unique()
    mid = (g[1:] + g[:-1]) / 2
    up, down = torch.nextafter(mid, torch.tensor(1e9)), torch.nextafter(mid, torch.tensor(-1e9))
    special = torch.tensor([448.0, 449.0, 464.0, 465.0, 1e6, math.inf, math.nan, 1e-30, 2.0**-10,
                            3 * 2.0**-11, 2.0**-9, 2.0**-6, 2.0**-7 * 1.0625, 1e-45, -0.0])
    x = torch.cat([g, mid, up, down, special, torch.randn(3000) * 100, torch.randn(1000) * 1e-2])
    return torch.cat([x, -x])


def test_e4m3_encode_interpreted_bit_exact_on_edge_values():
    x = edge_values()
    q = torch.empty(x.numel(), dtype=torch.uint8)
    fp8_math._encode_kernel[(math.ceil(x.numel() / 1024),)](x, q, x.numel(), BLOCK=1024)
    ref = nm.round_to_fp8(x).view(torch.uint8)
    nan = torch.isnan(x)
    assert torch.equal(q[~nan], ref[~nan])
    assert bool(((q[nan] & 0x7F) == 0x7F).all())  # NaN stays NaN (sign bit is free)


def test_e4m3_decode_interpreted_all_256_codes():
    u = torch.arange(256, dtype=torch.uint8)
    y = torch.empty(256)
    fp8_math._decode_kernel[(1,)](u, y, 256, BLOCK=256)
    assert same_bits_or_nan(y, u.view(E4M3).float())


def activations(m: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Random rows plus edge rows: an outlier, all zero, tiny (subnormal after scaling), ±max."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[1 % m, k // 2] = 1e4
    x[2 % m] = 0
    x[3 % m] *= 1e-6
    x[4 % m, :2] = torch.tensor([448.0, -448.0])[: min(2, k)]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_ub", [None, 2.0])
def test_quantize_per_token_interpreted(dtype, scale_ub):
    x = activations(6, 333, dtype)
    q, s = quant.quantize_per_token(x, scale_ub)
    rq, rs = nm.quantize_per_token(x, scale_ub=scale_ub)
    assert q.dtype == E4M3 and s.shape == (6, 1)
    assert torch.equal(s, rs)  # same fp32 ops in the same order: bit-exact
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_quantize_per_token_interpreted_nan_inf_rows():
    x = activations(6, 40)
    x[0, 5] = math.nan
    x[5, 3] = math.inf  # amax Inf -> scale Inf -> finite / Inf = 0, Inf / Inf = NaN (as torch)
    q, s = quant.quantize_per_token(x)
    rq, rs = nm.quantize_per_token(x)
    assert same_bits_or_nan(s, rs) and bool(torch.isnan(s[0]))
    assert same_bits_or_nan(q, rq)


@pytest.mark.parametrize("k", [128, 300, 7])
def test_quantize_group_interpreted(k):
    x = activations(5, k, torch.bfloat16)
    q, s = quant.quantize_group(x, 128)
    rq, rs = nm.quantize_group(x, 128)
    assert s.shape == (5, math.ceil(k / 128))
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("shape", [(5, 333), (1, 1), (3, 4096)])
def test_quantize_per_tensor_dynamic_interpreted(shape):
    x = activations(*shape) if shape[0] > 4 else torch.randn(shape)
    q, s = quant.quantize_per_tensor(x, block=256)  # several partial-amax chunks
    rq, rs = nm.quantize_per_tensor(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_quantize_per_tensor_static_interpreted_saturates():
    x = activations(5, 200)
    scale = torch.tensor(0.01)  # most values beyond 448 * 0.01: saturation path
    q, s = quant.quantize_per_tensor(x, scale)
    rq, _ = nm.quantize_per_tensor(x, scale=scale)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert float(q.float().abs().max()) == 448.0
    with pytest.raises(ValueError, match="scale"):
        quant.quantize_per_tensor(x, torch.tensor(0.0))
    with pytest.raises(ValueError, match="1-element"):
        quant.quantize_per_tensor(x, torch.ones(2))


# ---------------------------------------------------------------------------------------------
# W8A8 GEMM (FP8 tl.dot; the interpreter multiplies the exact FP8 values in fp32)
# ---------------------------------------------------------------------------------------------


def weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, 0] = 1.0  # an outlier column stretches per-channel / block scales
    return w


@pytest.mark.parametrize("act", ["dynamic_token", "dynamic_tensor", "static"])
def test_w8a8_gemm_interpreted_tensor_channel(act):
    m, n, k = 19, 70, 200
    x, w, bias = activations(m, k), weight(n, k), torch.randn(n)
    wq, ws = nm.quantize_per_channel(w) if act == "dynamic_token" else nm.quantize_per_tensor(w)
    if act == "dynamic_token":
        xq, xs = quant.quantize_per_token(x)
    elif act == "dynamic_tensor":
        xq, xs = quant.quantize_per_tensor(x)
    else:
        xq, xs = quant.quantize_per_tensor(x, torch.tensor(0.05))
    y = gemm_w8a8.w8a8_gemm(xq, xs, wq, ws, bias, torch.float32)
    ref = nm.w8a8_linear(x, wq, ws, (0, 0) if act == "dynamic_tensor" else (1, 0),
                         torch.tensor(0.05) if act == "static" else None, bias)
    # Same FP8 inputs, fp32 sums in another order: relative error ~K * 2^-24 of sum |terms|.
    tol = 1e-5 * ((xq.float().abs() * xs.reshape(-1, 1)) @ (wq.float().abs() * ws.reshape(-1, 1)).T + 1)
    assert bool(((y - ref).abs() <= tol).all())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(21, 200, 300), (1, 128, 128), (70, 33, 17), (1030, 20, 130)])
def test_w8a8_gemm_interpreted_block_scales(out_dtype, m, n, k):
    x, w, bias = activations(m, k), weight(n, k), torch.randn(n)
    wq, ws = nm.quantize_block(w)  # partial last blocks when n or k is not a multiple of 128
    xq, xs = nm.quantize_group(x, 128)  # = quant.quantize_group bit for bit (tested above), faster here
    y = gemm_w8a8.w8a8_gemm(xq, xs, wq, ws, bias, out_dtype, block_size=(128, 128))
    xd = xq.float() * xs.repeat_interleave(128, 1)[:, :k]
    ref = xd @ nm.dequantize(wq, ws, (128, 128)).T + bias
    # fp32 summation order: 1e-5 of sum |terms|; then one rounding to out_dtype (half an ulp).
    mag = xd.abs() @ nm.dequantize(wq, ws, (128, 128)).abs().T
    ulp = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out_dtype]
    assert bool(((y.float() - ref).abs() <= 1e-5 * mag + ulp * ref.abs() + 1e-6).all())


def test_w8a8_gemm_rejects_bad_scales():
    xq, xs = quant.quantize_group(torch.randn(4, 256), 128)
    wq, ws = nm.quantize_block(torch.randn(64, 256))
    with pytest.raises(ValueError, match="block scales"):
        gemm_w8a8.w8a8_gemm(xq, xs, wq, ws[:, :1], block_size=(128, 128))
    with pytest.raises(ValueError, match="1 or N"):
        gemm_w8a8.w8a8_gemm(xq, xs[:, :1], wq, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Marlin-style W8A16: host repacking (plain torch) and the kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tensor", "channel", "block"])
def test_w8a16_repack_folds_scales_exactly(mode):
    n, k = 150, 300
    w = weight(n, k)
    wq, ws, bs = {"tensor": nm.quantize_per_tensor(w) + (None,), "channel": nm.quantize_per_channel(w) + (None,),
                  "block": nm.quantize_block(w) + ((128, 128),)}[mode]
    p = w8a16_repack.repack(wq, ws, bs)
    assert p.tiles.dtype == torch.uint8 and p.tiles.shape[2:] == (w8a16_repack.TILE_K, w8a16_repack.TILE_N)
    uq, us = w8a16_repack.unpack(p)
    assert torch.equal(uq.view(torch.uint8), wq.view(torch.uint8))
    assert torch.equal(uq.float() * us, nm.dequantize(wq, ws, bs))  # folding is exact (powers of 2)
    kp = p.tiles.shape[0] * w8a16_repack.TILE_K
    assert bool((p.tiles.permute(0, 2, 1, 3).reshape(kp, -1)[k:] == 0).all())  # zero padding


def test_w8a16_repack_rejects_bad_input():
    wq, ws = nm.quantize_block(torch.randn(100, 200))
    with pytest.raises(ValueError, match=r"expected block scale shape \(1, 2\)"):
        w8a16_repack.repack(wq, ws[:, :1], (128, 128))
    with pytest.raises(ValueError, match="not a multiple of the W8A16 tile K"):
        w8a16_repack.repack(wq, torch.ones(1, 7), (128, 32))
    with pytest.raises(ValueError, match="1 or N=100"):
        w8a16_repack.repack(wq, torch.ones(3))
    with pytest.raises(ValueError, match="scales > 0"):
        w8a16_repack.repack(wq, torch.zeros(1))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        w8a16_repack.repack(torch.zeros(4, 4), torch.ones(1))


@pytest.mark.parametrize("m,n,k,dtype,mode", [
    (1, 150, 300, torch.bfloat16, "channel"),
    (37, 64, 64, torch.float16, "tensor"),
    (70, 33, 200, torch.bfloat16, "block"),
    (3, 130, 129, torch.float16, "block"),
    (1030, 33, 64, torch.bfloat16, "channel"),  # thousands of rows: 17 M tiles, last one partial
])
def test_w8a16_marlin_interpreted(m, n, k, dtype, mode):
    w, bias = weight(n, k), torch.randn(n)
    wq, ws, bs = {"tensor": nm.quantize_per_tensor(w) + (None,), "channel": nm.quantize_per_channel(w) + (None,),
                  "block": nm.quantize_block(w) + ((128, 128),)}[mode]
    wq = wq.view(torch.uint8).clone()
    wq[0, :4] = torch.tensor([0x00, 0x01, 0x7E, 0x80])  # 0, smallest subnormal, +max, -0
    wq = wq.view(E4M3)
    x = activations(m, k, dtype) * 0.1
    y = w8a16_marlin.w8a16_linear(x, w8a16_repack.repack(wq, ws, bs), bias)
    ref = nm.w8a16_linear(x.float(), wq, ws, bias, bs)
    assert y.dtype == dtype and y.shape == (m, n)
    # exact products, fp32 sums in another order (1e-5 of sum |terms|), one rounding to dtype.
    mag = x.float().abs() @ nm.dequantize(wq, ws, bs).abs().T
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert bool(((y.float() - ref).abs() <= 1e-5 * mag + ulp * ref.abs() + 1e-6).all())
