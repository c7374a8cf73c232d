// W8A16 GEMM on AMX-BF16 tiles (Sapphire Rapids and newer) for bf16 activations at larger M. FP8 e4m3 values are exact in bf16, and the
// product of two bf16 values is exact in fp32, so the tile GEMM computes the same fp32-accumulated
// dot products as numerics.w8a16_linear (in another summation order; the hardware flushes fp32
// subnormal sums and bf16 subnormal inputs to zero, below 2^-126 — far under any tolerance).
//
// Small M stays on the VBMI fp32 GEMV: a vdpbf16ps GEMV over the same byte-LUT decode was
// measured slower at every M from 1 to 64 on Sapphire Rapids (the decode's shuffles and the
// dot products compete for one port), so it is not shipped.
//  * gemm_amx (M >= amx_min_m, compute-bound): GotoBLAS-style blocking. A = activations (bf16 rows,
//    read in place as 16x32 tiles), B = weights decoded to bf16 once per call and transposed
//    into AMX's pair-interleaved ("VNNI") layout, 16x16 fp32 C tiles accumulated in place in D.
//
// The scalar reference is w8a16_portable.cpp (e4m3fn_to_float); tests compare all paths with
// numerics.py. Everything here is compiled for AVX-512/AMX and called only after CPUID checks.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fp8_e4m3.h"
#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,amx-tile,amx-bf16,fma")

namespace fp8_backend {
namespace {

// 64 FP8 bytes -> 64 bf16 words in natural order: out[0] = k 0..31, out[1] = k 32..63.
struct Bf16Decoder {
  __m512i lo_a, lo_b, hi_a, hi_b, sign, order;

  Bf16Decoder() {
    const DecodeTables& t = decode_tables();
    lo_a = _mm512_loadu_si512(t.bf16_lo);
    lo_b = _mm512_loadu_si512(t.bf16_lo + 64);
    hi_a = _mm512_loadu_si512(t.bf16_hi);
    hi_b = _mm512_loadu_si512(t.bf16_hi + 64);
    sign = _mm512_set1_epi8(static_cast<char>(0x80));
    // unpacklo/hi interleave bytes 0-7 / 8-15 of each 128-bit lane L. Pre-permute so that
    // bytes 16L+j (j < 8) hold source byte 8L+j and bytes 16L+8+j hold byte 32+8L+j: then
    // unpacklo yields k = 0..31 and unpackhi k = 32..63, in order.
    alignas(64) uint8_t idx[64];
    for (int L = 0; L < 4; ++L)
      for (int j = 0; j < 8; ++j) {
        idx[16 * L + j] = static_cast<uint8_t>(8 * L + j);
        idx[16 * L + 8 + j] = static_cast<uint8_t>(32 + 8 * L + j);
      }
    order = _mm512_load_si512(idx);
  }

  inline void decode64(const uint8_t* p, __mmask64 mask, __m512i out[2]) const {
    decode(_mm512_maskz_loadu_epi8(mask, p), out);  // masked-off bytes decode to +0
  }

