// AMX-BF16 paged-attention kernel (Sapphire Rapids and newer) for FP8 (e4m3 / e5m2) and bf16
// caches. Every cached value is exact in bf16 (e4m3 and e5m2 by a byte lookup, as in
// w8a16_amx.cpp), and the product of two bf16 values is exact in fp32, so with the operands
// split into bf16 parts the tile products are those of fp32 and only the summation order differs:
//  - q . k: C[16 keys x 16 cols] = K[16 keys x 32 d] (decoded rows, natural layout) x Q^T, whose
//    columns are the group's query rows split into nsq bf16 parts (q = q1 + q2 + q3 is exact in
//    bf16 for nsq = 1 / 2 / 3 with bf16 / fp16 / fp32 queries); the score is the sum over the
//    parts, times qk_scale (softmax_scale * k_scale), as numerics.paged_attention computes it.
//    With several row groups (prefill), transposed instead: C[16 rows x 16 keys] = Q rows (parts
//    stacked as rows) x K^T, K transposed once per tile, so the softmax reads score rows
//    instead of gathering columns.
//  - online softmax in fp32 (AVX-512, vectorized exp), per row, per tile of up to 64 keys, with
//    lazy rescaling (the running max moves only when a score exceeds it by more than 8).
//  - p . V: O[16 rows x 16 d] += P[16 rows x 32 keys] x V (keys pair-interleaved), with the fp32
//    probabilities split into bf16 parts stacked as rows of P (part k of row i is row k * rg + i,
//    in slabs of 16 rows) and summed in fp32 at the end: fp32 products, fp32 accumulation.
//    fp32 queries (fp32 outputs): three parts (8 + 8 + 8 significant bits), exact. bf16 / fp16
//    queries: two parts, p = p1 + p2 + e with |e| <= 2^-17 p (for p in [2^k, 2^(k+1)),
//    p1 = RNE(p) leaves r = p - p1 with |r| <= 2^(k-8), and p2 = RNE(r) errs by at most 2^(k-17)),
//    so the output moves by at most 2^-17 of max |v| (sum_j p_j e_j v_j / l),
//    far below the final rounding to bf16 / fp16 (2^-9 / 2^-12 relative); one P slab less per
//    16 query rows.
// Row groups: a task's rows (up to 256, all query heads of one kv head over a run of tokens) in
// groups of 16 / nsq (one score tile's columns); every K/V tile is decoded once per task and used
// by every group that sees part of it (keys outside, groups inside, as in flash attention), each
// group with its own online-softmax state, so a long causal prefill decodes the prefix once per
// task instead of once per group.
// Tiles of up to 64 keys (never crossing a cache block). Tile products have a long latency:
// independent C tiles (4 for scores, one per 16 keys; 2 output chunks, each taking both 32-key
// halves of P per load/store) are kept in flight. Software pipelining: the next tile's K is
// decoded while this tile's scores are in the tile unit, and the rows of the tile after that are
// prefetched into L2 during the V decode, spread over it.
// AMX flushes bf16 denormals (|x| < 2^-126) to zero: only the last part of a probability or a
// query below 2^-126 is affected, far below fp32 rounding of the results. A tile whose keys are
// hidden from some row (causal prefill, window) and whose V holds a non-finite value is summed in
// fp32 per row instead, so a NaN the row does not attend never reaches it (0 * NaN).
// Called only after a CPUID check for AMX-BF16 + AVX512-BF16 + tile permission (attention_ops.cpp).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "fp8_e4m3.h"

// Everything below is compiled for AMX / AVX-512; no header may be included after this point.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,amx-tile,amx-bf16,fma")

#include "attention_amx_common.h"

