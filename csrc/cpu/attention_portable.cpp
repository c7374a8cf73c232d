// Portable scalar paged-attention kernel: any head size, any x86-64 (or other) CPU, and the
// readable reference next to the AVX-512 path.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention.h"
#include "fp8_e4m3.h"

namespace fp8_backend {
namespace {

// IEEE half bits -> float (e5m2 is the top byte of a half: byte << 8).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const int e = (h >> 10) & 0x1F;
  const uint32_t mant = h & 0x3FFu;
  float v;
  if (e == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (e == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400u), e - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

struct Portable {
  static void decode(const uint8_t* src, int64_t tok, int64_t n, int64_t D, KvKind kind, float* dst) {
    const float* lut = decode_tables().f32;
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t* s = src + j * tok;
      float* o = dst + j * D;
      switch (kind) {
        case KvKind::e4m3:
          for (int64_t d = 0; d < D; ++d) o[d] = lut[s[d]];
          break;
        case KvKind::e5m2:
          for (int64_t d = 0; d < D; ++d) o[d] = half_bits_to_float(static_cast<uint16_t>(s[d] << 8));
          break;
        case KvKind::bf16:
          for (int64_t d = 0; d < D; ++d) {
            uint16_t b;
            std::memcpy(&b, s + 2 * d, 2);
            const uint32_t bits = static_cast<uint32_t>(b) << 16;
            std::memcpy(o + d, &bits, 4);
          }
          break;
        case KvKind::f16:
          for (int64_t d = 0; d < D; ++d) {
            uint16_t b;
            std::memcpy(&b, s + 2 * d, 2);
            o[d] = half_bits_to_float(b);
          }
          break;
        case KvKind::f32:
          std::memcpy(o, s, D * 4);
          break;
      }
    }
  }
  static void qk(const float* q, const float* k, int64_t n, int64_t D, float* s) {
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += q[d] * k[j * D + d];
      s[j] = acc;
    }
  }
  static float exp_sub(float* s, int64_t n, float m) {
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
    return sum;
  }
  static void pv(float* o, float alpha, const float* p, const float* v, int64_t n, int64_t D) {
    for (int64_t d = 0; d < D; ++d) {
      float acc = o[d] * alpha;
      for (int64_t j = 0; j < n; ++j) acc += p[j] * v[j * D + d];
      o[d] = acc;
    }
  }
  static void scale(float* o, float a, int64_t D) {
    for (int64_t d = 0; d < D; ++d) o[d] *= a;
  }
};

#include "attention_kernel.h"

}  // namespace

void attend_portable(const AttnTask& t) { attend_impl<Portable>(t); }

}  // namespace fp8_backend
