// AVX2 paged-attention kernels, for x86-64 CPUs with AVX2 + FMA + F16C and no AVX-512 (every
// AVX-512 CPU can run them too). attention_portable.cpp is the readable scalar reference.
//
// Cache bytes are decoded 8 / 16 at a time in registers: e4m3 by the F16C trick of the AVX-512
// path (s.eeee.mmm -> fp16 s.0eeee.mmm0000000 = value * 2^-8, subnormals included: vcvtph2ps
// converts fp16 subnormals exactly whatever MXCSR.DAZ says), e5m2 as the top byte of an fp16,
// bf16 by a shift.
//
// Two kernels:
//  - attend_impl<Avx2> (attention_kernel.h's online-softmax driver with 8-lane primitives): any
//    task, any cache dtype, D % 8 == 0; prefill, chunked prefill, and the tasks below refuse;
//  - the decode kernel (attend_decode): FP8 cache, D % 16 == 0, at most 8 query rows (the query
//    heads of one kv head, of one token or a few). Per step of up to 32 keys (never crossing a
//    cache block):
//      scores: every K row is decoded once, 16 d at a time, and multiplied into all R rows'
//        accumulators (KB keys x R rows <= 8 accumulators, q read from L1); the KB * R partial
//        sums are reduced together by one horizontal-add tree;
//      softmax: per row over the step's scores (8-lane exp), rescaling o by exp(m_old - m_new);
//      P x V: every V row chunk is decoded once and multiplied into all R rows' output chunks.
//    The e4m3 2^-8 of both decodes is folded into the staged queries and the final 1 / l.
//    Rows of a step the row must not see (causal end, sliding window) get score -inf, so
//    probability 0; since 0 x NaN = NaN, a K/V byte that decodes to NaN or Inf anywhere in the
//    task would spread to rows that do not see it, so the kernel tracks the largest
//    "special-code" byte and the task is redone on attend_impl<Avx2> (which reads only the keys
//    each row sees) when one appeared: NaN / Inf bytes cost a second pass, never a wrong row.
// Called only after a CPUID check (attention_ops.cpp).
#include <immintrin.h>

#include <cstdint>

#include "attention.h"

// Everything below is compiled for AVX2; no header may be included after this point.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace fp8_backend {
namespace {

// exp(x) on 8 floats: x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor (rel. error < 2e-7), times
// 2^n built in the exponent field. Clamped to [-87.3, 88.3] (2^n stays a normal float); NaN
// propagates (max/min return their second operand when either is NaN, and y is NaN).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  __m256 y = _mm256_set1_ps(1.0f / 720);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 120));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 24));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 6));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float hmax(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

// Lane i = the sum of a[i]'s 8 lanes.
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  // u0 = [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], u1 likewise for a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 8 e4m3 bytes (low half of b) -> fp32 value * 2^-8 (NaN codes become finite numbers).
inline __m256 e4m3x8_scaled(__m128i b) {
  __m128i h = _mm_slli_epi16(_mm_cvtepi8_epi16(b), 7);  // sign-extended: bit 14 = sign, cleared
  h = _mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0xBFFF)));
  return _mm256_cvtph_ps(h);
}

// 16 FP8 bytes -> two fp32 vectors (e4m3: value * 2^-8, NaN codes finite; e5m2: exact, Inf and
// NaN included).
template <bool E4M3>
inline void dec16(__m128i b, __m256& lo, __m256& hi) {
  __m256i h;
  if constexpr (E4M3) {
    h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7);
    h = _mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  } else {
    h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);
  }
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// Special-code tracking: max_u8(acc, b | mask) reaches 0xFF exactly when some byte is NaN
// (e4m3: magnitude 0x7F; mask 0x80) or Inf / NaN (e5m2: exponent bits 0x7C all set; mask 0x83).
template <bool E4M3>
inline __m128i track(__m128i acc, __m128i b) {
  return _mm_max_epu8(acc, _mm_or_si128(b, _mm_set1_epi8(static_cast<char>(E4M3 ? 0x80 : 0x83))));
}

