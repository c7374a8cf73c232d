// AMX-BF16 decode attention over FP8 (e4m3 / e5m2) caches: attend_amx's kernel for tasks of one
// kv head and its query heads over one token or a few (attention_amx.cpp has the general path and
// the reasoning why the tile products are exact fp32 products).
//
// Taken by a task whose rows fit one row group with room for every probability part in one P
// tile (nsq * R <= 16 score columns, pp * R <= 16 probability rows), FP8 cache, D % 64 == 0.
// Same arithmetic as attention_amx.cpp's attend_task (exact bf16 parts, fp32 accumulation, lazy
// rescaling), organised for one group:
//  - steps of 32 keys (never crossing a cache block); per step, decoded K (8 KB at D = 128) and
//    V pairs (8 KB) stay in L1, double-buffered;
//  - scores C[16 keys x nc] with nc = the score columns rounded up to a power of two, stored
//    compactly ([key][nc], 16 / nc keys per vector), so the softmax works on full vectors
//    without gathers; probabilities are transposed to P rows with word permutes;
//  - V pairs decoded in an interleaved column order (see DecBuf) that needs no byte permute: two
//    rows' bytes are interleaved by unpacklo/hi, which the decoder's own unpacks keep; the
//    accumulator columns follow that order and are put back in the epilogue;
//  - software pipelining across steps, each iteration in the order: softmax of step s; K of
//    step s + 2 decoded (vector unit) with step s + 1's scores issued along the way (tile
//    unit); V of step s + 1 decoded with step s's P x V issued along the way. Every tile load
//    reads data stored a phase earlier and the softmax reads scores stored a phase earlier, so
//    neither unit waits for the other's latest stores;
//  - the rows of the step kPfSteps ahead are prefetched into L2 during the V decode.
// Called only through attend_amx (CPUID and tile permission checked by the op layer).
// Tiles: 0, 1 scores C [16 x nc*4 B]; 2, 3 K rows A / V pairs B [16 x 64 B]; 4 Q^T B
// [16 x nc*4 B]; 5 P A [prow x 64 B]; 6, 7 accumulators C [prow x 64 B].
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "attention.h"
#include "fp8_e4m3.h"

// Everything below is compiled for AMX / AVX-512; no header may be included after this point.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,amx-tile,amx-bf16,fma")

#include "attention_amx_common.h"

