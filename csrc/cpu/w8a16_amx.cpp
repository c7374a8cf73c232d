// W8A16 GEMM on AMX-BF16 tiles (Sapphire Rapids and newer) for bf16 activations at larger M. FP8 e4m3 values are exact in bf16, and the
// product of two bf16 values is exact in fp32, so the tile GEMM computes the same fp32-accumulated
// dot products as numerics.w8a16_linear (in another summation order; the hardware flushes fp32
// subnormal sums and bf16 subnormal inputs to zero, below 2^-126 — far under any tolerance).
//
// Small M stays on the VBMI fp32 GEMV: a vdpbf16ps GEMV over the same byte-LUT decode was
// measured slower at every M from 1 to 64 on Sapphire Rapids (the decode's shuffles and the
// dot products compete for one port), so it is not shipped.
//  * gemm_amx (M >= amx_min_m, compute-bound) computes D^T = W x^T so that the weights are the A
//    operand: AMX's A tiles are plain rows (16 rows x 32 bf16), so each FP8 weight row is only
//    decoded (no transpose), once per call; the activations, M x K instead of N x K, take the
//    transpose into B's pair-interleaved ("VNNI") layout, once per call (pack_x_vnni). 16x16 fp32
//    C tiles (n rows x m columns) accumulate in D^T; the last K chunk transposes each C tile back
//    and runs the epilogue (scale, bias, bf16) into y.
//
// The scalar reference is w8a16_portable.cpp (e4m3fn_to_float); tests compare all paths with
// numerics.py. Everything here is compiled for AVX-512/AMX and called only after CPUID checks.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fp8_e4m3.h"
#include "huge_buffer.h"
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

// Tiles 0-3: C (16 weight rows n x 16 fp32 activation rows m), 4-5: A (16 weight rows x 32 bf16
// k), 6-7: B (16 rows of k pairs x 16 activation rows, bf16 pairs).

constexpr int64_t kKC = 256;  // k per chunk when K > 2048

// 16 rows of 16 dwords: out row r = column r of in (in row stride = in_ld dwords).
inline void transpose16x16(const uint32_t* in, int64_t in_ld, uint32_t* out) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * in_ld);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + j] holds, in 128-bit lane L, row-quad q's column 4L + c(j) with c = 0, 1, 2, 3 for
  // j = 0, 1, 2, 3. Gather the four lanes L of rows q = 0..3 into output row 4L + c(j).
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);       // q0 L0, q0 L2, q1 L0, q1 L2
    const __m512i b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);       // q0 L1, q0 L3, q1 L1, q1 L3
    const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);  // q2 L0, q2 L2, q3 L0, q3 L2
    const __m512i d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
    _mm512_storeu_si512(out + (0 + j) * 16, _mm512_shuffle_i32x4(a, c, 0x88));   // L0 of q0..q3
    _mm512_storeu_si512(out + (8 + j) * 16, _mm512_shuffle_i32x4(a, c, 0xDD));   // L2
    _mm512_storeu_si512(out + (4 + j) * 16, _mm512_shuffle_i32x4(b, d, 0x88));   // L1
    _mm512_storeu_si512(out + (12 + j) * 16, _mm512_shuffle_i32x4(b, d, 0xDD));  // L3
  }
}

