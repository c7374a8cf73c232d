// Portable scalar W8A16 kernel: the readable reference next to the AVX-512 paths, and the path
// for CPUs without AVX-512 (or FP8_BACKEND_CPU_ISA=portable).
#include <cstring>

#include "fp8_e4m3.h"
#include "kernels.h"

namespace fp8_backend {

const DecodeTables& decode_tables() {
  static const DecodeTables tables = [] {
    DecodeTables t;
    for (int b = 0; b < 256; ++b) t.f32[b] = e4m3fn_to_float(static_cast<uint8_t>(b));
    for (int b = 0; b < 128; ++b) {
      // bf16 = top 16 bits of fp32; exact because e4m3 has only 3 mantissa bits.
      float v = t.f32[b];
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      if (e4m3fn_is_nan(static_cast<uint8_t>(b))) bits = 0x7FC00000u;  // quiet NaN
      t.bf16_lo[b] = static_cast<uint8_t>((bits >> 16) & 0xFF);
      t.bf16_hi[b] = static_cast<uint8_t>((bits >> 24) & 0x7F);
    }
    return t;
  }();
  return tables;
}

void gemv_portable(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                   int64_t n0, int64_t n1, float* D, int64_t ldd) {
  const float* lut = decode_tables().f32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * lut[wr[k]];
      D[m * ldd + n] = acc;
    }
  }
}

void decode_rows_portable(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out) {
  const float* lut = decode_tables().f32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * K;
    float* o = out + (n - n0) * K;
    for (int64_t k = 0; k < K; ++k) o[k] = lut[wr[k]];
  }
}

uint64_t stream_xor_portable(const uint8_t* p, int64_t bytes) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    acc ^= v;
  }
  return acc;
}

}  // namespace fp8_backend