namespace fp8_backend {

thread_local int tls_tile_sig = 0;

namespace {

constexpr int kT = 64;       // keys per tile (never crossing a cache block): four 16-key score tiles
constexpr int kPRows = 48;   // probability rows: 3 bf16 parts x up to 16 query rows (three P slabs; pp = 2 uses 32)

// Tile registers, each 16 rows x 64 bytes. Scores: 0-1 C (two 16-key halves), 2-3 K rows A,
// 4 Q^T B. Output: 0-2 C (three 16-wide d chunks), 3-5 V pairs B, 7 probabilities A.

// Byte permutations applied before Decoder::words (whose unpacklo/hi work within 128-bit lanes):
// `nat`: 64 bytes of one row -> words in natural order (out[0] = bytes 0..31, out[1] = 32..63).
// `pair_lo` / `pair_hi` (two-source): rows a, b (32 bytes each used) -> words a0 b0 a1 b1 ...
//   pair_lo covers d 0..31 of the 64-byte chunk, pair_hi d 32..63.
struct Perms {
  __m512i nat, pair_lo, pair_hi, w_lo, w_hi;
  Perms() {
    alignas(64) uint8_t n[64], pl[64], ph[64], wl[64], wh[64];
    // Decoder::words: unpacklo(lo, hi) turns byte slots 16L + j (j < 8) into words 8L + j of
    // out[0], unpackhi turns slots 16L + 8 + j into words 8L + j of out[1] (= word 32 + 8L + j).
    // So slot 16L + j must hold the source of word 8L + j, slot 16L + 8 + j that of 32 + 8L + j.
    auto place = [](uint8_t* idx, auto x) {
      for (int L = 0; L < 4; ++L)
        for (int j = 0; j < 8; ++j) {
          idx[16 * L + j] = x(8 * L + j);
          idx[16 * L + 8 + j] = x(32 + 8 * L + j);
        }
    };
    place(n, [](int w) { return static_cast<uint8_t>(w); });
    // pairs: word w = row (w & 1) at d = base + w / 2; source b = index + 64.
    place(pl, [](int w) { return static_cast<uint8_t>((w & 1) * 64 + w / 2); });
    place(ph, [](int w) { return static_cast<uint8_t>((w & 1) * 64 + 32 + w / 2); });
    // bf16 rows (16-bit words, two-source vpermt2b): output bytes 4i..4i+3 = a.w[i], b.w[i].
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < 2; ++k) {
        wl[4 * i + k] = static_cast<uint8_t>(2 * i + k);
        wl[4 * i + 2 + k] = static_cast<uint8_t>(64 + 2 * i + k);
        wh[4 * i + k] = static_cast<uint8_t>(32 + 2 * i + k);
        wh[4 * i + 2 + k] = static_cast<uint8_t>(64 + 32 + 2 * i + k);
      }
    nat = _mm512_load_si512(n);
    pair_lo = _mm512_load_si512(pl);
    pair_hi = _mm512_load_si512(ph);
    w_lo = _mm512_load_si512(wl);
    w_hi = _mm512_load_si512(wh);
  }
};

inline __mmask64 bytes_mask(int64_t left) {
  return left >= 64 ? ~__mmask64(0) : (left <= 0 ? 0 : (__mmask64(1) << left) - 1);
}

// Split 16 fp32 values into `parts` bf16 parts (x = sum of parts exactly for parts = 3), stored
// at dst[k * ld] (k = part), 16 words each.
inline void split_store(__m512 x, int parts, uint16_t* dst, int64_t ld) {
  for (int k = 0; k < parts; ++k) {
    const __m256i b = to_bf16(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k * ld), b);
    x = _mm512_sub_ps(x, from_bf16(b));
  }
}

// One row group: rows [r0, r0 + rg) of the task (rg * nsq <= 16 score columns, so rg <= 16),
// keys [lo, hi) (the union of what its rows see), Q^T at qt, output accumulators at o
// (pp * rg rows used, 16 * slabs rows allocated), softmax state at m / l.
struct Group {
  int64_t r0, lo, hi;
  int rg, slabs;  // rows; 16-row slabs of probability parts (pp * rg rows)
  uint16_t* qt;
  float* o;
  float* m;
  float* l;  // per row i: 16 lane sums of its softmax denominator at l + 16 i
};

struct Buffers {  // per thread
  alignas(64) uint16_t k[2][kT * kMaxD];         // K rows of this / the next tile, [key][d]
  alignas(64) uint16_t v[kT * kMaxD];            // V pairs: [key pair][d][2]
  alignas(64) uint16_t kt[2][kT * kMaxD];        // K^T (tr): [16-key block][chunk][d pair][key][2]
  // Two slots each (row groups are software-pipelined: see attend_task).
  alignas(64) float s[2][kT * 16];               // scores of one row group: [key][col], tr: [row][key]
  alignas(64) uint16_t p[2][kPRows * kT];        // probability parts [part * rg + row][key]
  alignas(64) float pf[2][16 * kT];              // fp32 probabilities [row][key] (fallback path)
  const uint8_t* pf_k[kT];                       // next tile's K / V rows to prefetch
  const uint8_t* pf_v[kT];
  int npf;
  // Per task, grown on demand: Q^T of every row group ([group][chunk][d pair][16 cols][2]),
  // output accumulators (group g at o_off[g]: 16 * slabs(g) rows of D), softmax state per row.
  std::vector<uint16_t> qt;
  std::vector<float> o;
  std::vector<float> m;
  std::vector<float> l;
  std::vector<Group> groups;
};