  inline void decode(__m512i b, __m512i out[2]) const {
    b = _mm512_permutexvar_epi8(order, b);
    // Byte lookup: index bits 0-5 pick the byte, bit 6 the table, bit 7 (sign) is ignored.
    const __m512i lo = _mm512_permutex2var_epi8(lo_a, b, lo_b);
    __m512i hi = _mm512_permutex2var_epi8(hi_a, b, hi_b);
    hi = _mm512_ternarylogic_epi32(hi, b, sign, 0xF8);  // hi | (b & 0x80)
    out[0] = _mm512_unpacklo_epi8(lo, hi);
    out[1] = _mm512_unpackhi_epi8(lo, hi);
  }
};

// ---- AMX ------------------------------------------------------------------------------------
#include "amx_tiles.h"

// Tiles 0-3: C (16 rows m x 16 fp32 n), 4-5: A (16 rows m x 32 bf16 k), 6-7: B (16 rows of
// k pairs x 16 n pairs).

constexpr int64_t kNP = 128;  // weight rows per panel (8 B tiles): activations are re-read N/kNP times
constexpr int64_t kKC = 256;  // k per chunk: a panel's decoded weights take kNP * kKC * 2 = 64 KiB,
                              // the activations' 32-row block 16 KiB (L1)

// Transpose 16 rows x 32 words (FP8 byte pairs) into 16 vectors of two word-columns each:
// in[j] = row j's 64 bytes, word r = bytes (2r, 2r + 1); out[q] = word 2q of rows 0..15, then
// word 2q + 1 of rows 0..15. Transposing the FP8 pairs before decoding moves half the bytes that
// a transpose of the decoded bf16 would, and needs no row buffer.
inline void transpose_pairs16x32(const __m512i in[16], __m512i out[16]) {
  __m512i t[16], u[4][4], z[2][8];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: words c = 0..3 (lo) / 4..7 (hi) of rows 2i, 2i+1
    t[2 * i] = _mm512_unpacklo_epi16(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi16(in[2 * i], in[2 * i + 1]);
  }
  for (int Q = 0; Q < 4; ++Q) {  // u[Q][s]: words c = 2s, 2s + 1 of rows 4Q..4Q+3
    u[Q][0] = _mm512_unpacklo_epi32(t[4 * Q], t[4 * Q + 2]);
    u[Q][1] = _mm512_unpackhi_epi32(t[4 * Q], t[4 * Q + 2]);
    u[Q][2] = _mm512_unpacklo_epi32(t[4 * Q + 1], t[4 * Q + 3]);
    u[Q][3] = _mm512_unpackhi_epi32(t[4 * Q + 1], t[4 * Q + 3]);
  }
  for (int P = 0; P < 2; ++P)  // z[P][c], lane L: word 8L + c of rows 8P..8P+7
    for (int s = 0; s < 4; ++s) {
      z[P][2 * s] = _mm512_unpacklo_epi64(u[2 * P][s], u[2 * P + 1][s]);
      z[P][2 * s + 1] = _mm512_unpackhi_epi64(u[2 * P][s], u[2 * P + 1][s]);
    }
  // out[4L + s] = lane L of z[0][2s], z[1][2s], z[0][2s+1], z[1][2s+1] (words r = 8L + 2s, +1).
  for (int s = 0; s < 4; ++s) {
    const __m512i x01 = _mm512_shuffle_i32x4(z[0][2 * s], z[1][2 * s], 0x44);      // lanes 0,1 | 0,1
    const __m512i y01 = _mm512_shuffle_i32x4(z[0][2 * s + 1], z[1][2 * s + 1], 0x44);
    const __m512i x23 = _mm512_shuffle_i32x4(z[0][2 * s], z[1][2 * s], 0xEE);      // lanes 2,3 | 2,3
    const __m512i y23 = _mm512_shuffle_i32x4(z[0][2 * s + 1], z[1][2 * s + 1], 0xEE);
    out[0 + s] = _mm512_shuffle_i32x4(x01, y01, 0x88);
    out[4 + s] = _mm512_shuffle_i32x4(x01, y01, 0xDD);
    out[8 + s] = _mm512_shuffle_i32x4(x23, y23, 0x88);
    out[12 + s] = _mm512_shuffle_i32x4(x23, y23, 0xDD);
  }
}

// Decode weight rows [n0, n0 + np) x k [k0, k0 + kc) into B tiles: tile (t, kb) for n-tile t and
// 32-wide k step kb, at bt + (t * kbs + kb) * 256 dwords; dword [r][j] = bf16 pair
// (w[n0+16t+j][k0+32kb+2r], w[...][k0+32kb+2r+1]). Rows >= N and k >= K are zero.
void pack_b(const Bf16Decoder& dec, const uint8_t* w, int64_t N, int64_t K, int64_t n0,
            int64_t np, int64_t k0, int64_t kc, uint32_t* bt) {
  const int64_t kbs = (kc + 63) / 64 * 2;
  for (int64_t t = 0; t < np / 16; ++t) {
    const int64_t nt = n0 + 16 * t;
    for (int j = 0; j < 16; ++j) {
      // Rows are read in kc-byte pieces, too short for the hardware prefetcher: fetch each
      // row's next piece (or, on the last one, the row a panel further on) into L2 now.
      const int64_t n = nt + j;
      const uint8_t* next = n >= N ? nullptr
                            : k0 + kc < K ? w + n * K + k0 + kc
                            : (n + np < N ? w + (n + np) * K : nullptr);
      if (next)
        for (int64_t k = 0; k < kc; k += 64) _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T1);
    }
    for (int64_t k = 0; k < kc; k += 64) {
      const int64_t left = kc - k;
      const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      __m512i rows[16], cols[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = nt + j < N ? _mm512_maskz_loadu_epi8(mask, w + (nt + j) * K + k0 + k) : _mm512_setzero_si512();
      transpose_pairs16x32(rows, cols);
      uint32_t* tile = bt + (t * kbs + k / 32) * 256;  // this 64-k step fills tiles k/32, k/32 + 1
      for (int q = 0; q < 16; ++q) {
        __m512i v[2];
        dec.decode(cols[q], v);  // v[0] = pair row 2q, v[1] = pair row 2q + 1
        uint32_t* o = tile + (2 * q / 16) * 256 + (2 * q % 16) * 16;
        _mm512_storeu_si512(o, v[0]);
        _mm512_storeu_si512(o + 16, v[1]);
      }
    }
  }
}

// y[m, n..n+15] = bf16(v * scale + bias) for the columns < N; rows m >= M (padding) are skipped.
// Same operations and rounding as the op's scalar epilogue (ops.cpp) and numerics.w8a16_linear.
inline void store_bf16_row(const Bf16Epilogue& ep, int64_t N, int64_t m, int64_t n, __m512 v) {
  if (m >= ep.M) return;
  const __mmask16 cols = N - n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
  v = _mm512_mul_ps(v, ep.per_channel ? _mm512_maskz_loadu_ps(cols, ep.scale + n) : _mm512_set1_ps(ep.scale[0]));
  if (ep.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(cols, ep.bias + n));
  // Round to nearest even on the bits (c10::BFloat16): add 0x7FFF + the kept lsb, keep the top
  // half; NaN becomes the canonical 0x7FC0.
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(ep.y + m * N + n, cols, _mm512_cvtepi32_epi16(h));
}

}  // namespace

// x [M, K] bf16 (row stride ld) -> A tiles: tile (i, kb) = rows 16i.., k 32kb.. at
// out + (i * Kp / 32 + kb) * 512, each 16 rows of 32 bf16 (64 bytes), zero-padded to Mp x Kp.
// Contiguous tiles load without TLB walks or cache-set conflicts (a row-major x with a
// power-of-two row stride puts all 16 rows of a tile in one L1 set).
void pack_a_amx(const uint16_t* x, int64_t M, int64_t K, int64_t ld, int64_t i0, int64_t i1,
                int64_t Kp, uint16_t* out) {
  const int64_t kbs = Kp / 32;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t m = 16 * i + r;
      uint16_t* o = out + i * kbs * 512 + r * 32;
      if (m >= M) {
        for (int64_t kb = 0; kb < kbs; ++kb) std::memset(o + kb * 512, 0, 64);
        continue;
      }
      const uint16_t* xr = x + m * ld;
      for (int64_t kb = 0; kb < kbs; ++kb) {
        const int64_t left = K - 32 * kb;
        const __mmask32 mask = left >= 32 ? ~__mmask32(0) : (left <= 0 ? 0 : (__mmask32(1) << left) - 1);
        _mm512_storeu_si512(o + kb * 512, _mm512_maskz_loadu_epi16(mask, xr + 32 * kb));
      }
    }
}