namespace fp8_backend {
namespace {

constexpr int kDS = 32;       // keys per decode step: one P tile
constexpr int kPfSteps = 4;   // prefetch distance in steps

struct DecBuf {
  // K rows (slots 0, 1: [key][d]) and V pairs (slots 2, 3: [pair][col][2], accumulator column
  // order), each slot kDS * D words, packed so that a small head size uses a small part of L1.
  // Accumulator column order: within each 64-d group, d = 16 L + 4 w + q sits in column
  // 16 w + 4 L + q (the order dec_v's unpacks produce; the epilogue puts d back in place).
  alignas(64) uint16_t kv[4 * kDS * kMaxD];
  alignas(64) uint16_t qt[kMaxD / 32 * 16 * 32];     // Q^T per 32-d chunk [d pair][nc][2]
  alignas(64) float s[2][kDS * 16];                  // scores [key][nc]
  alignas(64) uint16_t w[3][kDS * 16];               // probability parts, compact [key][nc] (bf16)
  alignas(64) uint16_t p[2][16 * kDS];               // P rows [part * R + row][key]
  alignas(64) float pf[kDS * 16];                    // fp32 probabilities [key][nc] (fallback)
  alignas(64) float o[16 * kMaxD];                   // accumulators [part * R + row][col]
};

struct Dec {
  const AttnTask& a;
  const Decoder& dec;
  DecBuf& b;
  int64_t D;
  int R, nsq, pp, nc, prow;
};

inline uint16_t* kbuf(const Dec& c, int slot) { return c.b.kv + slot * kDS * c.D; }
inline uint16_t* vbuf(const Dec& c, int slot) { return c.b.kv + (2 + slot) * kDS * c.D; }

// Step of keys starting at t: up to kDS keys, never crossing a cache block, before hi.
inline int step_len(int64_t t, int64_t bs, int64_t hi) {
  int64_t n = bs - t % bs;
  if (n > kDS) n = kDS;
  if (n > hi - t) n = hi - t;
  return static_cast<int>(n);
}

// Tile work is interleaved with the vector decode below, a few tile instructions every few rows:
// the tile unit runs them in order, each waiting for the previous ones, and a long burst of them
// fills the reorder buffer so that the vector work behind them stalls as well.

// Scores of step `slot` (n keys, K rows in kbuf(slot)), 32-d chunk kc: two 16-key C tiles.
inline void qk_chunk(const Dec& c, int n, int slot, int64_t kc) {
  const int64_t D = c.D;
  const uint16_t* k = kbuf(c, slot);
  if (kc == 0) {
    _tile_zero(0);
    _tile_zero(1);
  }
  _tile_loadd(4, c.b.qt + kc * 16 * c.nc * 2, c.nc * 4);
  _tile_loadd(2, k + 32 * kc, D * 2);
  _tile_dpbf16ps(0, 2, 4);
  if (n > 16) {
    _tile_loadd(3, k + 16 * D + 32 * kc, D * 2);
    _tile_dpbf16ps(1, 3, 4);
  }
}

inline void qk_store(const Dec& c, int n, int slot) {
  _tile_stored(0, c.b.s[slot], c.nc * 4);
  if (n > 16) _tile_stored(1, c.b.s[slot] + 16 * c.nc, c.nc * 4);
}

// O += P x V of step `slot`, accumulator columns [32 ch, 32 ch + 32) (P already in tile 5).
inline void pv_chunk(const Dec& c, int slot, int64_t ch) {
  const int64_t D = c.D;
  float* o = c.b.o + 32 * ch;
  const uint16_t* v = vbuf(c, slot) + 64 * ch;
  _tile_loadd(6, o, D * 4);
  _tile_loadd(7, o + 16, D * 4);
  _tile_loadd(2, v, D * 4);
  _tile_dpbf16ps(6, 5, 2);
  _tile_loadd(3, v + 32, D * 4);
  _tile_dpbf16ps(7, 5, 3);
  _tile_stored(6, o, D * 4);
  _tile_stored(7, o + 16, D * 4);
}

// K rows of keys [t, t + n) -> kbuf(slot) (lane order, see k_order), with the scores of the step
// in kbuf(qslot) (qn keys; none if qn == 0) issued along the way, from row `from` on, and
// stored at the end.
void dec_k(const Dec& c, int64_t t, int n, int slot, int qslot, int qn, int from = 0) {
  const AttnTask& a = c.a;
  const int64_t bs = a.block_size, nch = c.D / 32;
  const int every = static_cast<int>((kDS - from) / nch) > 0 ? static_cast<int>((kDS - from) / nch) : 1;
  int64_t kc = 0;
  if (n > 0) {
    const uint8_t* src = a.kc + a.blocks[t / bs] * a.k_blk + (t % bs) * a.k_tok;
    uint16_t* dst = kbuf(c, slot);
    const Decoder dec = c.dec;  // a local copy stays in registers (stores may alias c.dec)
    const int64_t tok = a.k_tok, D = c.D;
    for (int j = 0; j < n; ++j) {
      if (qn > 0 && j >= from && (j - from) % every == 0 && kc < nch) qk_chunk(c, qn, qslot, kc++);
      const uint8_t* r = src + j * tok;
      uint16_t* o = dst + j * D;
      for (int64_t d = 0; d < D; d += 64) {
        __m512i w[2];
        dec.words(_mm512_loadu_si512(r + d), w);
        _mm512_storeu_si512(o + d, w[0]);
        _mm512_storeu_si512(o + d + 32, w[1]);
      }
    }
  }
  if (qn > 0) {
    while (kc < nch) qk_chunk(c, qn, qslot, kc++);
    qk_store(c, qn, qslot);
  }
}

// V rows of keys [t, t + n) -> vbuf(slot) as pairs (keys 2r, 2r + 1 interleaved, accumulator column
// order), pairs past n zero (their probabilities are 0, and 0 x NaN would be NaN); with P x V
// of step pslot (if pv) issued along the way. Prefetches into L2 the K and V rows of the keys
// starting at tp (np of them), spread over the decode.
void dec_v(const Dec& c, int64_t t, int n, int slot, int64_t tp, int np, bool pv, int pslot) {
  const AttnTask& a = c.a;
  const int64_t bs = a.block_size, D = c.D, nch = D / 32;
  const uint8_t* pk = nullptr;
  const uint8_t* pvr = nullptr;
  if (np > 0) {
    pk = a.kc + a.blocks[tp / bs] * a.k_blk + (tp % bs) * a.k_tok;
    pvr = a.vc + a.blocks[tp / bs] * a.v_blk + (tp % bs) * a.v_tok;
  } else if (a.next_k && n > 0) {
    // past this task's keys: the next task's first rows (tp - hi of them are skipped)
    const int64_t hi = a.pos[a.R - 1] + 1, skip = tp - hi > 0 ? tp - hi : 0;
    if (skip < a.next_n) {
      pk = a.next_k + skip * a.k_tok;
      pvr = a.next_v + skip * a.v_tok;
      np = static_cast<int>(a.next_n - skip < kDS ? a.next_n - skip : kDS);
    }
  }
  // P x V chunks spread over the pairs (P was stored by the softmax before the K decode).
  const int every = static_cast<int>(kDS / 2 / nch) > 0 ? static_cast<int>(kDS / 2 / nch) : 1;
  int64_t ch = 0;
  if (n > 0) {
    const uint8_t* src = a.vc + a.blocks[t / bs] * a.v_blk + (t % bs) * a.v_tok;
    uint16_t* dst = vbuf(c, slot);
    const __m512i zero = _mm512_setzero_si512();
    const Decoder dec = c.dec;  // a local copy stays in registers (stores may alias c.dec)
    for (int r = 0; r < kDS / 2; ++r) {
      if (pv && r % every == 0 && ch < nch) {
        if (ch == 0) _tile_loadd(5, c.b.p[pslot], 64);
        pv_chunk(c, pslot, ch++);
      }
      for (int j = 2 * r; j < 2 * r + 2 && j < np; ++j)
        for (int64_t d = 0; d < D; d += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(pk + j * a.k_tok + d), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(pvr + j * a.v_tok + d), _MM_HINT_T1);
        }
      uint16_t* o = dst + r * 2 * D;
      if (2 * r >= n) {
        for (int64_t d = 0; d < 2 * D; d += 32) _mm512_storeu_si512(o + d, zero);
        continue;
      }
      const uint8_t* ra = src + (2 * r) * a.v_tok;
      const bool hb = 2 * r + 1 < n;
      for (int64_t d = 0; d < D; d += 64) {
        const __m512i va = _mm512_loadu_si512(ra + d);
        const __m512i vb = hb ? _mm512_loadu_si512(ra + a.v_tok + d) : zero;
        __m512i w[2];
        dec.words(_mm512_unpacklo_epi8(va, vb), w);  // d = 16 L + 0..3 (w[0]), 16 L + 4..7 (w[1])
        _mm512_storeu_si512(o + 2 * d, w[0]);
        _mm512_storeu_si512(o + 2 * d + 32, w[1]);
        dec.words(_mm512_unpackhi_epi8(va, vb), w);  // d = 16 L + 8..11, 16 L + 12..15
        _mm512_storeu_si512(o + 2 * d + 64, w[0]);
        _mm512_storeu_si512(o + 2 * d + 96, w[1]);
      }
    }
  }
  if (pv) {
    if (ch == 0) _tile_loadd(5, c.b.p[pslot], 64);
    while (ch < nch) pv_chunk(c, pslot, ch++);
  }
}

// Per-task softmax state, in the compact layout (lane l: key slot l / nc, column l % nc; row i
// is column i once the query parts are summed).
struct DecState {
  __m512i slot;          // key slot of each lane
  __m512i lo, hi;        // per lane: keys [lo, hi) its row sees (empty for columns >= R)
  __m512i part_idx[2];   // lane l -> lane l + k R (query part k + 1 of the same row)
  __m512i red[4];        // lane l -> lane l ^ (nc << i): reduction across key slots
  int nred;
  __m512 m;              // running max per lane (-inf: nothing seen yet)
  __m512 l;              // softmax denominators, per lane (summed across key slots at the end)
  int64_t row_lo[16], row_hi[16];
  int64_t all_lo, all_hi;  // keys [all_lo, all_hi) are seen by every row
  __m512i tr_idx[8];     // P transpose: word permutes of compact word vector pairs (see dec_softmax)
  __mmask32 tr_mask[8];
};

// Does a row see only part of the keys [t0, t0 + n)?
inline bool dec_partial(const DecState& st, int64_t t0, int n) { return t0 < st.all_lo || t0 + n > st.all_hi; }

// Softmax of step s (scores in b.s[slot], keys [t0, t0 + n); `partial`: dec_partial of the
// step): probabilities as P rows in b.p[slot] (PP bf16 parts each), accumulators rescaled where
// the max moved; with `rows`, also the fp32 probabilities in b.pf (for dec_pv_rows).
template <int PP>
void dec_softmax(const Dec& c, DecState& st, int64_t t0, int n, int slot, bool partial, bool rows) {
  const AttnTask& a = c.a;
  DecBuf& b = c.b;
  const int nc = c.nc, R = c.R, nz = kDS * nc / 16;  // score vectors in the step
  const int kpz = 16 / nc;                            // keys per vector
  const float* s = b.s[slot];
  const bool masked = partial || n < kDS;  // else every lane of every vector is a seen key
  const __m512 qks = _mm512_set1_ps(a.qk_scale);
  __m512 sv[32];
  __mmask16 mk[32];
  __m512 mx = _mm512_set1_ps(-__builtin_inff());
  for (int z = 0; z < nz; ++z) {
    mk[z] = 0xFFFF;
    if (masked) {
      const __m512i key = _mm512_add_epi32(st.slot, _mm512_set1_epi32(static_cast<int>(t0) + z * kpz));
      mk[z] = _mm512_cmpge_epi32_mask(key, st.lo) & _mm512_cmplt_epi32_mask(key, st.hi) &
              _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(t0) + n));
    }
    __m512 x = _mm512_loadu_ps(s + 16 * z);
    __m512 acc = x;
    for (int k = 1; k < c.nsq; ++k) acc = _mm512_add_ps(acc, _mm512_permutexvar_ps(st.part_idx[k - 1], x));
    sv[z] = _mm512_mul_ps(acc, qks);
    mx = _mm512_mask_max_ps(mx, mk[z], sv[z], mx);  // NaN scores are skipped (as attend_task)
  }
  for (int i = 0; i < st.nred; ++i) mx = _mm512_max_ps(mx, _mm512_permutexvar_ps(st.red[i], mx));
  // The lazy-rescaling decision of softmax_rows, per lane (every lane of a column holds its row's
  // max): a row seeing its first keys takes m = mx (alpha = 0 would scale zero accumulators: not
  // needed); a row whose max grew by more than kSlack rescales by alpha = exp(m_old - mx); else
  // m stays. Rows that see no key of the step (mx = -inf) keep m.
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  const __m512i t0v = _mm512_set1_epi32(static_cast<int>(t0));
  const __mmask16 seen = _mm512_cmplt_epi32_mask(st.lo, _mm512_add_epi32(t0v, _mm512_set1_epi32(n))) &
                         _mm512_cmpgt_epi32_mask(st.hi, t0v);
  const __mmask16 first = seen & _mm512_cmpeq_ps_mask(st.m, ninf);
  const __mmask16 grow = seen & ~first & _mm512_cmp_ps_mask(mx, _mm512_add_ps(st.m, _mm512_set1_ps(kSlack)), _CMP_GT_OQ);
  if (grow) {  // rare: rescale the accumulators and denominators of those rows
    const __m512 alpha = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), grow, exp512(_mm512_sub_ps(st.m, mx)));
    st.l = _mm512_mul_ps(st.l, alpha);
    alignas(64) float al[16];
    _mm512_store_ps(al, alpha);
    for (int i = 0; i < R; ++i) {
      if (!((grow >> i) & 1)) continue;  // lane i holds row i (column i, key slot 0)
      const __m512 av = _mm512_set1_ps(al[i]);
      for (int k = 0; k < PP; ++k) {
        float* o = b.o + (k * R + i) * c.D;
        for (int64_t d = 0; d < c.D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
      }
    }
  }
  // all scores NaN on a row's first keys: m = 0 (as softmax_rows)
  const __m512 mfirst = _mm512_mask_mov_ps(mx, _mm512_cmpeq_ps_mask(mx, ninf), _mm512_setzero_ps());
  st.m = _mm512_mask_mov_ps(_mm512_mask_mov_ps(st.m, grow, mx), first, mfirst);
  // Probabilities, bf16 parts in compact word order ([key][nc]).
  const __m512 mref = _mm512_mask_mov_ps(_mm512_setzero_ps(), _mm512_cmpneq_ps_mask(st.m, ninf), st.m);
  __m512 l = st.l;
  for (int z = 0; z < nz; z += 2) {  // nz is even; whole 64-byte word vectors are stored (a
                                      // later load spanning two stores could not be forwarded)
    __m512 e0 = _mm512_maskz_mov_ps(mk[z], exp512(_mm512_sub_ps(sv[z], mref)));
    __m512 e1 = _mm512_maskz_mov_ps(mk[z + 1], exp512(_mm512_sub_ps(sv[z + 1], mref)));
    l = _mm512_add_ps(l, _mm512_add_ps(e0, e1));
    if (rows) {
      _mm512_storeu_ps(b.pf + 16 * z, e0);
      _mm512_storeu_ps(b.pf + 16 * z + 16, e1);
    }
    for (int k = 0; k < PP; ++k) {
      const __m256i h0 = to_bf16(e0), h1 = to_bf16(e1);
      _mm512_store_si512(b.w[k] + 16 * z, _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1));
      e0 = _mm512_sub_ps(e0, from_bf16(h0));
      e1 = _mm512_sub_ps(e1, from_bf16(h1));
    }
  }
  // Transpose each part [32 keys][nc] -> R rows of 32 keys: row i = words j * nc + i. Word
  // vector pair (2q, 2q + 1) holds keys [q * 64 / nc, (q + 1) * 64 / nc); a two-source word
  // permute brings them to their place in the row (tr_idx[q] + i), masks merge the pairs.
  st.l = l;
  uint16_t* p = b.p[slot];
  for (int k = 0; k < PP; ++k) {
    const uint16_t* wk = b.w[k];
    for (int i = 0; i < R; ++i) {
      __m512i row;
      if (nc == 1) {
        row = _mm512_loadu_si512(wk);
      } else {
        const __m512i ii = _mm512_set1_epi16(static_cast<short>(i));
        row = _mm512_permutex2var_epi16(_mm512_loadu_si512(wk), _mm512_add_epi16(st.tr_idx[0], ii),
                                        _mm512_loadu_si512(wk + 32));
        for (int q = 1; q < nc / 2; ++q) {
          const __m512i x = _mm512_permutex2var_epi16(_mm512_loadu_si512(wk + 64 * q), _mm512_add_epi16(st.tr_idx[q], ii),
                                                      _mm512_loadu_si512(wk + 64 * q + 32));
          row = _mm512_mask_mov_epi16(row, st.tr_mask[q], x);
        }
      }
      _mm512_storeu_si512(p + (k * R + i) * kDS, row);
    }
  }
}

