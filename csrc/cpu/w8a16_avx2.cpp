// AVX2 W8A16 kernels (AVX2 + FMA + F16C: Haswell and newer, AMD Zen 1-3): the weights stream
// from memory once per call as FP8 bytes and are decoded in registers to fp32; products and sums
// are fp32 FMAs, 8 lanes.
//
// Two decoders:
//  * GEMV (ShiftDecoder): 32 bytes = eight 32-bit lanes; byte i of a lane is shifted to the top,
//    arithmetically shifted right by 4 and masked: sign to bit 31, eeee.mmm to bits 26..20, i.e.
//    the fp32 bit pattern of the e4m3 value times 2^-120 (subnormals included: fp32's exponent-0
//    numbers have the same structure). Two or three one-uop operations per 8 weights; the
//    activations are staged in the same permuted order (avx2_source_index) and pre-multiplied by
//    a power of two (avx2_prescale, kernels.h) so that every product is a normal fp32 number.
//  * Rows for decode + fp32 GEMM (decode8, natural order, F16C): the byte s.eeee.mmm becomes the
//    fp16 bit pattern s.0eeee.mmm0000000, whose value is the e4m3 value times 2^-8 (subnormals
//    included: fp16 has the same structure with a wider exponent); vcvtph2ps and x 2^8 (exact).
// s.1111.111 is NaN in e4m3fn. The shift decoder gives it a finite value; the GEMV tracks per
// tile whether any byte has its low 7 bits all set and makes the sums of the weight rows that
// have one NaN (NaN times anything is NaN: the result of decoding it). decode8 patches the lanes.
// The scalar reference is w8a16_portable.cpp; tests compare all paths with numerics.py.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fp8_e4m3.h"
#include "kernels.h"

// Everything below is compiled for AVX2 and only called after a CPUID check. No header may be
// included after this point: inline functions instantiated here would carry AVX2 code.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace fp8_backend {
namespace {

// Lane l of vector j holds byte 3 - j of 32-bit lane l (avx2_source_index): the byte is moved
// to bits 31..24, shifted right arithmetically by 4 (bits 31..27 = the sign, 26..20 = eeee.mmm)
// and masked to the sign and those 7 bits: the fp32 encoding of the e4m3 value times 2^-120.
struct ShiftDecoder {
  // v[j], lane l: the weight of byte avx2_source_index(j, l) of b, times 2^-120. nan_max: the
  // byte-wise maximum of b & 0x7F so far (0x7F iff a NaN encoding was seen).
  inline void decode(__m256i b, __m256 v[4], __m256i& nan_max) const {
    nan_max = _mm256_max_epu8(nan_max, _mm256_and_si256(b, _mm256_set1_epi8(0x7F)));
    const __m256i keep = _mm256_set1_epi32(static_cast<int>(0x87F00000u));
    v[0] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_srai_epi32(b, 4), keep));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(b, 8), 4), keep));
    v[2] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(b, 16), 4), keep));
    v[3] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(b, 24), 4), keep));
  }
};

// 32 bytes of which the first n (0..32) are copied from p, the rest zero (row tails: AVX2 has
// no masked byte loads).
inline __m256i load_tail32(const uint8_t* p, int64_t n) {
  alignas(32) uint8_t buf[32] = {};
  std::memcpy(buf, p, static_cast<size_t>(n));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// Weight bytes requested ahead of the rows being decoded: about a DRAM latency's worth of
// streaming (16 KiB ~ 1 us at 16 GB/s).
constexpr int64_t kPrefetchBytes = 16 << 10;

// ---- GEMV tile: R weight rows x MT activation rows, full K ----------------------------------
// Each 32-weight step is decoded once and used for all MT activation rows while in registers.
// U accumulators per (row, activation row) break the FMA dependency chains when R x MT is
// small; they are added at the end in a fixed order (results do not depend on the threads).
template <int R, int MT, int U>
inline void gemv_tile(const ShiftDecoder& dec, const float* x, int64_t ldx, const uint8_t* w,
                      int64_t K, float* D, int64_t ldd, const float* out_scale, int64_t prefetch_ahead) {
  static_assert(U == 1 || U == 2, "U: 1 or 2 accumulators per output");
  __m256 acc[R][MT][U];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm256_setzero_ps();
  // Byte-wise maximum of b & 0x7F over the tile's rows: 0x7F iff some byte is s.1111.111 (one
  // register for all R rows; the rare tile that has one is then checked row by row).
  __m256i nan_max = _mm256_setzero_si256();

  auto step = [&](int r, int64_t k, __m256i b) {
    __m256 v[4];
    dec.decode(b, v, nan_max);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + m * ldx + k;  // zero-padded to a multiple of 64: no tail mask
      // Opaque to the compiler, so that it reads x as FMA memory operands per weight row instead
      // of keeping x in registers across the rows (16 ymm registers: it then spilled the sums).
      __asm__("" : "+r"(xm));
      acc[r][m][0] = _mm256_fmadd_ps(v[0], _mm256_load_ps(xm), acc[r][m][0]);
      acc[r][m][U - 1] = _mm256_fmadd_ps(v[1], _mm256_load_ps(xm + 8), acc[r][m][U - 1]);
      acc[r][m][0] = _mm256_fmadd_ps(v[2], _mm256_load_ps(xm + 16), acc[r][m][0]);
      acc[r][m][U - 1] = _mm256_fmadd_ps(v[3], _mm256_load_ps(xm + 24), acc[r][m][U - 1]);
    }
  };
  const int64_t kfull = K & ~int64_t(31);
  for (int64_t k = 0; k < kfull; k += 32) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * K + k;
      // Rows are only K bytes long, too short for the hardware prefetcher to ramp up: fetch the
      // next tile's rows into L1 while this one computes and, when a tile is shorter than
      // kPrefetchBytes (small K), the rows prefetch_ahead bytes further on into L2. One request
      // per 64-byte line.
      if (prefetch_ahead && (k & 32) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + R * K), _MM_HINT_T0);
        if (prefetch_ahead > R * K) _mm_prefetch(reinterpret_cast<const char*>(wr + prefetch_ahead), _MM_HINT_T1);
      }
      step(r, k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr)));
    }
  }
  if (K > kfull) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) step(r, kfull, load_tail32(w + r * K + kfull, K - kfull));
  }

  const bool tile_nan = _mm256_movemask_epi8(_mm256_cmpeq_epi8(nan_max, _mm256_set1_epi8(0x7F))) != 0;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    bool nan = false;
    if (tile_nan)
      for (int64_t k = 0; k < K && !nan; ++k) nan = e4m3fn_is_nan(w[r * K + k]);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m256 a = acc[r][m][0];
      if (U == 2) a = _mm256_add_ps(a, acc[r][m][U - 1]);
      // Horizontal sum in a fixed order.
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
      D[m * ldd + r] = nan ? NAN : _mm_cvtss_f32(s1) * out_scale[m];  // exact: a power of 2
    }
  }
}

