// FP8 KV cache ops on CPU (torch.ops.fp8_backend.*): the paged cache write (quantize with the
// layer's k/v scales, round half to even, saturate) and paged attention reading the FP8 blocks
// directly (numerics.paged_kv_write / numerics.paged_attention). Argument checks, query staging
// (softmax_scale * k_scale folded in), task split over (sequence, kv head, query rows) with
// at::parallel_for, the kernel choice (attention_path, on the CPU path registry of isa.h), and the
// epilogue (v_scale, rounding to the query dtype).
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/extension.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE, baseline on x86-64)
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"
#include "isa.h"

namespace fp8_backend {
namespace {

// kv_cache_dtype string + cache tensor dtype -> what the cache bytes hold.
KvKind cache_kind(const std::string& kv_dtype, const at::Tensor& cache, const char* op) {
  const auto st = cache.scalar_type();
  if (kv_dtype == "fp8" || kv_dtype == "fp8_e4m3") {
    TORCH_CHECK(st == at::kByte || st == at::kFloat8_e4m3fn, op, ": kv_cache_dtype '", kv_dtype,
                "' needs a uint8 or float8_e4m3fn cache; found ", st);
    return KvKind::e4m3;
  }
  if (kv_dtype == "fp8_e5m2") {
    TORCH_CHECK(st == at::kByte || st == at::kFloat8_e5m2, op,
                ": kv_cache_dtype 'fp8_e5m2' needs a uint8 or float8_e5m2 cache; found ", st);
    return KvKind::e5m2;
  }
  TORCH_CHECK(kv_dtype == "auto" || kv_dtype == "bfloat16" || kv_dtype == "float16" || kv_dtype == "float32",
              op, ": kv_cache_dtype must be auto, fp8, fp8_e4m3 or fp8_e5m2; found '", kv_dtype, "'");
  if (st == at::kBFloat16) return KvKind::bf16;
  if (st == at::kHalf) return KvKind::f16;
  TORCH_CHECK(st == at::kFloat, op, ": a 16/32-bit cache must be bfloat16, float16 or float32; found ", st);
  return KvKind::f32;
}

void check_cache(const at::Tensor& c, const char* name, const char* op) {
  TORCH_CHECK(c.device().is_cpu(), op, ": ", name, " must be a CPU tensor; found ", c.device());
  TORCH_CHECK(c.dim() == 4, op, ": ", name, " must be [num_blocks, num_kv_heads, block_size, head_size]; found shape ",
              c.sizes());
  TORCH_CHECK(c.stride(3) == 1, op, ": ", name, " must have a contiguous last dimension; found strides ", c.strides());
}

// Scales as fp32 per kv head (1 element broadcasts); finite and > 0.
std::vector<float> head_scales(const at::Tensor& s, int64_t H, const char* name, const char* op) {
  TORCH_CHECK(s.numel() == 1 || s.numel() == H, op, ": ", name, " must have 1 or num_kv_heads=", H,
              " elements; found shape ", s.sizes());
  // A contiguous fp32 CPU tensor (what vLLM and the Python wrappers pass) is read in place: no
  // tensor ops, which would cost more than a short decode step's kernel.
  const bool direct = s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous();
  const at::Tensor f = direct ? s : s.detach().to(at::kCPU, at::kFloat).contiguous().reshape({-1});
  const float* fp = f.data_ptr<float>();
  std::vector<float> out(H);
  for (int64_t h = 0; h < H; ++h) {
    const float v = fp[s.numel() == 1 ? 0 : h];
    TORCH_CHECK(std::isfinite(v) && v > 0.f, op, ": ", name, " must be finite and > 0; found ", v,
                s.numel() == 1 ? std::string() : " at kv head " + std::to_string(h));
    out[h] = v;
  }
  return out;
}

// A 1-D int32 / int64 CPU index tensor (query_start_loc, seq_lens) as int64 values.
std::vector<int64_t> index_vector(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong), op, ": ", name,
              " must be an int32 or int64 CPU tensor; found ", t.scalar_type(), " on ", t.device());
  const at::Tensor c = t.reshape({-1}).contiguous();
  std::vector<int64_t> v(c.numel());
  if (c.scalar_type() == at::kInt)
    std::copy(c.data_ptr<int32_t>(), c.data_ptr<int32_t>() + c.numel(), v.begin());
  else
    std::copy(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel(), v.begin());
  return v;
}