struct Ctx {
  const AttnTask& a;
  const Perms& pm;
  Buffers& b;
  const Decoder* dec;  // null for a bf16 cache
  int64_t D;
  // Transposed scores (several row groups): S[row][key] = Q rows x K^T, K transposed once per
  // tile into b.kt, so that the softmax reads rows instead of gathering columns.
  bool tr;
};

// In-register transpose of 16 x 16 dwords.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// Keys [t, t + n) of cache row pointer `src` (token stride tok) -> dst rows 0..n-1 (bf16). FP8
// rows: each full 64-byte chunk is decoded without the `nat` byte permute, so its words come out
// in Decoder::words' lane order (word p of the chunk holds d = 16 (p / 8) + p % 8 for p < 32,
// 16 (p' / 8) + 8 + p' % 8 for p = 32 + p'); the queries are staged in the same order (k_order),
// which leaves every q . k unchanged. A last half chunk (D % 64 == 32) keeps natural order.
void load_k(const Ctx& c, const uint8_t* src, int64_t tok, int n, uint16_t* dst) {
  const int64_t D = c.D;
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = src + j * tok;
    uint16_t* o = dst + j * D;
    if (c.dec) {
      for (int64_t d = 0; d < D; d += 64) {
        __m512i w[2];
        if (D - d >= 64)  // lane order (see k_order): no byte permute
          c.dec->words(_mm512_loadu_si512(r + d), w);
        else
          c.dec->words(_mm512_permutexvar_epi8(c.pm.nat, _mm512_maskz_loadu_epi8(bytes_mask(D - d), r + d)), w);
        _mm512_storeu_si512(o + d, w[0]);
        if (D - d > 32) _mm512_storeu_si512(o + d + 32, w[1]);
      }
    } else {
      std::memcpy(o, r, D * 2);
    }
  }
}

// Keys of a tile -> b.k[slot] (and, for transposed scores, b.kt[slot]: per 16-key block and
// 32-d chunk, a B tile whose row r holds the d pair r of each of the 16 keys; key rows past n are
// stale and feed only score columns never read).
void load_k_tile(const Ctx& c, const uint8_t* src, int64_t tok, int n, int slot) {
  load_k(c, src, tok, n, c.b.k[slot]);
  if (!c.tr) return;
  const int64_t D = c.D, nch = D / 32;
  const int nq = (n + 15) / 16;
  __m512i r[16];
  for (int qb = 0; qb < nq; ++qb)
    for (int64_t kc = 0; kc < nch; ++kc) {
      const uint16_t* k = c.b.k[slot] + 16 * qb * D + 32 * kc;
      for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(k + j * D);
      transpose16(r);
      uint16_t* o = c.b.kt[slot] + (qb * nch + kc) * 512;
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(o + 32 * j, r[j]);
    }
}