// Does V hold an Inf / NaN code in keys [t, t + n)?
bool dec_v_special(const Dec& c, int64_t t, int n) {
  const AttnTask& a = c.a;
  const int64_t bs = a.block_size;
  const uint8_t* src = a.vc + a.blocks[t / bs] * a.v_blk + (t % bs) * a.v_tok;
  __mmask64 any = 0;
  for (int j = 0; j < n; ++j)
    for (int64_t d = 0; d < c.D; d += 64) {
      const __m512i x = _mm512_and_si512(_mm512_loadu_si512(src + j * a.v_tok + d), c.dec.special);
      any |= _mm512_cmpeq_epi8_mask(x, c.dec.special);
    }
  return any != 0;
}

// P x V of such a step (its V pairs in vbuf(slot)) in fp32, row by row over the keys each row
// sees (b.pf): a NaN in a key a row does not see never reaches it (0 x NaN), and p x Inf stays
// Inf. Accumulator and V pair columns share one order.
void dec_pv_rows(const Dec& c, const DecState& st, int64_t t0, int n, int slot) {
  const int64_t D = c.D;
  const uint16_t* v = vbuf(c, slot);
  for (int i = 0; i < c.R; ++i) {
    const int64_t j0 = st.row_lo[i] > t0 ? st.row_lo[i] - t0 : 0;
    const int64_t j1 = st.row_hi[i] < t0 + n ? st.row_hi[i] - t0 : n;
    float* o = c.b.o + i * D;
    for (int64_t j = j0; j < j1; ++j) {
      const float pj = c.b.pf[j * c.nc + i];
      const uint16_t* vj = v + (j / 2) * 2 * D + (j & 1);  // key j's word in each pair
      for (int64_t col = 0; col < D; ++col) {
        const uint32_t bits = static_cast<uint32_t>(vj[2 * col]) << 16;
        float vf;
        std::memcpy(&vf, &bits, 4);
        o[col] += pj * vf;
      }
    }
  }
}