template <typename T>
inline float load_f(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

// One token's K or V for one kv head -> cache row: FP8 = saturate(RNE(x / scale)).
template <typename T>
void write_row(const T* x, int64_t D, KvKind kind, float scale, uint8_t* dst) {
  if (kind == KvKind::e4m3 || kind == KvKind::e5m2) {
    const float mx = kind == KvKind::e4m3 ? 448.f : 57344.f;
    for (int64_t d = 0; d < D; ++d) {
      float v = static_cast<float>(x[d]) / scale;
      v = v > mx ? mx : (v < -mx ? -mx : v);  // NaN passes through as NaN
      dst[d] = kind == KvKind::e4m3 ? c10::Float8_e4m3fn(v).x : c10::Float8_e5m2(v).x;
    }
  } else if (kind == KvKind::bf16) {
    auto* o = reinterpret_cast<c10::BFloat16*>(dst);
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<c10::BFloat16>(static_cast<float>(x[d]));
  } else if (kind == KvKind::f16) {
    auto* o = reinterpret_cast<c10::Half*>(dst);
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<c10::Half>(static_cast<float>(x[d]));
  } else {
    auto* o = reinterpret_cast<float*>(dst);
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(x[d]);
  }
}

void kv_cache_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping, const std::string& kv_cache_dtype,
                    const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const char* op = "fp8_backend.kv_cache_write";
  check_cache(key_cache, "key_cache", op);
  check_cache(value_cache, "value_cache", op);
  const KvKind kind = cache_kind(kv_cache_dtype, key_cache, op);
  TORCH_CHECK(cache_kind(kv_cache_dtype, value_cache, op) == kind, op,
              ": key_cache and value_cache hold different dtypes (", key_cache.scalar_type(), " vs ",
              value_cache.scalar_type(), ")");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), op, ": key_cache ", key_cache.sizes(),
              " and value_cache ", value_cache.sizes(), " differ in shape");
  const int64_t NB = key_cache.size(0), H = key_cache.size(1), BS = key_cache.size(2), D = key_cache.size(3);
  for (const auto* t : {&key, &value}) {
    const char* nm = t == &key ? "key" : "value";
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->size(1) == H && t->size(2) == D, op, ": ", nm,
                " must be a CPU tensor [num_tokens, ", H, ", ", D, "] matching the cache; found shape ",
                t->sizes(), " on ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf ||
                    t->scalar_type() == at::kFloat,
                op, ": ", nm, " must be bfloat16, float16 or float32; found ", t->scalar_type());
  }
  TORCH_CHECK(key.sizes() == value.sizes() && key.scalar_type() == value.scalar_type(), op,
              ": key ", key.sizes(), " and value ", value.sizes(), " differ in shape or dtype");
  const int64_t T = key.size(0);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) >= T &&
                  (slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt),
              op, ": slot_mapping must be a 1-D int32/int64 tensor of at least num_tokens=", T,
              " elements; found shape ", slot_mapping.sizes(), " dtype ", slot_mapping.scalar_type());
  const bool fp8 = kind == KvKind::e4m3 || kind == KvKind::e5m2;
  std::vector<float> ks(H, 1.f), vs(H, 1.f);
  if (fp8) {
    ks = head_scales(k_scale, H, "k_scale", op);
    vs = head_scales(v_scale, H, "v_scale", op);
  }
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(sl[i] < NB * BS && sl[i] >= -1, op, ": slot_mapping[", i, "] = ", sl[i],
                " is outside the cache (num_blocks * block_size = ", NB * BS, "; -1 skips a token)");
  const at::Tensor k = key.contiguous(), v = value.contiguous();
  const int64_t eb = key_cache.element_size();
  uint8_t* kc = static_cast<uint8_t*>(key_cache.data_ptr());
  uint8_t* vc = static_cast<uint8_t*>(value_cache.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "kv_cache_write", [&] {
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (sl[t] < 0) continue;
        const int64_t blk = sl[t] / BS, off = sl[t] % BS;
        for (int64_t h = 0; h < H; ++h) {
          write_row(kp + (t * H + h) * D, D, kind, ks[h],
                    kc + (blk * key_cache.stride(0) + h * key_cache.stride(1) + off * key_cache.stride(2)) * eb);
          write_row(vp + (t * H + h) * D, D, kind, vs[h],
                    vc + (blk * value_cache.stride(0) + h * value_cache.stride(1) + off * value_cache.stride(2)) * eb);
        }
      }
    });
  });
}