int64_t amx_panel_rows() { return kNP; }

// D[m, n] for m < Mp (multiple of 32), n in panels [p0, p1) of kNP rows. x: the activations
// as pack_a_amx's tiles with Kp = ldx (K rounded up to 64). D: fp32, row stride ldd >= N rounded
// up to 16 (not a multiple of 4 KiB, for the same set-conflict reason). Block scales: D = sum over K blocks of s[n / bn][kb] * partial sum;
// blk_bk must then be a multiple of 32 (chunks follow the blocks).
void gemm_amx(const uint16_t* x, int64_t ldx, int64_t Mp, const uint8_t* w, int64_t N, int64_t K,
              int64_t p0, int64_t p1, float* D, int64_t ldd, const float* blk_s, int64_t blk_bn,
              int64_t blk_bk, const Bf16Epilogue& ep) {
  const Bf16Decoder dec;
  configure_tiles();
  const int64_t kbx = ldx / 32;  // A tiles per 16-row block of x
  const bool block = blk_s != nullptr;
  const int64_t KC = block ? blk_bk : kKC;
  const int64_t kb_total = (K + blk_bk - 1) / std::max<int64_t>(blk_bk, 1);
  const int64_t kcmax = (std::min(KC, K) + 63) / 64 * 64;
  const int64_t NB = amx_panel_rows();
  std::vector<uint32_t> bt(NB / 16 * (kcmax / 32) * 256 + 16);
  alignas(64) float ctmp[16 * 16];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * NB;
    const int64_t np = std::min<int64_t>(NB, (N - n0 + 15) / 16 * 16);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const int64_t kbs = (kc + 63) / 64 * 2;  // 32-wide k steps (kc padded to 64 in pack_b)
      pack_b(dec, w, N, K, n0, np, k0, kc, bt.data());
      const bool first = k0 == 0, last = k0 + kc >= K;
      for (int64_t m = 0; m < Mp; m += 32) {
        const uint16_t* a0 = x + ((m / 16) * kbx + k0 / 32) * 512;  // packed A tiles (pack_a_amx)
        const uint16_t* a1 = a0 + kbx * 512;
        for (int64_t t = 0; t < np / 16; t += 2) {
          float* c = D + m * ldd + n0 + 16 * t;
          const bool two = t + 1 < np / 16;
          if (first || block) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          } else {
            _tile_loadd(0, c, ldd * 4);
            _tile_loadd(2, c + 16 * ldd, ldd * 4);
            if (two) {
              _tile_loadd(1, c + 16, ldd * 4);
              _tile_loadd(3, c + 16 * ldd + 16, ldd * 4);
            }
          }
          const uint32_t* b0 = bt.data() + t * kbs * 256;
          const uint32_t* b1 = b0 + kbs * 256;
          for (int64_t kb = 0; kb < kbs; ++kb) {
            _tile_loadd(4, a0 + 512 * kb, 64);
            _tile_loadd(5, a1 + 512 * kb, 64);
            _tile_loadd(6, b0 + kb * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (two) {
              _tile_loadd(7, b1 + kb * 256, 64);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
          if (!block && last) {  // final sums: straight through the epilogue into y
            for (int q = 0; q < (two ? 4 : 2); ++q) {
              const int im = q & 1, in = q >> 1;
              switch (q) {
                case 0: _tile_stored(0, ctmp, 64); break;
                case 1: _tile_stored(2, ctmp, 64); break;
                case 2: _tile_stored(1, ctmp, 64); break;
                default: _tile_stored(3, ctmp, 64); break;
              }
              for (int r = 0; r < 16; ++r)
                store_bf16_row(ep, N, m + 16 * im + r, n0 + 16 * (t + in), _mm512_load_ps(ctmp + 16 * r));
            }
            continue;
          }
          if (!block) {
            _tile_stored(0, c, ldd * 4);
            _tile_stored(2, c + 16 * ldd, ldd * 4);
            if (two) {
              _tile_stored(1, c + 16, ldd * 4);
              _tile_stored(3, c + 16 * ldd + 16, ldd * 4);
            }
            continue;
          }
          // Block scales: D (+)= s[n / bn][k0 / bk] * C, per column n of each C tile.
          const int64_t kbi = k0 / blk_bk;
          for (int q = 0; q < (two ? 4 : 2); ++q) {
            const int im = q & 1, in = q >> 1;  // q: tile 0 (m0,n0), 2 (m1,n0), 1 (m0,n1), 3 (m1,n1)
            switch (q) {
              case 0: _tile_stored(0, ctmp, 64); break;
              case 1: _tile_stored(2, ctmp, 64); break;
              case 2: _tile_stored(1, ctmp, 64); break;
              default: _tile_stored(3, ctmp, 64); break;
            }
            alignas(64) float sv[16];
            for (int j = 0; j < 16; ++j) {
              const int64_t n = std::min(n0 + 16 * (t + in) + j, N - 1);
              sv[j] = blk_s[(n / blk_bn) * kb_total + kbi];
            }
            const __m512 s = _mm512_load_ps(sv);
            float* cq = c + 16 * im * ldd + 16 * in;
            for (int r = 0; r < 16; ++r) {
              __m512 v = _mm512_mul_ps(_mm512_load_ps(ctmp + 16 * r), s);
              if (!first) v = _mm512_add_ps(_mm512_loadu_ps(cq + r * ldd), v);
              if (last)
                store_bf16_row(ep, N, m + 16 * im + r, n0 + 16 * (t + in), v);
              else
                _mm512_storeu_ps(cq + r * ldd, v);
            }
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace fp8_backend

#pragma GCC pop_options
