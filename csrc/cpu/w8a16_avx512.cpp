// AVX-512 W8A16 kernels: the weights stream from memory once per call as FP8 bytes and are
// decoded in registers to fp32; products and sums are fp32 FMAs (this machine class has no
// AVX512-BF16, and at small M the kernel is bound by memory bandwidth, not by arithmetic).
//
// Two decoders, picked at run time by CPUID:
//  * VBMI (Ice Lake and newer): 64 bytes -> 64 floats with two 128-entry byte lookups
//    (vpermi2b) giving the low and high byte of each value's bf16 encoding, then bf16 -> fp32
//    by shifting into the upper half of each 32-bit lane. 13 vector uops per 64 weights.
//  * F16C (any AVX-512 CPU): the byte s.eeee.mmm becomes the fp16 bit pattern
//    s.0eeee.mmm0000000 = value * 2^-8 (subnormals included: fp16 has the same structure with
//    a wider exponent), vcvtph2ps, times 2^8. Natural element order.
// The scalar reference is w8a16_portable.cpp; tests compare all paths to numerics.py.
#include <immintrin.h>

#include <cstdint>

#include "fp8_e4m3.h"
#include "kernels.h"

// Everything below is compiled for AVX-512 and only called after a CPUID check. No header may be
// included after this point: inline functions instantiated here would carry AVX-512 code.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,f16c,fma")

namespace fp8_backend {
namespace {

// ---- VBMI decoder: vbmi_source_index() order within each 64-block -------------------------
struct VbmiDecoder {
  static constexpr bool kPermuted = true;
  __m512i lo_a, lo_b, hi_a, hi_b, sign, hi16;

  VbmiDecoder() {
    const DecodeTables& t = decode_tables();
    lo_a = _mm512_loadu_si512(t.bf16_lo);
    lo_b = _mm512_loadu_si512(t.bf16_lo + 64);
    hi_a = _mm512_loadu_si512(t.bf16_hi);
    hi_b = _mm512_loadu_si512(t.bf16_hi + 64);
    sign = _mm512_set1_epi8(static_cast<char>(0x80));
    hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  }

  inline void decode64(const uint8_t* p, __mmask64 mask, __m512 v[4]) const {
    const __m512i b = _mm512_maskz_loadu_epi8(mask, p);  // masked-off bytes decode to +0
    // Byte lookup: index bits 0-5 pick the byte, bit 6 the table, bit 7 (sign) is ignored.
    const __m512i lo = _mm512_permutex2var_epi8(lo_a, b, lo_b);
    __m512i hi = _mm512_permutex2var_epi8(hi_a, b, hi_b);
    hi = _mm512_ternarylogic_epi32(hi, b, sign, 0xF8);  // hi | (b & 0x80)
    // Interleave to 16-bit bf16 words (within 128-bit lanes), then bf16 -> fp32.
    const __m512i u0 = _mm512_unpacklo_epi8(lo, hi);
    const __m512i u1 = _mm512_unpackhi_epi8(lo, hi);
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(u0, 16));
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(u0, hi16));
    v[2] = _mm512_castsi512_ps(_mm512_slli_epi32(u1, 16));
    v[3] = _mm512_castsi512_ps(_mm512_and_si512(u1, hi16));
  }
};

// ---- F16C decoder: natural order ---------------------------------------------------------
inline __m512 decode16_f16c(const uint8_t* p, __mmask16 mask) {
  const __m128i b = _mm_maskz_loadu_epi8(mask, p);
  // Sign-extend to 16 bits (negative bytes get 0xFF above), shift the 7 magnitude bits to
  // 13..7: bit 15 = sign, bit 14 = sign copy (cleared by the mask), bits 13..7 = eeeemmm.
  __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7);
  h = _mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));  // exact: power of 2
  // s.1111.111 is NaN in e4m3fn but a finite fp16 pattern: patch those lanes.
  const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
  return _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(__builtin_nanf("")));
}

struct F16cDecoder {
  static constexpr bool kPermuted = false;
  inline void decode64(const uint8_t* p, __mmask64 mask, __m512 v[4]) const {
    for (int j = 0; j < 4; ++j) v[j] = decode16_f16c(p + 16 * j, static_cast<__mmask16>(mask >> (16 * j)));
  }
};

// ---- GEMV tile: R weight rows x MT activation rows, full K ---------------------------------
// Weight bytes requested ahead of the rows being decoded: about a DRAM latency's worth of
// streaming at this kernel's rate (16 KiB ~ 1 us at 15 GB/s).
constexpr int64_t kPrefetchBytes = 16 << 10;