// Row conversions for the query / output staging, written so that the compiler vectorizes them
// (bf16 <-> fp32 by bit operations: c10's scalar conversions are not vectorized).
template <typename T>
inline void row_to_float(const T* src, int64_t n, float scale, float* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t d = 0; d < n; ++d) {
      const uint32_t bits = static_cast<uint32_t>(s[d]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      dst[d] = f * scale;
    }
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]) * scale;
  }
}

template <typename T>
inline void row_from_float(const float* src, int64_t n, float scale, T* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* o = reinterpret_cast<uint16_t*>(dst);
    for (int64_t d = 0; d < n; ++d) {
      const float f = src[d] * scale;
      uint32_t u;
      std::memcpy(&u, &f, 4);
      const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round half to even
      o[d] = static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);           // NaN stays NaN
    }
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * scale);
  }
}

// Flush-to-zero and denormals-are-zero for this thread while it runs attention tasks (restored
// after). Probabilities of keys whose score is far below the row's max (s - m < -87 gives
// exp < 2^-126), their bf16 split residuals and products with them are fp32 denormals, and every
// x86 floating-point operation producing or reading one takes a microcode assist: attention with
// a wide score range (q scaled up 30-1000x) ran 1.7-1.9x slower. Flushed, such a term is at most
// 2^-126 against a softmax denominator >= 1 (the max term is 1): far below fp32 rounding.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    csr_ = _mm_getcsr();
    _mm_setcsr(csr_ | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~FlushDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(csr_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned csr_ = 0;
};

struct Work {  // one task: sequence s, kv head h, query tokens [j0, j1) of that sequence
  int64_t s, h, j0, j1;
};

void paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     at::Tensor& out, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     const at::Tensor& block_table, double softmax_scale, int64_t sliding_window,
                     const std::string& kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const char* op = "fp8_backend.paged_attention";
  check_cache(key_cache, "key_cache", op);
  check_cache(value_cache, "value_cache", op);
  const KvKind kind = cache_kind(kv_cache_dtype, key_cache, op);
  TORCH_CHECK(cache_kind(kv_cache_dtype, value_cache, op) == kind && key_cache.sizes() == value_cache.sizes(), op,
              ": key_cache ", key_cache.sizes(), " ", key_cache.scalar_type(), " and value_cache ",
              value_cache.sizes(), " ", value_cache.scalar_type(), " must match");
  const int64_t NB = key_cache.size(0), Hkv = key_cache.size(1), BS = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(query.device().is_cpu() && query.dim() == 3 && query.size(2) == D, op,
              ": query must be a CPU tensor [num_tokens, num_heads, head_size=", D, "]; found shape ",
              query.sizes());
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf ||
                  query.scalar_type() == at::kFloat,
              op, ": query must be bfloat16, float16 or float32; found ", query.scalar_type());
  const int64_t T = query.size(0), Hq = query.size(1);
  TORCH_CHECK(Hq % Hkv == 0, op, ": num_heads=", Hq, " must be a multiple of num_kv_heads=", Hkv);
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() && out.stride(2) == 1, op,
              ": out must be ", query.sizes(), " ", query.scalar_type(), " with a contiguous last dimension; found ",
              out.sizes(), " ", out.scalar_type());
  const int64_t S = seq_lens.numel();
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.numel() == S + 1, op,
              ": query_start_loc must have num_seqs + 1 = ", S + 1, " elements; found shape ", query_start_loc.sizes());
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= S && block_table.scalar_type() == at::kInt, op,
              ": block_table must be int32 [num_seqs=", S, ", max_blocks]; found ", block_table.sizes(), " ",
              block_table.scalar_type());
  std::vector<float> ks(Hkv, 1.f), vs(Hkv, 1.f);  // 16/32-bit caches hold unscaled values
  if (kind == KvKind::e4m3 || kind == KvKind::e5m2) {
    ks = head_scales(k_scale, Hkv, "k_scale", op);
    vs = head_scales(v_scale, Hkv, "v_scale", op);
  }
  const std::vector<int64_t> qsl = index_vector(query_start_loc, "query_start_loc", op);
  const std::vector<int64_t> sls = index_vector(seq_lens, "seq_lens", op);
  const int64_t* qs = qsl.data();
  const int64_t* L = sls.data();
  const int64_t G = Hq / Hkv;
  // Query tokens per task: every task decodes the K/V its rows see once for all of its rows, so
  // long prefills take up to 256 rows (tokens x heads of one kv head) per task; halved down to 64
  // rows while that leaves fewer than 4 tasks per thread.
  int64_t tokens = 0;
  for (int64_t s = 0; s < S; ++s) tokens += std::max<int64_t>(0, qs[s + 1] - qs[s]);
  int64_t rows_per_task = std::max<int64_t>(1, 256 / G);  // query tokens per task
  const int64_t min_rows = std::max<int64_t>(1, 64 / G);
  while (rows_per_task > min_rows && Hkv * ((tokens + rows_per_task - 1) / rows_per_task) < 4 * at::get_num_threads())
    rows_per_task = std::max(min_rows, rows_per_task / 2);
  std::vector<Work> work;
  int64_t max_rows = 1;  // query rows of the largest task (sizes the per-thread scratch)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = qs[s + 1] - qs[s];
    TORCH_CHECK(n >= 0 && qs[s + 1] <= T, op, ": query_start_loc is not non-decreasing within [0, ", T, "] at ", s);
    if (n == 0) continue;
    TORCH_CHECK(L[s] >= n, op, ": seq_lens[", s, "] = ", L[s], " is shorter than its ", n, " query tokens");
    const int64_t nblk = (L[s] + BS - 1) / BS;
    TORCH_CHECK(nblk <= block_table.size(1), op, ": sequence ", s, " of ", L[s], " tokens needs ", nblk,
                " blocks; block_table has ", block_table.size(1), " columns");
    const int32_t* row = block_table.data_ptr<int32_t>() + s * block_table.stride(0);
    for (int64_t b = 0; b < nblk; ++b)
      TORCH_CHECK(row[b] >= 0 && row[b] < NB, op, ": block_table[", s, ", ", b, "] = ", row[b],
                  " is outside the cache (num_blocks = ", NB, ")");
    max_rows = std::max(max_rows, std::min(n, rows_per_task) * G);
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t j0 = 0; j0 < n; j0 += rows_per_task) work.push_back({s, h, j0, std::min(n, j0 + rows_per_task)});
  }
  const AttnPath path = attention_path(selected_cpu_isa(), D, kind);
  const bool amx = path == AttnPath::amx;
  const int q_parts = query.scalar_type() == at::kBFloat16 ? 1 : (query.scalar_type() == at::kHalf ? 2 : 3);
  const int64_t eb = key_cache.element_size();
  const uint8_t* kc = static_cast<const uint8_t*>(key_cache.data_ptr());
  const uint8_t* vc = static_cast<const uint8_t*>(value_cache.data_ptr());
  const float sm = static_cast<float>(softmax_scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention", [&] {
    const scalar_t* qp = query.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t w0, int64_t w1) {
      const FlushDenormals ftz;
      const int64_t Rmax = max_rows;
      // Scratch without zero-filling (every element is written before it is read).
      std::unique_ptr<float[]> qbuf(new float[Rmax * D]), obuf(new float[Rmax * D]),
          wbuf(new float[attn_work_floats(Rmax, D)]);
      std::unique_ptr<int64_t[]> pos(new int64_t[Rmax]);
      for (int64_t w = w0; w < w1; ++w) {
        const Work& wk = work[w];
        const int64_t n = qs[wk.s + 1] - qs[wk.s], R = (wk.j1 - wk.j0) * G;
        const float qscale = amx ? 1.f : sm * ks[wk.h];  // AMX scales the scores instead
        for (int64_t j = wk.j0; j < wk.j1; ++j)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = (j - wk.j0) * G + g;
            const scalar_t* src = qp + (qs[wk.s] + j) * query.stride(0) + (wk.h * G + g) * query.stride(1);
            row_to_float(src, D, qscale, qbuf.get() + r * D);
            pos[r] = L[wk.s] - n + j;
          }
        AttnTask t;
        t.q = qbuf.get();
        t.pos = pos.get();
        t.R = R;
        t.D = D;
        t.kc = kc + wk.h * key_cache.stride(1) * eb;
        t.vc = vc + wk.h * value_cache.stride(1) * eb;
        t.k_blk = key_cache.stride(0) * eb;
        t.k_tok = key_cache.stride(2) * eb;
        t.v_blk = value_cache.stride(0) * eb;
        t.v_tok = value_cache.stride(2) * eb;
        t.blocks = block_table.data_ptr<int32_t>() + wk.s * block_table.stride(0);
        t.block_size = BS;
        t.window = sliding_window > 0 ? sliding_window : 0;
        t.kind = kind;
        t.out = obuf.get();
        t.work = wbuf.get();
        t.qk_scale = sm * ks[wk.h];
        t.q_parts = q_parts;
        if (w + 1 < w1 && !(sliding_window > 0)) {
          const Work& nx = work[w + 1];
          const int32_t b0 = block_table.data_ptr<int32_t>()[nx.s * block_table.stride(0)];
          t.next_k = kc + (nx.h * key_cache.stride(1) + b0 * key_cache.stride(0)) * eb;
          t.next_v = vc + (nx.h * value_cache.stride(1) + b0 * value_cache.stride(0)) * eb;
          t.next_n = std::min<int64_t>(BS, L[nx.s]);
        }
        switch (path) {
          case AttnPath::amx: attend_amx(t); break;
          case AttnPath::avx512: attend_avx512(t); break;
          case AttnPath::avx2: attend_avx2(t); break;
          case AttnPath::portable: attend_portable(t); break;
        }
        const float vsc = vs[wk.h];
        for (int64_t j = wk.j0; j < wk.j1; ++j)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = (j - wk.j0) * G + g;
            scalar_t* dst = op_ + (qs[wk.s] + j) * out.stride(0) + (wk.h * G + g) * out.stride(1);
            row_from_float(obuf.get() + r * D, D, vsc, dst);
          }
      }
      if (amx) attend_amx_release();
    });
  });
}

}  // namespace