// Keys [0, n) -> b.v pairs (pairs n/2..zero_pairs-1 zero-filled); returns true if any value is
// Inf/NaN. Interleaved with the decode: L2 prefetches of the next tile's rows (b.pf_k / b.pf_v,
// b.npf of them), spread out so that they never queue up behind each other.
bool load_v(const Ctx& c, const uint8_t* src, int64_t tok, int n, int zero_pairs) {
  const int64_t D = c.D;
  const __m512i zero = _mm512_setzero_si512(), expo = _mm512_set1_epi16(0x7F80);
  const int64_t row_bytes = c.dec ? D : 2 * D;
  // Largest exponent field seen (Inf / NaN have all its bits set: bf16 words in `top`, FP8 bytes
  // masked by Decoder::special in `topb`): a running max, compared once at the end.
  __m512i top = zero, topb = zero;
  const int npairs = (n + 1) / 2;
  for (int pr = 0; pr < npairs; ++pr) {
    for (int j = 2 * pr; j < 2 * pr + 2 && j < c.b.npf; ++j)
      for (int64_t d = 0; d < row_bytes; d += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(c.b.pf_k[j] + d), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(c.b.pf_v[j] + d), _MM_HINT_T1);
      }
    const uint8_t* ra = src + (2 * pr) * tok;
    const uint8_t* rb = 2 * pr + 1 < n ? ra + tok : nullptr;
    uint16_t* o = c.b.v + pr * 2 * D;
    if (c.dec) {
      for (int64_t d = 0; d < D; d += 64) {
        const __mmask64 mk = bytes_mask(D - d);
        const __m512i a = _mm512_maskz_loadu_epi8(mk, ra + d);
        const __m512i bb = rb ? _mm512_maskz_loadu_epi8(mk, rb + d) : zero;
        topb = _mm512_max_epu8(topb, _mm512_max_epu8(_mm512_and_si512(a, c.dec->special),
                                                     _mm512_and_si512(bb, c.dec->special)));
        __m512i w[2];
        c.dec->words(_mm512_permutex2var_epi8(a, c.pm.pair_lo, bb), w);  // d .. d+31, pairs
        _mm512_storeu_si512(o + 2 * d, w[0]);
        _mm512_storeu_si512(o + 2 * d + 32, w[1]);
        if (D - d > 32) {
          c.dec->words(_mm512_permutex2var_epi8(a, c.pm.pair_hi, bb), w);  // d+32 .. d+63
          _mm512_storeu_si512(o + 2 * d + 64, w[0]);
          _mm512_storeu_si512(o + 2 * d + 96, w[1]);
        }
      }
    } else {
      for (int64_t d = 0; d < D; d += 32) {  // 32 bf16 = 64 bytes per row
        const __m512i a = _mm512_loadu_si512(ra + 2 * d);
        const __m512i bb = rb ? _mm512_loadu_si512(rb + 2 * d) : zero;
        const __m512i w0 = _mm512_permutex2var_epi8(a, c.pm.w_lo, bb);
        const __m512i w1 = _mm512_permutex2var_epi8(a, c.pm.w_hi, bb);
        _mm512_storeu_si512(o + 2 * d, w0);
        _mm512_storeu_si512(o + 2 * d + 32, w1);
        top = _mm512_max_epu16(top, _mm512_max_epu16(_mm512_and_si512(w0, expo), _mm512_and_si512(w1, expo)));
      }
    }
  }
  for (int j = 2 * npairs; j < c.b.npf; ++j)  // the next tile is longer than this one
    for (int64_t d = 0; d < row_bytes; d += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(c.b.pf_k[j] + d), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(c.b.pf_v[j] + d), _MM_HINT_T1);
    }
  for (int pr = npairs; pr < zero_pairs; ++pr) std::memset(c.b.v + pr * 2 * D, 0, 4 * D);
  if (c.dec) return _mm512_cmpeq_epi8_mask(topb, c.dec->special) != 0;
  return _mm512_cmpeq_epi16_mask(top, expo) != 0;
}

// Q^T of a group: chunk kc, d pair r, column col -> qt[(kc * 16 + r) * 32 + 2 * col + (d & 1)];
// column k * rg + i holds bf16 part k of row r0 + i. Columns >= nsq * rg are left stale: they
// only feed score columns that are never read.
void stage_q(const Ctx& c, const Group& g, int nsq) {
  const int64_t D = c.D;
  alignas(64) float qo[kMaxD];
  for (int i = 0; i < g.rg; ++i) {
    const float* q = c.dec ? k_order(c.a.q + (g.r0 + i) * D, D, qo) : c.a.q + (g.r0 + i) * D;
    if (c.tr) {  // A rows: part k of row i is row k * rg + i, natural [row][d]
      for (int64_t d = 0; d < D; d += 16) {
        __m512 x = _mm512_loadu_ps(q + d);
        for (int k = 0; k < nsq; ++k) {
          const __m256i h = to_bf16(x);
          x = _mm512_sub_ps(x, from_bf16(h));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.qt + (k * g.rg + i) * D + d), h);
        }
      }
      continue;
    }
    scatter_qt(q, D, nsq, 16, i, g.rg, g.qt);
  }
}