// Rows of one R-row tile for all M activation rows, in tiles of MT rows.
template <int R, int MT>
inline void gemv_rows(const ShiftDecoder& dec, const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, float* D,
                      int64_t ldd, const float* os) {
  // Only the first pass over these rows prefetches; later m-tiles find them in cache. The far
  // distance is a whole number of tiles and at least kPrefetchBytes.
  const int64_t tile = R * K;
  const int64_t ahead = (kPrefetchBytes + tile - 1) / tile * tile;
  // Two accumulators per output for tiles of 1 or 2 activation rows (enough independent FMA
  // chains); the choice depends on the tile's MT only, so each output's summation order does
  // not depend on R, N or the threads.
  int64_t m = 0;
  for (; m + MT <= M; m += MT)
    gemv_tile<R, MT, MT <= 2 ? 2 : 1>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, os + m, m == 0 ? ahead : 0);
  const int64_t pf = m == 0 ? ahead : 0;
  switch (M - m) {  // MT <= 4
    case 3: gemv_tile<R, 3, 1>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, os + m, pf); break;
    case 2: gemv_tile<R, 2, 2>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, os + m, pf); break;
    case 1: gemv_tile<R, 1, 2>(dec, x + m * ldx, ldx, w, K, D + m * ldd, ldd, os + m, pf); break;
    default: break;
  }
}

// Weight rows [n0, n1) in tiles of R rows.
template <int R, int MT>
void gemv(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, int64_t n0, int64_t n1,
          float* D, int64_t ldd, const float* out_scale) {
  const ShiftDecoder dec;
  int64_t n = n0;
  for (; n + R <= n1; n += R) gemv_rows<R, MT>(dec, x, ldx, M, w + n * K, K, D + n, ldd, out_scale);
  switch (n1 - n) {  // R <= 4
    case 3: gemv_rows<3, MT>(dec, x, ldx, M, w + n * K, K, D + n, ldd, out_scale); break;
    case 2: gemv_rows<2, MT>(dec, x, ldx, M, w + n * K, K, D + n, ldd, out_scale); break;
    case 1: gemv_rows<1, MT>(dec, x, ldx, M, w + n * K, K, D + n, ldd, out_scale); break;
    default: break;
  }
}

// 8 FP8 bytes -> 8 exact fp32 values (NaN lanes patched).
inline __m256 decode8(__m128i b) {
  const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(static_cast<short>(0xBFFF)));
  const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));  // exact: power of 2
  const __m128i nan8 = _mm_cmpeq_epi8(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
  const __m256 nan = _mm256_castsi256_ps(_mm256_cvtepi8_epi32(nan8));  // 0 / -1 per lane
  return _mm256_blendv_ps(v, _mm256_set1_ps(NAN), nan);
}

}  // namespace

// M = 1: 4 weight rows per tile (4 concurrent streams), two accumulators each; M > 1: 2 weight
// rows x 4 activation rows (8 accumulators, 16 ymm registers in all).
void gemv_avx2(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, int64_t n0,
               int64_t n1, float* D, int64_t ldd, const float* out_scale) {
  if (M == 1)
    gemv<4, 1>(x, ldx, M, w, K, n0, n1, D, ldd, out_scale);
  else
    gemv<2, 4>(x, ldx, M, w, K, n0, n1, D, ldd, out_scale);
}

void decode_rows_avx2(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * K;
    float* o = out + (n - n0) * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      _mm256_storeu_ps(o + k, decode8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k))));
    if (k < K) {
      alignas(32) float t[8];
      _mm256_store_ps(t, decode8(_mm256_castsi256_si128(load_tail32(wr + k, K - k))));
      std::memcpy(o + k, t, static_cast<size_t>(K - k) * 4);
    }
  }
}

uint64_t stream_xor_avx2(const uint8_t* p, int64_t bytes) {
  // Four concurrent streams, one per quarter (page-aligned), 64 bytes from each per step.
  const int64_t pages = bytes / 4096, q = pages / 4 * 4096;
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < q; i += 64) {
    a0 = _mm256_xor_si256(a0, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32))));
    a1 = _mm256_xor_si256(a1, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + q + i)),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + q + i + 32))));
    a2 = _mm256_xor_si256(a2, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * q + i)),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * q + i + 32))));
    a3 = _mm256_xor_si256(a3, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 3 * q + i)),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 3 * q + i + 32))));
  }
  for (int64_t i = 4 * q; i < bytes; i += 32) a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
  const __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

}  // namespace fp8_backend

#pragma GCC pop_options