AttnPath attention_path(CpuIsa isa, int64_t D, KvKind kind) {
  const bool amx_cache = kind == KvKind::e4m3 || kind == KvKind::e5m2 || kind == KvKind::bf16;
  if (isa == CpuIsa::amx && D % 32 == 0 && D <= 256 && amx_cache) return AttnPath::amx;
  if (isa >= CpuIsa::avx512 && D % 16 == 0) return AttnPath::avx512;
  if (isa >= CpuIsa::avx2 && D % 8 == 0) return AttnPath::avx2;
  return AttnPath::portable;
}

const char* attention_path_name(AttnPath path) {
  switch (path) {
    case AttnPath::amx: return "amx";
    case AttnPath::avx512: return "avx512";
    case AttnPath::avx2: return "avx2";
    case AttnPath::portable: break;
  }
  return "portable";
}

std::string selected_attention_path(int64_t head_size, const std::string& cache_dtype) {
  // uint8 holds either FP8 format: both take the same paths.
  static const std::pair<const char*, KvKind> kinds[] = {
      {"uint8", KvKind::e4m3},    {"float8_e4m3fn", KvKind::e4m3}, {"float8_e5m2", KvKind::e5m2},
      {"bfloat16", KvKind::bf16}, {"float16", KvKind::f16},        {"float32", KvKind::f32}};
  TORCH_CHECK(head_size > 0, "attention_path: head_size must be > 0; found ", head_size);
  for (const auto& [name, kind] : kinds)
    if (cache_dtype == name) return attention_path_name(attention_path(selected_cpu_isa(), head_size, kind));
  TORCH_CHECK(false, "attention_path: cache_dtype must be uint8, float8_e4m3fn, float8_e5m2, bfloat16, ",
              "float16 or float32; found '", cache_dtype, "'");
}

}  // namespace fp8_backend

TORCH_LIBRARY_FRAGMENT(fp8_backend, m) {
  m.def(
      "kv_cache_write(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()");
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor(a!) out, "
      "Tensor query_start_loc, Tensor seq_lens, Tensor block_table, float softmax_scale, "
      "int sliding_window, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()");
}

TORCH_LIBRARY_IMPL(fp8_backend, CPU, m) {
  m.impl("kv_cache_write", &fp8_backend::kv_cache_write);
  m.impl("paged_attention", &fp8_backend::paged_attention);
}