inline int64_t elem_bytes(KvKind kind) {
  return kind == KvKind::e4m3 || kind == KvKind::e5m2 ? 1 : (kind == KvKind::f32 ? 4 : 2);
}

// 8 cache elements at p -> fp32 (exact values; e4m3 NaN codes -> NaN).
inline __m256 decode8(const uint8_t* p, KvKind kind) {
  switch (kind) {
    case KvKind::e4m3: {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      const __m256 v = _mm256_mul_ps(e4m3x8_scaled(b), _mm256_set1_ps(256.0f));
      const __m128i nan8 = _mm_cmpeq_epi8(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
      const __m256 nan = _mm256_castsi256_ps(_mm256_cvtepi8_epi32(nan8));
      return _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")), nan);
    }
    case KvKind::e5m2: {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(b), 8));
    }
    case KvKind::bf16: {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
    }
    case KvKind::f16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    case KvKind::f32:
      break;
  }
  return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

inline __m256 tail_mask(int64_t k) {  // lanes [0, k) set, 0 <= k <= 8
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), idx));
}

// ---------------------------------------------------------------------------------------------
// General path: the primitives attention_kernel.h's driver needs (D % 8 == 0).
// ---------------------------------------------------------------------------------------------
struct Avx2 {
  static void decode(const uint8_t* src, int64_t tok, int64_t n, int64_t D, KvKind kind, float* dst) {
    const int64_t eb = elem_bytes(kind);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(dst + j * D + d, decode8(src + j * tok + d * eb, kind));
  }

  static void qk(const float* q, const float* k, int64_t n, int64_t D, float* s) {
    for (int64_t j = 0; j < n; ++j) {
      const float* kr = k + j * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kr + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(kr + d + 8), a1);
      }
      if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kr + d), a0);
      s[j] = hsum(_mm256_add_ps(a0, a1));
    }
  }

  static float exp_sub(float* s, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (j < n) {
      const __m256i mask = _mm256_castps_si256(tail_mask(n - j));
      const __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(s + j, mask), mv));
      _mm256_maskstore_ps(s + j, mask, e);
      sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    return hsum(sum);
  }

  static void pv(float* o, float alpha, const float* p, const float* v, int64_t n, int64_t D) {
    const __m256 av = _mm256_set1_ps(alpha);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(o + d), av), a1 = _mm256_mul_ps(_mm256_loadu_ps(o + d + 8), av);
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * D + d), a0);
        a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * D + d + 8), a1);
      }
      _mm256_storeu_ps(o + d, a0);
      _mm256_storeu_ps(o + d + 8, a1);
    }
    if (d < D) {
      __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(o + d), av);
      for (int64_t j = 0; j < n; ++j) a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(v + j * D + d), a0);
      _mm256_storeu_ps(o + d, a0);
    }
  }

  static void scale(float* o, float a, int64_t D) {
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), _mm256_set1_ps(a)));
  }
};

#include "attention_kernel.h"

// ---------------------------------------------------------------------------------------------
// Decode kernel (see the file comment).
// ---------------------------------------------------------------------------------------------
constexpr int kStep = 32;     // keys per step: scores / probabilities of a step stay in L1
constexpr int kPfSteps = 2;   // rows of the step this many steps ahead are prefetched

inline int step_len(int64_t t, int64_t bs, int64_t hi) {
  int64_t n = bs - t % bs;
  if (n > kStep) n = kStep;
  if (n > hi - t) n = hi - t;
  return static_cast<int>(n);
}

inline void prefetch_rows(const uint8_t* p, int64_t tok, int n, int64_t D) {
  for (int j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; d += 64) _mm_prefetch(reinterpret_cast<const char*>(p + j * tok + d), _MM_HINT_T0);
}

