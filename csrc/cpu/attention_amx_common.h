// Pieces shared by the AMX attention kernels (attention_amx.cpp: the general path;
// attention_amx_decode.cpp: decode tasks): the FP8 -> bf16 byte-lookup decoder, the tile
// configuration cache, bf16 splits and the query staging. Include once per file, after every
// other header, inside the #pragma GCC target(AMX / AVX-512) region: it defines internal-linkage
// functions compiled for that target.
#pragma once

namespace fp8_backend {

// Tile shapes this thread has loaded during the current op call (0: none; the op layer calls
// attend_amx_release after its tasks): tasks of one call share their shapes, so ldtilecfg runs
// once per thread and call instead of once per task. Defined in attention_amx.cpp.
extern thread_local int tls_tile_sig;

namespace {

constexpr int kMaxD = 256;     // largest head size these kernels take
constexpr float kSlack = 8.f;  // lazy softmax rescaling threshold (the running max moves when a
                               // score exceeds it by more than this)

#include "amx_tiles.h"
#include "avx512_exp.h"

// bf16 encodings (low byte, high byte) of the 128 FP8 magnitudes, sign added separately.
struct AmxTables {
  alignas(64) uint8_t lo[2][128];  // [e4m3, e5m2]
  alignas(64) uint8_t hi[2][128];
  AmxTables() {
    const DecodeTables& t = decode_tables();
    for (int m = 0; m < 128; ++m) {
      lo[0][m] = t.bf16_lo[m];
      hi[0][m] = t.bf16_hi[m];
      // e5m2 = s.eeeee.mm, bias 15: bf16 exponent e + 112, mantissa mm in its top two bits.
      const int e = m >> 2, mm = m & 3;
      uint16_t b;
      if (e == 31)
        b = static_cast<uint16_t>(0x7F80 | (mm ? 0x40 : 0));  // Inf / NaN
      else if (e == 0)
        b = mm == 0 ? 0 : (mm == 1 ? (111 << 7) : (mm == 2 ? (112 << 7) : ((112 << 7) | 0x40)));  // mm * 2^-16
      else
        b = static_cast<uint16_t>(((e + 112) << 7) | (mm << 5));
      lo[1][m] = static_cast<uint8_t>(b & 0xFF);
      hi[1][m] = static_cast<uint8_t>(b >> 8);
    }
  }
};

const AmxTables& amx_tables() {
  static const AmxTables t;
  return t;
}

inline void amx_tiles_for(int sig, const int rows[8], const int cols[8]) {
  if (tls_tile_sig == sig) return;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = static_cast<uint16_t>(cols[t]);
  }
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");  // see configure_tiles
  _tile_loadconfig(&cfg);
  tls_tile_sig = sig;
}

// FP8 bytes -> bf16 words via byte lookups (index bits 0-6 = magnitude, bit 7 = sign).
struct Decoder {
  __m512i lo_a, lo_b, hi_a, hi_b, sign;
  __m512i special;  // byte mask whose bits are all set exactly for Inf / NaN (e4m3 0x7F, e5m2 0x7C)
  explicit Decoder(int table) {
    special = _mm512_set1_epi8(table == 0 ? 0x7F : 0x7C);
    const AmxTables& t = amx_tables();
    lo_a = _mm512_loadu_si512(t.lo[table]);
    lo_b = _mm512_loadu_si512(t.lo[table] + 64);
    hi_a = _mm512_loadu_si512(t.hi[table]);
    hi_b = _mm512_loadu_si512(t.hi[table] + 64);
    sign = _mm512_set1_epi8(static_cast<char>(0x80));
  }
  // 64 bytes b (in the order wanted, already permuted by `order` below) -> 64 words.
  inline void words(__m512i b, __m512i out[2]) const {
    const __m512i lo = _mm512_permutex2var_epi8(lo_a, b, lo_b);
    __m512i hi = _mm512_permutex2var_epi8(hi_a, b, hi_b);
    hi = _mm512_ternarylogic_epi32(hi, b, sign, 0xF8);  // hi | (b & 0x80)
    out[0] = _mm512_unpacklo_epi8(lo, hi);
    out[1] = _mm512_unpackhi_epi8(lo, hi);
  }
};

// The decoder of an FP8 cache kind (null for 16/32-bit caches); built on first use.
inline const Decoder* decoder_for(KvKind kind) {
  static const Decoder e4m3(0), e5m2(1);
  return kind == KvKind::e4m3 ? &e4m3 : (kind == KvKind::e5m2 ? &e5m2 : nullptr);
}

// fp32 -> bf16 bits (RNE) of 16 values, as 16-bit words in a __m256i.
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
inline __m512 from_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

// A query row in the d order in which Decoder::words leaves a 64-byte FP8 chunk of a K row when
// the chunk is not byte-permuted first ("lane order": word p of the chunk holds
// d = 16 (p / 8) + p % 8 for p < 32, 16 (p' / 8) + 8 + p' % 8 for p = 32 + p'): staging the
// queries in that order leaves every q . k unchanged; a last half chunk (D % 64 == 32) keeps
// natural order. Returns dst.
const float* k_order(const float* q, int64_t D, float* dst) {
  const __m512i lo = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    const __m512 q0 = _mm512_loadu_ps(q + d), q1 = _mm512_loadu_ps(q + d + 16);
    const __m512 q2 = _mm512_loadu_ps(q + d + 32), q3 = _mm512_loadu_ps(q + d + 48);
    _mm512_storeu_ps(dst + d, _mm512_permutex2var_ps(q0, lo, q1));
    _mm512_storeu_ps(dst + d + 16, _mm512_permutex2var_ps(q2, lo, q3));
    _mm512_storeu_ps(dst + d + 32, _mm512_permutex2var_ps(q0, hi, q1));
    _mm512_storeu_ps(dst + d + 48, _mm512_permutex2var_ps(q2, hi, q3));
  }
  for (; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_loadu_ps(q + d));
  return dst;
}

// Q^T B tiles of one query row q (k_order's d order) split into nsq bf16 parts: chunk kc (32 d),
// d pair r -> row r, part k -> column col0 + k * col_step, in tiles of nc columns (dwords) per
// row. One 16-dword scatter per (chunk, part).
void scatter_qt(const float* q, int64_t D, int nsq, int nc, int col0, int col_step, uint16_t* qt) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(nc));
  for (int64_t kc = 0; kc < D / 32; ++kc) {
    __m512 x0 = _mm512_loadu_ps(q + 32 * kc), x1 = _mm512_loadu_ps(q + 32 * kc + 16);
    for (int k = 0; k < nsq; ++k) {
      const __m256i h0 = to_bf16(x0), h1 = to_bf16(x1);
      x0 = _mm512_sub_ps(x0, from_bf16(h0));
      x1 = _mm512_sub_ps(x1, from_bf16(h1));
      // words d 0..15 then 16..31 of the chunk -> dwords = d pairs (2r, 2r + 1)
      const __m512i pairs = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
      _mm512_i32scatter_epi32(qt + kc * 16 * nc * 2, _mm512_add_epi32(rows, _mm512_set1_epi32(col0 + k * col_step)),
                              pairs, 4);
    }
  }
}

}  // namespace
}  // namespace fp8_backend
