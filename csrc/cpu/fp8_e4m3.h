// FP8 e4m3fn decoding shared by every CPU path.
//
// e4m3fn byte: s eeee mmm, exponent bias 7, no infinities; s.1111.111 is NaN.
//   e == 0 : subnormal, (m / 8) * 2^-6
//   e >= 1 : normal,    (1 + m / 8) * 2^(e - 7)
// Every e4m3fn value is exactly representable in bf16, fp16 (times 2^-8) and fp32.
#pragma once

#include <cmath>
#include <cstdint>

namespace fp8_backend {

inline bool e4m3fn_is_nan(uint8_t b) { return (b & 0x7F) == 0x7F; }

// The scalar definition every SIMD decoder is tested against.
inline float e4m3fn_to_float(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 0x7;
  float v;
  if (e4m3fn_is_nan(b)) {
    v = NAN;
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -9);  // m/8 * 2^-6
  } else {
    v = std::ldexp(static_cast<float>(8 + m), e - 10);  // (8+m)/8 * 2^(e-7)
  }
  return (b & 0x80) ? -v : v;
}

// Lookup tables built once from e4m3fn_to_float.
struct DecodeTables {
  float f32[256];       // byte -> float
  uint8_t bf16_lo[128];  // |byte| (7 bits) -> low byte of the value's bf16 bits
  uint8_t bf16_hi[128];  // |byte| (7 bits) -> high byte of the value's bf16 bits (sign clear)
};
const DecodeTables& decode_tables();

// Element order produced by the AVX-512 VBMI decoder (see w8a16_avx512.cpp): within each block
// of 64 weights, fp32 vector j (0..3), lane l (0..15) holds weight k = 16*(l/4) + 8*(j/2) +
// 2*(l%4) + (j%2). Activations are laid out in the same order so the dot products line up.
inline int vbmi_source_index(int j, int lane) {
  return 16 * (lane / 4) + 8 * (j / 2) + 2 * (lane % 4) + (j % 2);
}

// The AVX2 GEMV's decoder (w8a16_avx2.cpp) reads 32 bytes as eight 32-bit lanes and takes byte
// 3 - j of each lane into fp32 vector j: within each block of 32 weights, vector j (0..3), lane l
// (0..7) holds weight 4*l + 3 - j.
inline int avx2_source_index(int j, int lane) { return 4 * lane + 3 - j; }

// Index of staged activation slot (j, l) for a GEMV whose vectors have `lanes` lanes (8: AVX2,
// 16: AVX-512 VBMI) within its 4 * lanes-wide block.
inline int gemv_source_index(int lanes, int j, int lane) {
  return lanes == 8 ? avx2_source_index(j, lane) : vbmi_source_index(j, lane);
}

}  // namespace fp8_backend
