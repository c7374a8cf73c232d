// AVX-512 paged-attention kernel: cache bytes are decoded 16 at a time in registers (e4m3 by the
// F16C trick of w8a16_avx512.cpp, e5m2 as the top byte of an fp16, bf16 by a shift) into an
// L1-resident fp32 tile of kKeyTile keys; q.k, the online softmax (vectorized exp) and p.V are
// fp32 FMAs. Head sizes 64 and 128 keep a query row / an output row in registers; any other
// multiple of 16 runs the generic loops. Called only after a CPUID check (attention_ops.cpp).
#include <immintrin.h>

#include <cstdint>

#include "attention.h"

// Everything below is compiled for AVX-512; no header may be included after this point.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")

namespace fp8_backend {
namespace {

inline __m512 decode16(const uint8_t* p, KvKind kind) {
  switch (kind) {
    case KvKind::e4m3: {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      // s.eeee.mmm -> fp16 s.0eeee.mmm0000000 = value * 2^-8 (subnormals included).
      __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7);
      h = _mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0xBFFF)));
      const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
      const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
      return _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(__builtin_nanf("")));
    }
    case KvKind::e5m2: {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8));
    }
    case KvKind::bf16: {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    }
    case KvKind::f16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    case KvKind::f32:
      break;
  }
  return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

inline int64_t elem_bytes(KvKind kind) {
  return kind == KvKind::e4m3 || kind == KvKind::e5m2 ? 1 : (kind == KvKind::f32 ? 4 : 2);
}

#include "avx512_exp.h"

// DN > 0: head size fixed at compile time (registers hold a row); DN == 0: any multiple of 16.
template <int DN>
struct Avx512 {
  static void decode(const uint8_t* src, int64_t tok, int64_t n, int64_t Drt, KvKind kind, float* dst) {
    const int64_t D = DN ? DN : Drt, eb = elem_bytes(kind);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(dst + j * D + d, decode16(src + j * tok + d * eb, kind));
  }

  static void qk(const float* q, const float* k, int64_t n, int64_t Drt, float* s) {
    if constexpr (DN > 0) {
      constexpr int V = DN / 16;
      __m512 qv[V];
      for (int i = 0; i < V; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
      for (int64_t j = 0; j < n; ++j) {
        const float* kr = k + j * DN;
        __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
        __m512 a1 = _mm512_mul_ps(qv[1], _mm512_loadu_ps(kr + 16));
        for (int i = 2; i < V; i += 2) {
          a0 = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(kr + 16 * i), a0);
          a1 = _mm512_fmadd_ps(qv[i + 1], _mm512_loadu_ps(kr + 16 * i + 16), a1);
        }
        s[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < Drt; d += 16)
          a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + j * Drt + d), a);
        s[j] = _mm512_reduce_add_ps(a);
      }
    }
  }

  static float exp_sub(float* s, int64_t n, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), mv));
      _mm512_mask_storeu_ps(s + j, mask, e);
      sum = _mm512_mask_add_ps(sum, mask, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }

  static void pv(float* o, float alpha, const float* p, const float* v, int64_t n, int64_t Drt) {
    const __m512 av = _mm512_set1_ps(alpha);
    if constexpr (DN > 0) {
      constexpr int V = DN / 16;
      __m512 acc[V];
      for (int i = 0; i < V; ++i) acc[i] = _mm512_mul_ps(_mm512_loadu_ps(o + 16 * i), av);
      for (int64_t j = 0; j < n; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int i = 0; i < V; ++i) acc[i] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + j * DN + 16 * i), acc[i]);
      }
      for (int i = 0; i < V; ++i) _mm512_storeu_ps(o + 16 * i, acc[i]);
    } else {
      for (int64_t d = 0; d < Drt; d += 16) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(o + d), av);
        for (int64_t j = 0; j < n; ++j)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(v + j * Drt + d), acc);
        _mm512_storeu_ps(o + d, acc);
      }
    }
  }

  static void scale(float* o, float a, int64_t Drt) {
    const int64_t D = DN ? DN : Drt;
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(a)));
  }
};

#include "attention_kernel.h"

}  // namespace

void attend_avx512(const AttnTask& t) {
  if (t.D == 128)
    attend_impl<Avx512<128>>(t);
  else if (t.D == 64)
    attend_impl<Avx512<64>>(t);
  else
    attend_impl<Avx512<0>>(t);
}

}  // namespace fp8_backend

#pragma GCC pop_options
