// FP8 e4m3fn encode/decode shared by the CUDA kernels and a host build (tests compile this header
// with the host compiler and check it against numerics.py through ctypes).
// Semantics = numerics.round_to_fp8: saturate to +-448, round to nearest even, NaN -> 0x7F|sign,
// +-Inf -> +-448. Integer bit operations only: exact on every GPU (sm_80 has no FP8 cvt) and host.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FP8_HD __host__ __device__ __forceinline__
#else
#define FP8_HD static inline
#endif

FP8_HD uint32_t fp8_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  memcpy(&b, &x, 4);
  return b;
#endif
}

FP8_HD float fp8_bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  memcpy(&x, &b, 4);
  return x;
#endif
}

// fp32 -> e4m3fn bit pattern.
FP8_HD uint8_t fp8_e4m3_encode(float x) {
  const uint32_t bits = fp8_float_bits(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  if (x != x) return (uint8_t)(0x7Fu | sign);
  float a = fabsf(x);
  if (a > 448.0f) a = 448.0f;  // saturate first (Inf too), as numerics does
  const uint32_t ab = fp8_float_bits(a);
  const int32_t e = (int32_t)(ab >> 23);  // biased fp32 exponent
  uint32_t code;
  if (e >= 121) {  // |x| >= 2^-6: keep 3 mantissa bits, round half to even (carry moves up)
    const uint32_t r = ab + 0x7FFFFu + ((ab >> 20) & 1u);
    code = ((((r >> 23) - 120u) << 3) | ((r >> 20) & 7u));
  } else {  // subnormal: code = round_half_even(|x| / 2^-9), 0..8
    const uint32_t m = (ab & 0x7FFFFFu) | 0x800000u;
    int32_t s = 141 - e;
    if (s > 30) s = 30;
    code = (m + ((1u << (s - 1)) - 1u) + ((m >> s) & 1u)) >> s;
  }
  return (uint8_t)(code | sign);
}

// e4m3fn bit pattern -> fp32 (0x7F / 0xFF -> NaN).
FP8_HD float fp8_e4m3_decode(uint8_t u) {
  const uint32_t sign = (uint32_t)(u & 0x80u) << 24;
  const uint32_t e = (u >> 3) & 0xFu, m = u & 7u;
  if ((u & 0x7Fu) == 0x7Fu) return fp8_bits_float(0x7FC00000u | sign);
  if (e == 0) {  // subnormal: m * 2^-9 (exact in fp32)
    const float v = (float)m * 0.001953125f;
    return sign ? -v : v;
  }
  return fp8_bits_float(sign | ((e + 120u) << 23) | (m << 20));
}

// max that keeps NaN (torch.amax semantics; fmaxf would drop it).
FP8_HD float fp8_nan_max(float a, float b) {
  if (a != a || b != b) return fp8_bits_float(0x7FC00000u);
  return a > b ? a : b;
}

// scale = max(amax / 448, floor); NaN stays NaN. IEEE division (do not build with fast math).
FP8_HD float fp8_scale_of(float amax, float floor_) {
  const float s = amax / 448.0f;
  if (s != s) return s;
  return s < floor_ ? floor_ : s;
}

#define FP8_SCALE_FLOOR (1.0f / (448.0f * 512.0f))