// Decode weight rows [n0, n0 + np) x k [k0, k0 + kc) into A tiles: tile (t, kb) for n-tile t and
// 32-wide k step kb at wa + (t * kbs + kb) * 512, row j = bf16 w[n0 + 16t + j][k0 + 32kb ..
// + 31]. Rows >= N and k >= K are zero.
void decode_w_tiles(const Bf16Decoder& dec, const uint8_t* w, int64_t N, int64_t K, int64_t n0,
                    int64_t np, int64_t k0, int64_t kc, uint16_t* wa) {
  const int64_t kbs = (kc + 63) / 64 * 2;
  for (int64_t t = 0; t < np / 16; ++t)
    for (int j = 0; j < 16; ++j) {
      const int64_t n = n0 + 16 * t + j;
      uint16_t* o = wa + t * kbs * 512 + 32 * j;
      if (n >= N) {
        for (int64_t kb = 0; kb < kbs; ++kb) std::memset(o + kb * 512, 0, 64);
        continue;
      }
      const uint8_t* wr = w + n * K + k0;
      // Rows are read in kc-byte pieces, too short for the hardware prefetcher: fetch this
      // row's next piece (or, on the last one, the row a panel further on) into L2 now.
      const uint8_t* next = k0 + kc < K ? wr + kc : (n + np < N ? w + (n + np) * K : nullptr);
      if (next)
        for (int64_t k = 0; k < kc; k += 64) _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T1);
      for (int64_t k = 0; k < kc; k += 64) {
        const int64_t left = kc - k;
        const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
        __m512i v[2];
        dec.decode64(wr + k, mask, v);
        _mm512_storeu_si512(o + (k / 32) * 512, v[0]);
        _mm512_storeu_si512(o + (k / 32 + 1) * 512, v[1]);
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

// A final 16x16 block of D^T (rows n0.., columns m0.., row stride 16) through the epilogue.
inline void epilogue_block(const Bf16Epilogue& ep, int64_t N, int64_t n0, int64_t m0, const float* c) {
  alignas(64) float ct[16 * 16];
  transpose16x16(reinterpret_cast<const uint32_t*>(c), 16, reinterpret_cast<uint32_t*>(ct));
  for (int r = 0; r < 16; ++r) store_bf16_row(ep, N, m0 + r, n0, _mm512_load_ps(ct + 16 * r));
}

}  // namespace

// x [M, K] bf16 (row stride ld) -> B tiles in AMX's pair layout: tile (i, kb) for rows 16i..
// and k 32kb.. at out + (i * Kp / 32 + kb) * 256 dwords, dword [r][j] = bf16 pair
// (x[16i + j][32kb + 2r], x[16i + j][32kb + 2r + 1]); zero-padded to 16-row tiles and Kp.
void pack_x_vnni(const uint16_t* x, int64_t M, int64_t K, int64_t ld, int64_t i0, int64_t i1,
                 int64_t Kp, uint32_t* out) {
  const int64_t kbs = Kp / 32;
  alignas(64) uint16_t rows[16 * 32];
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t kb = 0; kb < kbs; ++kb) {
      const int64_t left = K - 32 * kb;
      const __mmask32 mask = left >= 32 ? ~__mmask32(0) : (left <= 0 ? 0 : (__mmask32(1) << left) - 1);
      for (int j = 0; j < 16; ++j) {
        const int64_t m = 16 * i + j;
        _mm512_store_si512(rows + 32 * j, m < M ? _mm512_maskz_loadu_epi16(mask, x + m * ld + 32 * kb)
                                                : _mm512_setzero_si512());
      }
      transpose16x16(reinterpret_cast<const uint32_t*>(rows), 16, out + (i * kbs + kb) * 256);
    }
}

AmxBlocking amx_blocking(int64_t Mp, int64_t K, int64_t N, int threads) {
  // Whole K per chunk when it is small (no partial sums through memory); otherwise kKC: the
  // activation tiles of one 32-row block for one chunk (2 x kc / 32 KiB) then stay in L1 while
  // every weight tile of the panel passes (measured: whole-K chunks of 2048 were 10-25% slower).
  const int64_t Kp = (K + 63) / 64 * 64;
  const int64_t kc = Kp <= 1024 ? Kp : kKC;
  // Rows of x per block: its tiles for one chunk (mc * kc * 2 bytes) stay in L2 while every
  // weight panel passes; each block decodes the weights again, so blocks are as tall as that allows.
  const int64_t mc = std::min<int64_t>(Mp, 512);
  // Weight rows per panel: x is re-read once per panel, so panels are as wide as allowed by
  // (a) the decoded chunk (nb * kc * 2 bytes <= 256 KiB) and
  // (b) when K is chunked, the panel's fp32 partial sums (nb * mc * 4 <= 512 KiB), which must
  // stay in L2 between chunks (measured at M = 512, K = 4096: 512-row panels, 1 MiB of partial
  // sums, were 10-15% slower than 256). Their number is a multiple of the thread count and they
  // are equal (to 16 rows) so that the threads get equal shares.
  int64_t nb_max = (256 << 10) / (kc * 2);
  if (kc < Kp) nb_max = std::min<int64_t>(nb_max, (512 << 10) / (mc * 4));
  nb_max = std::clamp<int64_t>(nb_max / 16 * 16, 32, 512);
  const int64_t t = std::max(threads, 1);
  const int64_t panels = t * ((N + t * nb_max - 1) / (t * nb_max));
  const int64_t nb = std::max<int64_t>(16, ((N + panels - 1) / panels + 15) / 16 * 16);
  return {mc, nb, kc};
}