// R query rows (1..8), FP8 cache of kind E4M3 ? e4m3 : e5m2, D % 16 == 0. Returns false (out
// unspecified) when a NaN / Inf code was read: the caller redoes the task on the general path.
template <int R, bool E4M3>
bool attend_decode(const AttnTask& a) {
  constexpr int KB = R >= 8 ? 1 : 8 / R;  // keys per score group: KB * R <= 8 accumulators
  constexpr int CW = R <= 4 ? 16 : 8;     // P x V output columns per pass: 2R or R accumulators
  const int64_t D = a.D, bs = a.block_size;
  float* q = a.work;               // [R][D] queries (times 2^8 for e4m3)
  float* S = q + R * D;            // [R][kStep] scores, then probabilities
  float* m = S + R * kStep;        // running max per row
  float* l = m + R;                // running denominator per row
  float* alpha = l + R;            // this step's rescale factor per row
  float* o = a.out;                // [R][D] unnormalized outputs
  const float qmul = E4M3 ? 256.f : 1.f;
  int64_t lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(q + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(a.q + r * D + d), _mm256_set1_ps(qmul)));
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + r * D + d, _mm256_setzero_ps());
    m[r] = -__builtin_inff();
    l[r] = 0.f;
    hi[r] = a.pos[r] + 1;
    lo[r] = a.window > 0 && a.pos[r] - a.window + 1 > 0 ? a.pos[r] - a.window + 1 : 0;
  }
  const int64_t t_lo = lo[0], t_hi = hi[R - 1];
  __m128i special = _mm_setzero_si128();

  for (int64_t t0 = t_lo; t0 < t_hi;) {
    const int n = step_len(t0, bs, t_hi);
    const int64_t block = a.blocks[t0 / bs], off = t0 % bs;
    const uint8_t* kp = a.kc + block * a.k_blk + off * a.k_tok;
    const uint8_t* vp = a.vc + block * a.v_blk + off * a.v_tok;
    {  // prefetch the rows kPfSteps steps ahead (a new cache block every 128 / 32 steps)
      const int64_t tp = t0 + kPfSteps * kStep;
      if (tp < t_hi) {
        const int np = step_len(tp, bs, t_hi);
        const int64_t bp = a.blocks[tp / bs], op = tp % bs;
        prefetch_rows(a.kc + bp * a.k_blk + op * a.k_tok, a.k_tok, np, D);
        prefetch_rows(a.vc + bp * a.v_blk + op * a.v_tok, a.v_tok, np, D);
      }
    }

    // Scores S[r][j] = q[r] . k[t0 + j] (keys past n in a group repeat key n - 1, unused).
    for (int j0 = 0; j0 < n; j0 += KB) {
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      const uint8_t* kr[KB];
      for (int kk = 0; kk < KB; ++kk) kr[kk] = kp + (j0 + kk < n ? j0 + kk : n - 1) * a.k_tok;
      for (int64_t d = 0; d < D; d += 16) {
        for (int kk = 0; kk < KB; ++kk) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kr[kk] + d));
          special = track<E4M3>(special, b);
          __m256 k0, k1;
          dec16<E4M3>(b, k0, k1);
          for (int r = 0; r < R; ++r) {
            acc[kk * R + r] = _mm256_fmadd_ps(k0, _mm256_loadu_ps(q + r * D + d), acc[kk * R + r]);
            acc[kk * R + r] = _mm256_fmadd_ps(k1, _mm256_loadu_ps(q + r * D + d + 8), acc[kk * R + r]);
          }
        }
      }
      alignas(32) float s8[8];
      _mm256_store_ps(s8, hsum8(acc));
      for (int kk = 0; kk < KB && j0 + kk < n; ++kk)
        for (int r = 0; r < R; ++r) S[r * kStep + j0 + kk] = s8[kk * R + r];
    }

    // Online softmax per row; keys the row must not see (and j >= n) get probability 0.
    for (int r = 0; r < R; ++r) {
      float* s = S + r * kStep;
      int j0 = 0, j1 = n;  // visible keys t0 + j, j in [j0, j1)
      if (lo[r] > t0) j0 = static_cast<int>(lo[r] - t0 < n ? lo[r] - t0 : n);
      if (hi[r] < t0 + n) j1 = static_cast<int>(hi[r] - t0 > 0 ? hi[r] - t0 : 0);
      if (j1 < j0) j1 = j0;
      for (int j = 0; j < j0; ++j) s[j] = -__builtin_inff();
      for (int j = j1; j < kStep; ++j) s[j] = -__builtin_inff();
      __m256 mx = _mm256_set1_ps(-__builtin_inff());
      for (int j = 0; j < kStep; j += 8) mx = _mm256_max_ps(_mm256_loadu_ps(s + j), mx);  // NaN ignored
      const float mnew = hmax(mx) > m[r] ? hmax(mx) : m[r];
      const float mref = mnew == -__builtin_inff() ? 0.f : mnew;  // nothing seen yet: p = 0
      alpha[r] = __builtin_expf(m[r] - mref);                    // 0 on the first visible step
      m[r] = mnew;
      const __m256 mv = _mm256_set1_ps(mref);
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < kStep; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      l[r] = l[r] * alpha[r] + hsum(sum);
    }

    // o[r] = alpha[r] o[r] + sum_j p[r][j] v[t0 + j], CW columns per pass over the step's V rows.
    for (int64_t d = 0; d < D; d += CW) {
      __m256 acc[2 * R];
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_set1_ps(alpha[r]);
        acc[r] = _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), av);
        if constexpr (CW == 16) acc[R + r] = _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d + 8), av);
      }
      for (int j = 0; j < n; ++j) {
        const uint8_t* vr = vp + j * a.v_tok + d;
        if constexpr (CW == 16) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vr));
          special = track<E4M3>(special, b);
          __m256 v0, v1;
          dec16<E4M3>(b, v0, v1);
          for (int r = 0; r < R; ++r) {
            const __m256 p = _mm256_broadcast_ss(S + r * kStep + j);
            acc[r] = _mm256_fmadd_ps(p, v0, acc[r]);
            acc[R + r] = _mm256_fmadd_ps(p, v1, acc[R + r]);
          }
        } else {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vr));
          special = track<E4M3>(special, b);  // upper 8 bytes zero: never 0xFF
          const __m256 v0 = E4M3 ? e4m3x8_scaled(b) : _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(b), 8));
          for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(S + r * kStep + j), v0, acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(o + r * D + d, acc[r]);
        if constexpr (CW == 16) _mm256_storeu_ps(o + r * D + d + 8, acc[R + r]);
      }
    }
    t0 += n;
  }
  if (_mm_movemask_epi8(_mm_cmpeq_epi8(special, _mm_set1_epi8(static_cast<char>(0xFF)))) != 0) return false;
  for (int r = 0; r < R; ++r) {
    const __m256 sc = _mm256_set1_ps(qmul / l[r]);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), sc));
  }
  return true;
}

template <bool E4M3>
bool attend_decode_rows(const AttnTask& a) {
  switch (a.R) {
    case 1: return attend_decode<1, E4M3>(a);
    case 2: return attend_decode<2, E4M3>(a);
    case 3: return attend_decode<3, E4M3>(a);
    case 4: return attend_decode<4, E4M3>(a);
    case 5: return attend_decode<5, E4M3>(a);
    case 6: return attend_decode<6, E4M3>(a);
    case 7: return attend_decode<7, E4M3>(a);
    case 8: return attend_decode<8, E4M3>(a);
  }
  return false;
}

}  // namespace

bool attend_avx2_decode(const AttnTask& t) {
  if (t.D % 16 != 0 || t.R < 1 || t.R > 8) return false;
  if (t.kind == KvKind::e4m3) return attend_decode_rows<true>(t);
  if (t.kind == KvKind::e5m2) return attend_decode_rows<false>(t);
  return false;
}

void attend_avx2(const AttnTask& t) {
  if (attend_avx2_decode(t)) return;
  attend_impl<Avx2>(t);
}

}  // namespace fp8_backend

#pragma GCC pop_options