// Each decoded 64-weight block is used for all MT activation rows while it sits in registers.
template <class Dec, int R, int MT>
inline void gemv_tile(const Dec& dec, const float* x, int64_t ldx, const uint8_t* w, int64_t K,
                      float* D, int64_t ldd, int64_t prefetch_ahead) {
  __m512 acc[R][MT];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();

  auto step = [&](int64_t k, __mmask64 mask) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      // Rows are only K bytes long, too short for the hardware prefetcher to ramp up: fetch the
      // next tile's rows into L1 while this one computes and, when a tile is shorter than
      // kPrefetchBytes (small K), the rows prefetch_ahead bytes further on into L2 (measured on
      // SmolLM2-135M's layers, K = 576 / 1536: 15-20% faster at M = 1).
      if (prefetch_ahead) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
      if (prefetch_ahead > R * K) _mm_prefetch(reinterpret_cast<const char*>(w + prefetch_ahead + r * K + k), _MM_HINT_T1);
      __m512 v[4];
      dec.decode64(w + r * K + k, mask, v);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + m * ldx + k;
        // x is zero-padded to a multiple of 64, so the tail needs no mask here.
        acc[r][m] = _mm512_fmadd_ps(v[0], _mm512_load_ps(xm), acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(v[1], _mm512_load_ps(xm + 16), acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(v[2], _mm512_load_ps(xm + 32), acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(v[3], _mm512_load_ps(xm + 48), acc[r][m]);
      }
    }
  };
  const int64_t kfull = K & ~int64_t(63);
  for (int64_t k = 0; k < kfull; k += 64) step(k, ~__mmask64(0));
  if (K > kfull) step(kfull, (__mmask64(1) << (K - kfull)) - 1);

#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) D[m * ldd + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <class Dec, int R>
inline void gemv_rows(const Dec& dec, const float* x, int64_t ldx, int64_t M, const uint8_t* w,
                      int64_t K, float* D, int64_t ldd) {
  // Only the first pass over these rows prefetches; later m-tiles find them in cache. The far
  // distance is a whole number of tiles and at least kPrefetchBytes.
  const int64_t tile = R * K;
  const int64_t ahead = (kPrefetchBytes + tile - 1) / tile * tile;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) gemv_tile<Dec, R, 4>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, m == 0 ? ahead : 0);
  const int64_t pf = m == 0 ? ahead : 0;
  switch (M - m) {
    case 3: gemv_tile<Dec, R, 3>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, pf); break;
    case 2: gemv_tile<Dec, R, 2>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, pf); break;
    case 1: gemv_tile<Dec, R, 1>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, pf); break;
    default: break;
  }
}

template <class Dec>
void gemv(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, int64_t n0,
          int64_t n1, float* D, int64_t ldd) {
  const Dec dec;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) gemv_rows<Dec, 4>(dec, x, ldx, M, w + n * K, K, D + n, ldd);
  switch (n1 - n) {
    case 3: gemv_rows<Dec, 3>(dec, x, ldx, M, w + n * K, K, D + n, ldd); break;
    case 2: gemv_rows<Dec, 2>(dec, x, ldx, M, w + n * K, K, D + n, ldd); break;
    case 1: gemv_rows<Dec, 1>(dec, x, ldx, M, w + n * K, K, D + n, ldd); break;
    default: break;
  }
}

}  // namespace

void gemv_avx512_vbmi(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                      int64_t n0, int64_t n1, float* D, int64_t ldd) {
  gemv<VbmiDecoder>(x, ldx, M, w, K, n0, n1, D, ldd);
}

void gemv_avx512(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                 int64_t n0, int64_t n1, float* D, int64_t ldd) {
  gemv<F16cDecoder>(x, ldx, M, w, K, n0, n1, D, ldd);
}

void decode_rows_avx512(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * K;
    float* o = out + (n - n0) * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(o + k, decode16_f16c(wr + k, 0xFFFF));
    if (k < K) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
      _mm512_mask_storeu_ps(o + k, mask, decode16_f16c(wr + k, mask));
    }
  }
}

uint64_t stream_xor_avx512(const uint8_t* p, int64_t bytes) {
  // Four concurrent streams, one per quarter (page-aligned), 64 bytes from each per step.
  const int64_t pages = bytes / 4096, q = pages / 4 * 4096;
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < q; i += 64) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + q + i));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + 2 * q + i));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + 3 * q + i));
  }
  for (int64_t i = 4 * q; i < bytes; i += 64) a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
  const __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, a);
  uint64_t r = 0;
  for (int j = 0; j < 8; ++j) r ^= lanes[j];
  return r;
}

}  // namespace fp8_backend

#pragma GCC pop_options