// y = epilogue(x W^T) for weight rows in panels [p0, p1) of nb rows, K in chunks of kc
// (amx_blocking). x: pack_x_vnni's tiles for Mp rows (a multiple of 32) and Kp = ldx (K rounded
// up to 64). The fp32 partial sums D^T of a panel live between K chunks in a per-thread scratch
// (nb rows, reused by every panel, so it stays in L2). Block scales: D = sum over K blocks of
// s[n / bn][kb] * partial sum; blk_bk must then be a multiple of 64 (chunks follow the blocks).
void gemm_amx(const uint16_t* x, int64_t ldx, int64_t Mp, const uint8_t* w, int64_t N, int64_t K,
              int64_t nb, int64_t kc, int64_t p0, int64_t p1, const float* blk_s, int64_t blk_bn,
              int64_t blk_bk, const Bf16Epilogue& ep) {
  const Bf16Decoder dec;
  configure_tiles();
  const uint32_t* xv = reinterpret_cast<const uint32_t*>(x);
  const int64_t kbx = ldx / 32;  // B tiles per 16-row block of x
  const bool block = blk_s != nullptr;
  const int64_t KC = block ? blk_bk : kc;
  const int64_t kb_total = (K + blk_bk - 1) / std::max<int64_t>(blk_bk, 1);
  const int64_t kcmax = (std::min(KC, K) + 63) / 64 * 64;
  // Partial sums: row stride ldd >= Mp, not a multiple of 1 KiB, so that a tile's 16 rows fall
  // in different L1 sets.
  const int64_t ldd = (Mp * 4) % 1024 == 0 ? Mp + 16 : Mp;
  // Per-thread scratch, kept between calls: the panel's partial sums (row n - n0 of the current
  // panel) and its decoded weight chunk, in one block of huge pages (see HugeBuffer).
  static thread_local HugeBuffer scratch;
  const size_t d_bytes = (nb * ldd * 4 + 4095) / 4096 * 4096;
  char* base = static_cast<char*>(scratch.get(d_bytes + nb / 16 * (kcmax / 32) * 1024));
  float* const Dt = reinterpret_cast<float*>(base);
  uint16_t* const wa = reinterpret_cast<uint16_t*>(base + d_bytes);
  alignas(64) float ctmp[16 * 16];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * nb;
    const int64_t np = std::min<int64_t>(nb, (N - n0 + 15) / 16 * 16);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const int64_t kbs = (kc + 63) / 64 * 2;  // 32-wide k steps (kc padded to 64)
      decode_w_tiles(dec, w, N, K, n0, np, k0, kc, wa);
      const bool first = k0 == 0, last = k0 + kc >= K;
      for (int64_t m = 0; m < Mp; m += 32) {
        const uint32_t* b0 = xv + ((m / 16) * kbx + k0 / 32) * 256;  // activation rows m..m+15
        const uint32_t* b1 = b0 + kbx * 256;                         // m+16..m+31
        for (int64_t t = 0; t < np / 16; t += 2) {
          // C tiles: 0 = (n-tile t, m..), 1 = (t, m+16..), 2 = (t+1, m..), 3 = (t+1, m+16..)
          float* c = Dt + 16 * t * ldd + m;
          const bool two = t + 1 < np / 16;
          if (first || block) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          } else {
            _tile_loadd(0, c, ldd * 4);
            _tile_loadd(1, c + 16, ldd * 4);
            if (two) {
              _tile_loadd(2, c + 16 * ldd, ldd * 4);
              _tile_loadd(3, c + 16 * ldd + 16, ldd * 4);
            }
          }
          const uint16_t* a0 = wa + t * kbs * 512;
          const uint16_t* a1 = a0 + kbs * 512;
          for (int64_t kb = 0; kb < kbs; ++kb) {
            _tile_loadd(4, a0 + kb * 512, 64);
            _tile_loadd(6, b0 + kb * 256, 64);
            _tile_loadd(7, b1 + kb * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (two) {
              _tile_loadd(5, a1 + kb * 512, 64);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
          if (!block && !last) {
            _tile_stored(0, c, ldd * 4);
            _tile_stored(1, c + 16, ldd * 4);
            if (two) {
              _tile_stored(2, c + 16 * ldd, ldd * 4);
              _tile_stored(3, c + 16 * ldd + 16, ldd * 4);
            }
            continue;
          }
          for (int q = 0; q < (two ? 4 : 2); ++q) {
            const int in = q >> 1, im = q & 1;  // tile q: n-tile t + in, activation rows m + 16 im
            switch (q) {
              case 0: _tile_stored(0, ctmp, 64); break;
              case 1: _tile_stored(1, ctmp, 64); break;
              case 2: _tile_stored(2, ctmp, 64); break;
              default: _tile_stored(3, ctmp, 64); break;
            }
            const int64_t nt = n0 + 16 * (t + in);
            float* cq = c + 16 * in * ldd + 16 * im;
            if (block) {
              // D^T (+)= s[n / bn][k0 / bk] * C: one scale per row n of the tile.
              const int64_t kbi = k0 / blk_bk;
              for (int r = 0; r < 16; ++r) {
                const int64_t n = std::min(nt + r, N - 1);
                __m512 v = _mm512_mul_ps(_mm512_load_ps(ctmp + 16 * r), _mm512_set1_ps(blk_s[(n / blk_bn) * kb_total + kbi]));
                if (!first) v = _mm512_add_ps(_mm512_loadu_ps(cq + r * ldd), v);
                if (last)
                  _mm512_store_ps(ctmp + 16 * r, v);
                else
                  _mm512_storeu_ps(cq + r * ldd, v);
              }
              if (!last) continue;
            }
            epilogue_block(ep, N, nt, m + 16 * im, ctmp);  // final sums: into y
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace fp8_backend

#pragma GCC pop_options
