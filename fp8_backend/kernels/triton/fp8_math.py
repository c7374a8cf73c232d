"""FP8 e4m3fn encode/decode as Triton device functions, with integer bit operations only.

Why bit operations: sm_80 has no FP8 conversion instructions, and the Triton interpreter's
fp32->fp8 cast rounds wrongly (half-up, lost carry, subnormals; see VLLM_CPU_NOTES.md). These
helpers are exact on every target and in the interpreter, and follow numerics.round_to_fp8:
saturate to ±448, round to nearest with ties to even, NaN stays NaN (0x7F | sign), ±Inf -> ±448.
"""

import triton
import triton.language as tl

E4M3_MAX = 448.0


@triton.jit
def e4m3_encode(x):
    """fp32 tensor -> e4m3fn bit patterns (uint8), saturating, round half to even."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(x), 448.0)  # saturate first (±Inf -> 448), as numerics does
    ab = a.to(tl.int32, bitcast=True)
    e = ab >> 23  # biased fp32 exponent (a >= 0)
    # |x| >= 2^-6 (e4m3 normal): keep 3 of 23 mantissa bits, round half to even; a mantissa
    # carry moves into the exponent by itself.
    r = ab + 0x7FFFF + ((ab >> 20) & 1)
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    # |x| < 2^-6 (e4m3 subnormal): the code is round_half_even(|x| / 2^-9) (0..8; 8 = 2^-6).
    m = (ab & 0x7FFFFF) | 0x800000
    s = tl.minimum(141 - e, 30)  # |x| = m * 2^(e-150) = (m >> s) * 2^-9
    half_m1 = (tl.full(s.shape, 1, tl.int32) << (s - 1)) - 1
    sub = (m + half_m1 + ((m >> s) & 1)) >> s
    code = tl.where(e >= 121, normal, sub)
    code = tl.where(x != x, 0x7F, code) | sign
    return code.to(tl.uint8)


@triton.jit
def e4m3_to_f16_scaled(u):
    """e4m3fn bits (uint8) -> fp16 holding value * 2^-8, exact for normals and subnormals.

    s.eeee.mmm -> fp16 s.0eeee.mmm0000000: the e4m3 exponent (bias 7) lands in fp16's field
    (bias 15), so every value comes out 2^-8 too small; callers fold 2^8 into their scale.
    NaN encodings are not mapped (weights are checked for NaN at load time).
    """
    v = u.to(tl.int32)
    h = ((v & 0x80) << 8) | ((v & 0x7F) << 7)
    return h.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def e4m3_to_f32(u):
    """e4m3fn bits (uint8) -> fp32 value; 0x7F/0xFF -> NaN (used for KV-cache reads)."""
    f = e4m3_to_f16_scaled(u).to(tl.float32) * 256.0
    return tl.where((u.to(tl.int32) & 0x7F) == 0x7F, float("nan"), f)


@triton.jit
def _encode_kernel(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    """Test hook: q = e4m3_encode(x) elementwise."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(q_ptr + offs, e4m3_encode(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


@triton.jit
def _decode_kernel(q_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Test hook: y = e4m3_to_f32(q) elementwise."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, e4m3_to_f32(tl.load(q_ptr + offs, mask=mask, other=0)), mask=mask)


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """fp32 -> output dtype, round to nearest even. For bf16 the rounding is done with bit
    operations first (the Triton interpreter truncates fp32 -> bf16; on a GPU the cast of an
    already-rounded value is exact, so both give the same bits). NaN/Inf pass through."""
    if dtype == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        b = tl.where(x != x, x.to(tl.int32, bitcast=True), b)
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def store_out(acc, y_ptr, bias_ptr, rm, rn, m_ok, n_ok, stride_ym, HAS_BIAS: tl.constexpr):
    """The GEMM epilogue: y[rm, rn] = round(acc + bias) in y's dtype, masked to the matrix."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], cast_out(acc, y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def tile_m(m: int) -> int:
    """Rows per program: the smallest MMA-friendly tile that holds a decode batch."""
    return 16 if m <= 16 else (32 if m <= 32 else 64)