// Score tiles of a group for the n keys at kb (K rows past n are stale and feed only score
// rows never read): one C tile per 16 keys, four independent accumulation chains.
void issue_scores(const Ctx& c, const Group& g, const uint16_t* kb, const uint16_t* ktb, int n) {
  const int64_t D = c.D, nch = D / 32;
  const int nq = (n + 15) / 16;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  if (c.tr) {  // C[row][16 keys] = Q rows [16 x 32 d] x K^T block [32 d x 16 keys]
    for (int64_t kc = 0; kc < nch; ++kc) {
      _tile_loadd(4, g.qt + 32 * kc, D * 2);
      _tile_loadd(5, ktb + kc * 512, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (nq > 1) {
        _tile_loadd(6, ktb + (nch + kc) * 512, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (nq > 2) {
        _tile_loadd(7, ktb + (2 * nch + kc) * 512, 64);
        _tile_dpbf16ps(2, 4, 7);
      }
      if (nq > 3) {
        _tile_loadd(5, ktb + (3 * nch + kc) * 512, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    return;
  }
  for (int64_t kc = 0; kc < nch; ++kc) {
    _tile_loadd(4, g.qt + kc * 16 * 32, 64);
    _tile_loadd(5, kb + 32 * kc, D * 2);
    _tile_dpbf16ps(0, 5, 4);
    if (nq > 1) {
      _tile_loadd(6, kb + 16 * D + 32 * kc, D * 2);
      _tile_dpbf16ps(1, 6, 4);
    }
    if (nq > 2) {
      _tile_loadd(7, kb + 32 * D + 32 * kc, D * 2);
      _tile_dpbf16ps(2, 7, 4);
    }
    if (nq > 3) {
      _tile_loadd(5, kb + 48 * D + 32 * kc, D * 2);
      _tile_dpbf16ps(3, 5, 4);
    }
  }
}

void store_scores(const Ctx& c, int n, int slot) {
  Buffers& b = c.b;
  const int nq = (n + 15) / 16;
  if (c.tr) {  // [row][key], row stride kT
    _tile_stored(0, b.s[slot], kT * 4);
    if (nq > 1) _tile_stored(1, b.s[slot] + 16, kT * 4);
    if (nq > 2) _tile_stored(2, b.s[slot] + 32, kT * 4);
    if (nq > 3) _tile_stored(3, b.s[slot] + 48, kT * 4);
    return;
  }
  _tile_stored(0, b.s[slot], 64);
  if (nq > 1) _tile_stored(1, b.s[slot] + 16 * 16, 64);
  if (nq > 2) _tile_stored(2, b.s[slot] + 32 * 16, 64);
  if (nq > 3) _tile_stored(3, b.s[slot] + 48 * 16, 64);
}

// Online softmax of the group's rows over keys [t0, t0 + n) (scores in b.s): probabilities
// (b.pf in fp32, b.p as pp bf16 parts), rescaled accumulators, m / l. Returns whether some
// row sees only part of the tile.
bool softmax_rows(const Ctx& c, const Group& g, int64_t t0, int n, int np, int nsq, int pp, bool keep_pf, int slot) {
  const AttnTask& a = c.a;
  Buffers& b = c.b;
  const int64_t D = c.D;
  const int rg = g.rg;
  const __m512 qks = _mm512_set1_ps(a.qk_scale);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  bool partial = false;
  for (int i = 0; i < rg; ++i) {
    const int64_t p = a.pos[g.r0 + i];
    int64_t j0 = 0, j1 = p - t0 + 1;
    if (a.window > 0 && p - a.window + 1 - t0 > 0) j0 = p - a.window + 1 - t0;
    if (j1 > n) j1 = n;
    if (j1 < j0) j1 = j0;
    if (j0 > 0 || j1 < n) partial = true;
    __m512 sv[4];
    __mmask16 mk[4];
    __m512 mxv = _mm512_set1_ps(-__builtin_inff());
    for (int h = 0; h < np; ++h) {
      const __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32(16 * h));
      mk[h] = _mm512_cmpge_epi32_mask(j, _mm512_set1_epi32(static_cast<int>(j0))) &
              _mm512_cmplt_epi32_mask(j, _mm512_set1_epi32(static_cast<int>(j1)));
      __m512 acc = _mm512_setzero_ps();
      if (c.tr) {
        for (int k = 0; k < nsq; ++k)
          acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mk[h], b.s[slot] + (k * rg + i) * kT + 16 * h));
      } else if (mk[h]) {
        const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(j, _mm512_set1_epi32(16)), _mm512_set1_epi32(i));
        for (int k = 0; k < nsq; ++k)
          acc = _mm512_add_ps(acc, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk[h],
                                                            _mm512_add_epi32(idx, _mm512_set1_epi32(k * rg)), b.s[slot], 4));
      }
      sv[h] = _mm512_mul_ps(acc, qks);
      mxv = _mm512_mask_max_ps(mxv, mk[h], sv[h], mxv);  // NaN scores are skipped (as the other paths)
    }
    // Lazy rescaling: the reference m of a row moves only when a score exceeds it by more than
    // kSlack, so the accumulators are rescaled (and expf called) rarely; probabilities stay
    // <= e^kSlack, far from fp32 overflow, and O / l is the same softmax.
    float mx = _mm512_reduce_max_ps(mxv);  // -inf if nothing seen in this tile (or all NaN)
    const float mold = g.m[i];
    float alpha = 1.f;
    if (mold == -__builtin_inff()) {
      alpha = 0.f;
      if (mx == -__builtin_inff()) mx = 0.f;  // nothing seen yet, or all scores NaN
    } else if (mx > mold + kSlack) {
      alpha = __builtin_expf(mold - mx);
    } else {
      mx = mold;
    }
    __m512 sumv = _mm512_setzero_ps();  // the row sum l stays a vector until the end
    for (int h = 0; h < np; ++h) {
      const __m512 e = _mm512_maskz_mov_ps(mk[h], exp512(_mm512_sub_ps(sv[h], _mm512_set1_ps(mx))));
      sumv = _mm512_add_ps(sumv, e);
      if (keep_pf) _mm512_storeu_ps(b.pf[slot] + i * kT + 16 * h, e);
      split_store(e, pp, b.p[slot] + i * kT + 16 * h, rg * kT);
    }
    if (j1 > j0 || mold != -__builtin_inff()) {
      _mm512_storeu_ps(g.l + 16 * i, _mm512_fmadd_ps(_mm512_loadu_ps(g.l + 16 * i), _mm512_set1_ps(alpha), sumv));
      g.m[i] = mx;
      if (alpha != 1.f) {
        const __m512 av = _mm512_set1_ps(alpha);
        for (int k = 0; k < pp; ++k) {
          float* o = g.o + (k * rg + i) * D;
          for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
        }
      }
    }
  }
  return partial;
}

// O += P x V for a group (V pairs in b.v, np 16-key quarters).
void accumulate_pv(const Ctx& c, const Group& g, int n, int np, bool partial, bool v_bad, int slot) {
  Buffers& b = c.b;
  const int64_t D = c.D;
  if ((partial || c.a.kind == KvKind::e5m2) && v_bad) {
    // fp32 per row over the keys it sees only (b.pf[slot] is 0 elsewhere, but 0 * NaN is NaN);
    // and e5m2 Inf: p x Inf with p split into bf16 parts of both signs would be Inf - Inf = NaN.
    for (int i = 0; i < g.rg; ++i)
      for (int j = 0; j < n; ++j) {
        const float pj = b.pf[slot][i * kT + j];
        if (pj == 0.f) continue;
        const uint16_t* vr = b.v + (j / 2) * 2 * D + (j & 1);
        for (int64_t d = 0; d < D; ++d) {
          uint32_t bits = static_cast<uint32_t>(vr[2 * d]) << 16;
          float vf;
          std::memcpy(&vf, &bits, 4);
          g.o[i * D + d] += pj * vf;
        }
      }
    return;
  }
  // O[16 rows x 16 d] += P[16 rows x 32 keys] x V[32 keys x 16 d], per slab of 16 probability rows
  // and up to four 16-d output chunks held in tiles 0-3 across both 32-key halves of P (tile 4):
  // four independent accumulation chains, the V tiles rotating through tiles 5-7.
  const int64_t nd = D / 16;      // even (D % 32 == 0)
  const int64_t vh = 16 * 2 * D;  // second half of the keys: 16 pairs further
  const int halves = np > 2 ? 2 : 1;
  for (int sl = 0; sl < g.slabs; ++sl) {
    float* o = g.o + 16 * sl * D;
    const uint16_t* p = b.p[slot] + 16 * sl * kT;
    for (int64_t d0 = 0; d0 < nd; d0 += 4) {
      const int nc = nd - d0 >= 4 ? 4 : 2;
      _tile_loadd(0, o + 16 * d0, D * 4);
      _tile_loadd(1, o + 16 * (d0 + 1), D * 4);
      if (nc > 2) {
        _tile_loadd(2, o + 16 * (d0 + 2), D * 4);
        _tile_loadd(3, o + 16 * (d0 + 3), D * 4);
      }
      for (int h = 0; h < halves; ++h) {
        _tile_loadd(4, p + 32 * h, kT * 2);
        const uint16_t* v = b.v + h * vh + 32 * d0;
        _tile_loadd(5, v, D * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, v + 32, D * 4);
        _tile_dpbf16ps(1, 4, 6);
        if (nc > 2) {
          _tile_loadd(7, v + 64, D * 4);
          _tile_dpbf16ps(2, 4, 7);
          _tile_loadd(5, v + 96, D * 4);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      _tile_stored(0, o + 16 * d0, D * 4);
      _tile_stored(1, o + 16 * (d0 + 1), D * 4);
      if (nc > 2) {
        _tile_stored(2, o + 16 * (d0 + 2), D * 4);
        _tile_stored(3, o + 16 * (d0 + 3), D * 4);
      }
    }
  }
}

// The whole task: every K/V tile is decoded once and used by every row group that sees part of
// it (flash-attention order: keys outside, row groups inside), each group keeping its own
// online-softmax state.
void attend_task(const Ctx& c) {
  const AttnTask& a = c.a;
  Buffers& b = c.b;
  const int64_t D = c.D, R = a.R;
  const int nsq = a.q_parts;
  const int per = 16 / nsq;  // score columns per group: nsq * rows <= 16
  const int pp = nsq == 3 ? 3 : 2;  // bf16 parts per probability (see the header comment)
  const int64_t ng = (R + per - 1) / per;
  if (b.groups.size() < static_cast<size_t>(ng)) b.groups.resize(ng);
  Group* groups = b.groups.data();
  int64_t orows = 0;
  for (int64_t gi = 0; gi < ng; ++gi) {
    Group& g = groups[gi];
    g.r0 = gi * per;
    g.rg = static_cast<int>(R - g.r0 < per ? R - g.r0 : per);
    g.slabs = (pp * g.rg + 15) / 16;
    orows += 16 * g.slabs;
    g.hi = a.pos[g.r0 + g.rg - 1] + 1;
    g.lo = 0;
    if (a.window > 0 && a.pos[g.r0] - a.window + 1 > 0) g.lo = a.pos[g.r0] - a.window + 1;
  }
  if (b.qt.size() < static_cast<size_t>(ng * D * 16)) b.qt.resize(ng * D * 16);
  if (b.o.size() < static_cast<size_t>(orows * D)) b.o.resize(orows * D);
  if (b.m.size() < static_cast<size_t>(ng * 16)) {
    b.m.resize(ng * 16);
    b.l.resize(ng * 16 * 16);
  }
  int64_t off = 0;
  for (int64_t gi = 0; gi < ng; ++gi) {
    Group& g = groups[gi];
    g.qt = b.qt.data() + gi * D * 16;
    g.o = b.o.data() + off;
    off += 16 * g.slabs * D;
    g.m = b.m.data() + gi * 16;
    g.l = b.l.data() + gi * 16 * 16;
    stage_q(c, g, nsq);
    std::memset(g.o, 0, pp * g.rg * D * 4);
    for (int i = 0; i < 16; ++i) {
      g.m[i] = -__builtin_inff();
      _mm512_storeu_ps(g.l + 16 * i, _mm512_setzero_ps());
    }
  }
  const int64_t bs = a.block_size;
  // Rows are sorted by position, so both ends of the groups' key ranges are non-decreasing.
  const int64_t hi = groups[ng - 1].hi, lo = groups[0].lo;
  // Tile t0 covers keys [t0, t0 + n): up to kT keys, never crossing a cache block.
  auto tile_len = [&](int64_t t) {
    int64_t n = bs - t % bs;
    if (n > kT) n = kT;
    if (n > hi - t) n = hi - t;
    return static_cast<int>(n);
  };
  int cur = 0;
  int n = lo < hi ? tile_len(lo) : 0;
  if (n > 0) load_k_tile(c, a.kc + a.blocks[lo / bs] * a.k_blk + (lo % bs) * a.k_tok, a.k_tok, n, 0);
  int64_t gs = 0, ge = 0;  // groups [gs, ge) see part of the current tile
  for (int64_t t0 = lo; t0 < hi;) {
    const int64_t blk = t0 / bs, off0 = t0 % bs;
    const int64_t block = a.blocks[blk];
    const uint16_t* kb = b.k[cur];
    while (gs < ng && groups[gs].hi <= t0) ++gs;
    while (ge < ng && groups[ge].lo < t0 + n) ++ge;
    // Rows of the tile after the next one, prefetched into L2 while this tile's V is decoded
    // (load_v): blocks are scattered, so the hardware prefetcher cannot follow from one to the next.
    const int64_t t1 = t0 + n;
    int n1 = 0;
    b.npf = 0;
    if (t1 < hi) {
      n1 = tile_len(t1);
      const int64_t t2 = t1 + n1;
      if (t2 < hi) {
        const int64_t nb = a.blocks[t2 / bs], o2 = t2 % bs;
        b.npf = tile_len(t2);
        for (int j = 0; j < b.npf; ++j) {
          b.pf_k[j] = a.kc + nb * a.k_blk + (o2 + j) * a.k_tok;
          b.pf_v[j] = a.vc + nb * a.v_blk + (o2 + j) * a.v_tok;
        }
      }
    }
    // Probabilities and V pairs are used 32 keys at a time (one P tile each): np 16-key quarters.
    const int np = n > 32 ? 4 : 2;
    bool v_bad = false;
    // Row groups are software-pipelined: the scores of group gi + 1 are stored before the softmax
    // of group gi, and the P x V of group gi runs after the softmax of group gi + 1, so that tile
    // loads never wait for vector stores just issued (nor vector loads for tile stores): two
    // slots of scores / probabilities.
    bool partial[2] = {false, false};
    if (gs < ge) {
      issue_scores(c, groups[gs], kb, b.kt[cur], n);
      // V decode does not depend on the scores: issued here, it overlaps the tile products.
      v_bad = load_v(c, a.vc + block * a.v_blk + off0 * a.v_tok, a.v_tok, n, np * 8);
      store_scores(c, n, gs & 1);
    }
    // The next tile's K is decoded now, while the score tiles are stored (software pipelining:
    // its stores have long retired when its tile loads run).
    if (n1 > 0) load_k_tile(c, a.kc + a.blocks[t1 / bs] * a.k_blk + (t1 % bs) * a.k_tok, a.k_tok, n1, cur ^ 1);
    for (int64_t gi = gs; gi < ge; ++gi) {
      const int sl = static_cast<int>(gi & 1);
      if (gi + 1 < ge) {
        issue_scores(c, groups[gi + 1], kb, b.kt[cur], n);
        store_scores(c, n, sl ^ 1);
      }
      partial[sl] = softmax_rows(c, groups[gi], t0, n, np, nsq, pp, v_bad, sl);
      if (gi > gs) accumulate_pv(c, groups[gi - 1], n, np, partial[sl ^ 1], v_bad, sl ^ 1);
    }
    if (gs < ge) accumulate_pv(c, groups[ge - 1], n, np, partial[(ge - 1) & 1], v_bad, static_cast<int>((ge - 1) & 1));
    t0 = t1;
    n = n1;
    cur ^= 1;
  }
  for (int64_t gi = 0; gi < ng; ++gi) {
    const Group& g = groups[gi];
    for (int i = 0; i < g.rg; ++i) {
      const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(_mm512_loadu_ps(g.l + 16 * i)));
      const float *o0 = g.o + i * D, *o1 = g.o + (g.rg + i) * D, *o2 = g.o + (2 * g.rg + i) * D;
      for (int64_t d = 0; d < D; d += 16) {
        __m512 sum = _mm512_add_ps(_mm512_loadu_ps(o0 + d), _mm512_loadu_ps(o1 + d));
        if (pp == 3) sum = _mm512_add_ps(sum, _mm512_loadu_ps(o2 + d));
        _mm512_storeu_ps(a.out + (g.r0 + i) * D + d, _mm512_mul_ps(sum, inv));
      }
    }
  }
}

}  // namespace

void attend_amx(const AttnTask& a) {
  if (attend_amx_decode(a)) return;
  static thread_local Buffers* buf = nullptr;
  if (!buf) buf = new Buffers();  // per thread, kept (the pool's threads live as long as the process)
  static const Perms perms;
  const Decoder* dec = decoder_for(a.kind);
  const int rows[8] = {16, 16, 16, 16, 16, 16, 16, 16}, cols[8] = {64, 64, 64, 64, 64, 64, 64, 64};
  amx_tiles_for(-1, rows, cols);
  const int per = 16 / a.q_parts;
  const Ctx c{a, perms, *buf, dec, a.D, a.R > per};
  attend_task(c);
}

void attend_amx_release() {
  if (tls_tile_sig != 0) _tile_release();
  tls_tile_sig = 0;
}

}  // namespace fp8_backend

#pragma GCC pop_options