void attend_decode(const Dec& c) {
  const AttnTask& a = c.a;
  DecBuf& b = c.b;
  const int64_t D = c.D, bs = a.block_size;
  const int R = c.R, nc = c.nc, nsq = c.nsq;
  // Tile shapes depend on nc and prow only: configured once per (thread, op call) while they stay
  // the same (see amx_tiles_for / attend_amx_release).
  const int rows[8] = {16, 16, 16, 16, 16, c.prow, c.prow, c.prow};
  const int cols[8] = {4 * nc, 4 * nc, 64, 64, 4 * nc, 64, 64, 64};
  amx_tiles_for(1000 * nc + c.prow, rows, cols);

  // Q^T: column k R + i = bf16 part k of row i (scatter_qt); unused columns zero.
  std::memset(b.qt, 0, sizeof(uint16_t) * (D / 32) * 16 * nc * 2);
  alignas(64) float qo[kMaxD];
  for (int i = 0; i < R; ++i) scatter_qt(k_order(a.q + i * D, D, qo), D, nsq, nc, i, R, b.qt);
  std::memset(b.o, 0, sizeof(float) * c.prow * D);

  DecState st;
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i col = _mm512_and_si512(iota, _mm512_set1_epi32(nc - 1));  // column of each lane
  st.slot = _mm512_srli_epi32(iota, __builtin_ctz(nc));
  alignas(64) int32_t lo16[16], hi16[16];
  int64_t lo = INT64_MAX, hi = 0;
  st.all_lo = 0;
  st.all_hi = INT64_MAX;
  for (int i = 0; i < 16; ++i) {
    lo16[i] = INT32_MAX;
    hi16[i] = INT32_MIN;
  }
  for (int i = 0; i < R; ++i) {
    const int64_t p = a.pos[i];
    st.row_hi[i] = p + 1;
    st.row_lo[i] = a.window > 0 && p - a.window + 1 > 0 ? p - a.window + 1 : 0;
    lo16[i] = static_cast<int32_t>(st.row_lo[i]);
    hi16[i] = static_cast<int32_t>(st.row_hi[i]);
    lo = std::min(lo, st.row_lo[i]);
    hi = std::max(hi, st.row_hi[i]);
    st.all_lo = std::max(st.all_lo, st.row_lo[i]);
    st.all_hi = std::min(st.all_hi, st.row_hi[i]);
  }
  st.lo = _mm512_permutexvar_epi32(col, _mm512_load_si512(lo16));
  st.hi = _mm512_permutexvar_epi32(col, _mm512_load_si512(hi16));
  for (int k = 1; k < 3; ++k)
    st.part_idx[k - 1] = _mm512_and_si512(_mm512_add_epi32(iota, _mm512_set1_epi32(k * R)), _mm512_set1_epi32(15));
  st.nred = 0;
  for (int w = nc; w < 16; w *= 2) st.red[st.nred++] = _mm512_xor_si512(iota, _mm512_set1_epi32(w));
  st.m = _mm512_set1_ps(-__builtin_inff());
  st.l = _mm512_setzero_ps();
  for (int q = 0; q < nc / 2; ++q) {
    alignas(64) uint16_t idx[32];
    const int k0 = q * 64 / nc, k1 = (q + 1) * 64 / nc;  // keys of word vectors 2q, 2q + 1
    uint32_t mask = 0;
    for (int j = 0; j < 32; ++j) {
      idx[j] = j >= k0 && j < k1 ? static_cast<uint16_t>((j - k0) * nc) : 0;
      if (j >= k0 && j < k1) mask |= 1u << j;
    }
    st.tr_idx[q] = _mm512_load_si512(idx);
    st.tr_mask[q] = mask;
  }

  if (lo < hi) {
    // Pipeline (see the section comment): at the top of iteration s, b.s[s & 1] holds step s's
    // scores, vbuf(s & 1) its V pairs, kbuf((s + 1) & 1) step s + 1's K rows.
    auto len = [&](int64_t t) { return t < hi ? step_len(t, bs, hi) : 0; };
    int64_t t = lo;
    int n = len(t);
    int64_t t1 = t + n;
    int n1 = len(t1);
    dec_k(c, t, n, 0, 0, 0);
    // and step 0's scores, from half-way through: tile loads of K rows stored just before
    // would wait for those stores to reach L1
    dec_k(c, t1, n1, 1, 0, n, kDS / 2);
    dec_v(c, t, n, 0, t + kPfSteps * kDS, len(t + kPfSteps * kDS), false, 0);
    for (int s = 0; n > 0; ++s) {
      const int cur = s & 1, nxt = cur ^ 1;
      const int64_t t2 = t1 + n1;
      const int n2 = n1 > 0 ? len(t2) : 0;
      // fp32 rows where a NaN must not reach rows that do not see it, and for e5m2 wherever V
      // holds Inf (p x Inf split into bf16 parts of both signs would be Inf - Inf = NaN).
      const bool partial = dec_partial(st, t, n);
      const bool rows = (partial || a.kind == KvKind::e5m2) && dec_v_special(c, t, n);
      if (c.pp == 2)
        dec_softmax<2>(c, st, t, n, cur, partial, rows);
      else
        dec_softmax<3>(c, st, t, n, cur, partial, rows);
      if (rows) dec_pv_rows(c, st, t, n, cur);
      const int64_t tp = t1 + kPfSteps * kDS;
      dec_k(c, t2, n2, cur, nxt, n1);                    // and step s + 1's scores
      dec_v(c, t1, n1, nxt, tp, len(tp), !rows, cur);   // and step s's P x V
      t = t1;
      n = n1;
      t1 = t2;
      n1 = n2;
    }
  }
  // Epilogue: out[i] = sum of the parts' accumulators / l (columns back in d order).
  __m512 l = st.l;
  for (int i = 0; i < st.nred; ++i) l = _mm512_add_ps(l, _mm512_permutexvar_ps(st.red[i], l));
  alignas(64) float la[16];
  _mm512_store_ps(la, l);
  // Columns -> d: within a 64-d group, output vector L (d = 16 L + 4 w + q) takes 128-bit lane L
  // of the four accumulator vectors w (columns 16 w + 4 L + q): a 4 x 4 transpose of lanes.
  for (int i = 0; i < R; ++i) {
    const __m512 inv = _mm512_set1_ps(1.f / la[i]);
    float* out = a.out + i * D;
    for (int64_t g = 0; g < D; g += 64) {
      __m512 x[4];
      for (int w = 0; w < 4; ++w) {
        x[w] = _mm512_add_ps(_mm512_loadu_ps(b.o + i * D + g + 16 * w), _mm512_loadu_ps(b.o + (R + i) * D + g + 16 * w));
        if (c.pp == 3) x[w] = _mm512_add_ps(x[w], _mm512_loadu_ps(b.o + (2 * R + i) * D + g + 16 * w));
      }
      const __m512 t0 = _mm512_shuffle_f32x4(x[0], x[1], 0x44), t1 = _mm512_shuffle_f32x4(x[0], x[1], 0xEE);
      const __m512 t2 = _mm512_shuffle_f32x4(x[2], x[3], 0x44), t3 = _mm512_shuffle_f32x4(x[2], x[3], 0xEE);
      // t0 = x0.L0 x0.L1 x1.L0 x1.L1, t1 = x0.L2 x0.L3 x1.L2 x1.L3 (same for t2, t3 with x2, x3)
      _mm512_storeu_ps(out + g, _mm512_mul_ps(_mm512_shuffle_f32x4(t0, t2, 0x88), inv));
      _mm512_storeu_ps(out + g + 16, _mm512_mul_ps(_mm512_shuffle_f32x4(t0, t2, 0xDD), inv));
      _mm512_storeu_ps(out + g + 32, _mm512_mul_ps(_mm512_shuffle_f32x4(t1, t3, 0x88), inv));
      _mm512_storeu_ps(out + g + 48, _mm512_mul_ps(_mm512_shuffle_f32x4(t1, t3, 0xDD), inv));
    }
  }
}

}  // namespace

bool attend_amx_decode(const AttnTask& a) {
  const Decoder* dec = decoder_for(a.kind);
  const int pp = a.q_parts == 3 ? 3 : 2;
  if (!dec || a.D % 64 != 0 || a.q_parts * a.R > 16 || pp * a.R > 16) return false;
  static thread_local DecBuf* dbuf = nullptr;
  if (!dbuf) dbuf = new DecBuf();  // per thread, kept (the pool's threads live as long as the process)
  int nc = 1;
  while (nc < a.q_parts * a.R) nc *= 2;
  const Dec c{a, *dec, *dbuf, a.D, static_cast<int>(a.R), a.q_parts, pp, nc, pp * static_cast<int>(a.R)};
  attend_decode(c);
  return true;
}

}  // namespace fp8_backend

#pragma GCC pop_options
