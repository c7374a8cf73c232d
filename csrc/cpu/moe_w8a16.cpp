// Fused W8A16 mixture of experts on CPU (numerics.fused_moe_w8a16), built on the dense W8A16
// kernels (kernels.h) and their per-shape plan (w8a16_plan):
//  1. the (token, slot) pairs are grouped by expert with a stable counting sort over topk_ids;
//  2. per expert with tokens: its rows of x are gathered straight into the layout the planned
//     kernel reads (fp32 staged for the GEMV / decode + fp32 GEMM, bf16 VNNI tiles for AMX);
//  3. gate and up in one pass over the [2I, H] weights (two when a block grid splits them), the
//     sums scaled and rounded to x.dtype as w8a16_linear does;
//  4. silu(g) * u in fp32, rounded to x.dtype, staged as the down projection's input;
//  5. the down projection in fp32 (raw sums; block scales inside, channel scales after), weighted
//     by topk_weights and added into an fp32 [T, H] accumulator, experts in increasing order
//     (the reference's order); one final rounding to x.dtype.
// The weights of an expert are read once per call and decoded once per panel (the dense
// kernels' reuse of decoded weights across the rows of the tile). Threads split the output rows
// of each GEMM and the columns of the weighted reduction (each column owned by one thread: no
// races, and sums in the same order whatever the thread count); with many rows per expert they
// take whole experts instead (see kByExpertMinRows).
//
// On the amx path, gate/up with bf16 activations run the AMX tile GEMM (its bf16 epilogue is the
// rounding point the spec has there); the down projection keeps fp32 sums, so it runs the fp32
// kernels of the same CPU (avx512_vbmi).
#include "moe_w8a16.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fp8_e4m3.h"
#include "huge_buffer.h"

namespace fp8_backend {
namespace {

constexpr int64_t kKBlock = 64;  // the GEMV's k-block: staged activations are zero-padded to it
// Mean rows per expert above which threads take whole experts (the decode + GEMM regime of the
// avx2 plan) instead of splitting each expert's output rows.
constexpr int64_t kByExpertMinRows = 16;

// One weight matrix of one expert (or the gate / up half of w13) and its scales.
struct Part {
  const uint8_t* w;    // [N, K] FP8 bytes, row-major
  int64_t N, K;
  const float* s;      // per channel: [N]; blocks: [ceil(N / bn), ceil(K / bk)]
  int64_t bn, bk;      // 0, 0: per channel
  bool blocked() const { return bn > 0; }
  int64_t kb() const { return (K + bk - 1) / bk; }
};

// The order in which the planned kernel wants staged activations (ops.cpp, stage_activations):
// the GEMV decoders' permuted lanes within 4 * lanes-wide blocks, or natural order (lanes 0).
int stage_lanes(const W8a16Plan& p) {
  if (p.kernel != W8a16Kernel::gemv) return 0;
  return p.fp32_isa == CpuIsa::avx512_vbmi ? 16 : p.fp32_isa == CpuIsa::avx2 ? 8 : 0;
}

// Row stride of staged activations: the GEMV reads whole 64-blocks (zero tail); the fp32 GEMM
// reads exactly K columns.
int64_t stage_ld(const W8a16Plan& p, int64_t K) {
  return p.kernel == W8a16Kernel::gemv ? (K + kKBlock - 1) / kKBlock * kKBlock : K;
}

// One activation row, value k = get(k) for k < K, into o[0, ld) in the kernel's order.
template <typename Get>
inline void stage_row(const Get& get, int64_t K, int64_t ld, int lanes, float* o) {
  if (lanes == 0) {
    for (int64_t k = 0; k < K; ++k) o[k] = get(k);
    std::fill(o + K, o + ld, 0.f);
    return;
  }
  for (int64_t b = 0; b < ld; b += 4 * lanes)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < lanes; ++l) {
        const int64_t k = b + gemv_source_index(lanes, j, l);
        o[b + lanes * j + l] = k < K ? get(k) : 0.f;
      }
}

// Staged activations [M, ld] for `plan`, made ready for its kernel: the AVX2 GEMV wants each row
// pre-multiplied by a power of two (avx2_prescale, kernels.h; headroom: the largest block scale
// the parts will multiply them by). Returns the GEMV's per-row out_scale (ones for the others).
std::vector<float> prepare_staged(const W8a16Plan& plan, float* xs, int64_t M, int64_t ld, const Part* parts,
                                  int nparts) {
  std::vector<float> out_scale(static_cast<size_t>(M), 1.f);
  if (plan.kernel != W8a16Kernel::gemv || plan.fp32_isa != CpuIsa::avx2) return out_scale;
  float headroom = 1.f;
  for (int q = 0; q < nparts; ++q)
    if (parts[q].blocked())
      headroom = block_scale_headroom(parts[q].s, (parts[q].N + parts[q].bn - 1) / parts[q].bn * parts[q].kb(),
                                      headroom);
  avx2_prescale(xs, M, ld, headroom, out_scale.data());
  return out_scale;
}

void gemv_isa(CpuIsa f32, const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, int64_t n0,
              int64_t n1, float* D, int64_t ldd, const float* out_scale) {
  switch (f32) {
    case CpuIsa::avx512_vbmi: gemv_avx512_vbmi(x, ldx, M, w, K, n0, n1, D, ldd); break;
    case CpuIsa::avx512: gemv_avx512(x, ldx, M, w, K, n0, n1, D, ldd); break;
    case CpuIsa::avx2: gemv_avx2(x, ldx, M, w, K, n0, n1, D, ldd, out_scale); break;
    default: gemv_portable(x, ldx, M, w, K, n0, n1, D, ldd); break;
  }
}

void decode_rows_isa(CpuIsa f32, const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out) {
  switch (f32) {
    case CpuIsa::portable: decode_rows_portable(w, K, n0, n1, out); break;
    case CpuIsa::avx2: decode_rows_avx2(w, K, n0, n1, out); break;
    default: decode_rows_avx512(w, K, n0, n1, out); break;
  }
}

// D[m, n] (row stride ldd) = sum_k x[m, k] * fp8(w[n, k]) * (block scale of (n, k), or 1 for
// per-channel scales, which the caller applies to these raw sums) for m < M, n < p.N. x: staged
// for `plan` (stage_row, then prepare_staged), row stride ldx; out_scale: prepare_staged's rows.
void part_gemm(const W8a16Plan& plan, const float* xs, int64_t ldx, int64_t M, const Part& p, float* D,
               int64_t ldd, const float* out_scale) {
  const int64_t N = p.N, K = p.K;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(D + m * ldd, D + m * ldd + N, 0.f);
    return;
  }
  if (plan.kernel == W8a16Kernel::gemv && !p.blocked()) {
    // Blocks of 4 output rows, >= ~64k multiply-adds per task (as the dense op).
    const int64_t nblk = (N + 3) / 4;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 4 * K * M));
    at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
      gemv_isa(plan.fp32_isa, xs, ldx, M, p.w, K, b0 * 4, std::min(N, b1 * 4), D, ldd, out_scale);
    });
    return;
  }
  if (plan.kernel == W8a16Kernel::gemv) {
    // Block scales (bk a multiple of 64, w8a16_plan's condition): per block of bn weight rows,
    // the plain GEMV on a copy of x scaled per K block, since
    //     sum_kb s[nb][kb] sum_{k in kb} x[k] w[n][k] = sum_k (x[k] s[nb][k / bk]) w[n][k].
    const int64_t nblocks = (N + p.bn - 1) / p.bn, kb = p.kb();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> xb_store(static_cast<size_t>(M * ldx) + 16);
      float* xb = xb_store.data() + ((16 - (reinterpret_cast<uintptr_t>(xb_store.data()) / 4) % 16) % 16);
      for (int64_t b = b0; b < b1; ++b) {
        const float* sr = p.s + b * kb;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k0 = 0; k0 < ldx; k0 += kKBlock) {
            const float sc = sr[std::min(k0, K - 1) / p.bk];
            for (int64_t j = 0; j < kKBlock; ++j) xb[m * ldx + k0 + j] = xs[m * ldx + k0 + j] * sc;
          }
        gemv_isa(plan.fp32_isa, xb, ldx, M, p.w, K, b * p.bn, std::min(N, (b + 1) * p.bn), D, ldd, out_scale);
      }
    });
    return;
  }
  // Decode + fp32 GEMM: panels of weight rows decoded once (exact FP8 values, times their block
  // scale) and multiplied with torch's fp32 GEMM.
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor xf = at::from_blob(const_cast<float*>(xs), {M, K}, {ldx, 1}, f32);
  const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(64, ((int64_t(1) << 20) / K) & ~int64_t(15)));
  // The decoded panel: the calling thread's scratch, kept between experts and calls (no fresh
  // pages to fault in per panel).
  static thread_local HugeBuffer panel;
  float* wb = static_cast<float*>(panel.get(static_cast<size_t>(nb * K) * 4));
  const at::Tensor wbuf = at::from_blob(wb, {nb, K}, f32);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t rows = std::min(nb, N - n0);
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      decode_rows_isa(plan.fp32_isa, p.w + n0 * K, K, r0, r1, wb + r0 * K);
      if (p.blocked()) {
        const int64_t kb = p.kb();
        for (int64_t r = r0; r < r1; ++r) {
          const float* sr = p.s + ((n0 + r) / p.bn) * kb;
          float* o = wb + r * K;
          for (int64_t b = 0; b < kb; ++b) {  // one scale per K block (a vectorizable loop)
            const float sc = sr[b];
            for (int64_t k = b * p.bk, k1 = std::min(K, k + p.bk); k < k1; ++k) o[k] *= sc;
          }
        }
      }
    });
    at::Tensor Dn = at::from_blob(D + n0, {M, rows}, {ldd, 1}, f32);
    at::mm_out(Dn, xf, wbuf.narrow(0, 0, rows).t());
  }
}

// x.dtype rounding of an fp32 value, back in fp32 (exact): the spec's rounding points.
template <typename T>
inline float round16(float v) {
  return static_cast<float>(static_cast<T>(v));
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

struct MoeArgs {
  int64_t T, H, E, I, topk;
  int64_t bn, bk;  // 0, 0: per-channel scales
  CpuIsa isa;
  bool bf16;
};

// One expert's rows: tok[m], wt[m] for m < M (tokens in increasing order; a token routed to the
// expert twice appears twice). Adds wt[m] * down(silu(gate) * up)(x[tok[m]]) into out32, or,
// with rows_out, writes it to row m of rows_out [M, H] (the caller reduces).
template <typename T>
void run_expert(const MoeArgs& a, const T* x, const Part& gate, const Part& up, bool fused13, const Part& down,
                const int64_t* tok, const float* wt, int64_t M, float* out32, float* rows_out) {
  const int64_t H = a.H, I = a.I;
  const int64_t small_m = plan_small_m_max_override(), amx_m = plan_amx_min_m_override();
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  // g and u rounded to x.dtype (as fp32): gu[m * 2I + i] = g, gu[m * 2I + I + i] = u.
  at::Tensor gu_t = at::empty({M, 2 * I}, f32);
  float* gu = gu_t.data_ptr<float>();
  const W8a16Plan p13 = w8a16_plan(a.isa, M, fused13 ? 2 * I : I, H, a.bf16, a.bk, small_m, amx_m);
  const Part parts13[2] = {fused13 ? Part{gate.w, 2 * I, H, gate.s, gate.bn, gate.bk} : gate, up};
  const int nparts = fused13 ? 1 : 2;
  if (p13.kernel == W8a16Kernel::amx_tile_gemm && H > 0 && I > 0) {
    // AMX: gathered bf16 rows packed into VNNI B tiles; the tile GEMM's epilogue scales and
    // rounds to bf16 (per-channel scale, or block scales inside and 1 here).
    const int64_t Mp = (M + 31) / 32 * 32, Kp = (H + 63) / 64 * 64;
    at::Tensor xg_t = at::empty({M, H}, at::TensorOptions().dtype(at::kBFloat16));
    uint16_t* xg = reinterpret_cast<uint16_t*>(xg_t.data_ptr());
    for (int64_t m = 0; m < M; ++m)
      std::copy_n(reinterpret_cast<const uint16_t*>(x) + tok[m] * H, H, xg + m * H);
    at::Tensor xs_t = at::empty({Mp * Kp}, at::TensorOptions().dtype(at::kBFloat16));
    uint32_t* xs = reinterpret_cast<uint32_t*>(xs_t.data_ptr());
    at::parallel_for(0, Mp / 16, 1, [&](int64_t i0, int64_t i1) { pack_x_vnni(xg, M, H, H, i0, i1, Kp, xs); });
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xs);
    static const float kOne = 1.f;
    int64_t col = 0;
    for (int q = 0; q < nparts; ++q) {
      const Part& p = parts13[q];
      at::Tensor y_t = at::empty({M, p.N}, at::TensorOptions().dtype(at::kBFloat16));
      uint16_t* y = reinterpret_cast<uint16_t*>(y_t.data_ptr());
      const AmxBlocking b = amx_blocking(Mp, H, p.N, at::get_num_threads());
      const int64_t panels = (p.N + b.nb - 1) / b.nb;
      for (int64_t m0 = 0; m0 < Mp; m0 += b.mc) {
        const int64_t mb = std::min(b.mc, Mp - m0);
        const Bf16Epilogue ep{p.blocked() ? &kOne : p.s, !p.blocked(), nullptr, y + m0 * p.N, std::min(mb, M - m0)};
        const uint16_t* xb = xp + (m0 / 16) * (Kp / 32) * 512;
        at::parallel_for(0, panels, 1, [&](int64_t q0, int64_t q1) {
          gemm_amx(xb, Kp, mb, p.w, p.N, H, b.nb, b.kc, q0, q1, p.blocked() ? p.s : nullptr, p.bn, p.bk, ep);
        });
      }
      const c10::BFloat16* yb = reinterpret_cast<const c10::BFloat16*>(y);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < p.N; ++n) gu[m * 2 * I + col + n] = static_cast<float>(yb[m * p.N + n]);
      col += p.N;
    }
  } else {
    const int64_t ldx = stage_ld(p13, H);
    const int lanes = stage_lanes(p13);
    at::Tensor xs_t = at::empty({M, ldx}, f32);  // 64-byte aligned rows when ldx is a multiple of 64
    float* xs = xs_t.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const T* xr = x + tok[m] * H;
        stage_row([xr](int64_t k) { return static_cast<float>(xr[k]); }, H, ldx, lanes, xs + m * ldx);
      }
    });
    const std::vector<float> os13 = prepare_staged(p13, xs, M, ldx, parts13, nparts);
    at::Tensor d_t = at::empty({M, 2 * I}, f32);
    float* d = d_t.data_ptr<float>();
    for (int q = 0; q < nparts; ++q) part_gemm(p13, xs, ldx, M, parts13[q], d + q * I, 2 * I, os13.data());
    // The epilogue of w8a16_linear: per-channel scale times the fp32 sum, rounded to x.dtype.
    const float* sg = gate.s;  // per channel: [2I] when fused, else gate [I] then up [I]
    at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < 2 * I; ++n) {
          float v = d[m * 2 * I + n];
          if (!gate.blocked()) v *= n < I ? sg[n] : up.s[n - I];
          gu[m * 2 * I + n] = round16<T>(v);
        }
    });
  }

  // silu(g) * u in fp32, rounded to x.dtype: the down projection's input, staged for its kernel.
  // On the amx path the down projection keeps fp32 sums: the fp32 kernels of that CPU.
  const CpuIsa down_isa = a.isa == CpuIsa::amx ? CpuIsa::avx512_vbmi : a.isa;
  const W8a16Plan p2 = w8a16_plan(down_isa, M, H, I, a.bf16, a.bk, small_m, amx_m);
  const int64_t lda = stage_ld(p2, I);
  const int lanes2 = stage_lanes(p2);
  at::Tensor as_t = at::empty({M, lda}, f32);
  float* as = as_t.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = gu + m * 2 * I;
      stage_row([g, I](int64_t i) { return round16<T>(silu(g[i]) * g[I + i]); }, I, lda, lanes2, as + m * lda);
    }
  });
  at::Tensor d2_t = at::empty({M, H}, f32);
  float* d2 = d2_t.data_ptr<float>();
  const std::vector<float> os2 = prepare_staged(p2, as, M, lda, &down, 1);
  part_gemm(p2, as, lda, M, down, d2, H, os2.data());

  // Weighted reduction: out32[tok, n] += wt * (d2 * scale[n]), as numerics (d, then d * weight,
  // then the sum); threads own columns, rows in order.
  at::parallel_for(0, H, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const float* dr = d2 + m * H;
      const float w = wt[m];
      if (rows_out) {
        float* o = rows_out + m * H;
        for (int64_t n = n0; n < n1; ++n) o[n] = (down.blocked() ? dr[n] : dr[n] * down.s[n]) * w;
        continue;
      }
      float* o = out32 + tok[m] * H;
      if (down.blocked()) {
        for (int64_t n = n0; n < n1; ++n) o[n] += dr[n] * w;
      } else {
        for (int64_t n = n0; n < n1; ++n) o[n] += (dr[n] * down.s[n]) * w;
      }
    }
  });
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

at::Tensor fused_moe_w8a16(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w13_scale,
                           const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                           const at::Tensor& topk_ids, at::OptionalIntArrayRef block_size) {
  const char* op = "fp8_backend.fused_moe_w8a16";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"x", &x}, {"w13", &w13},
                                {"w13_scale", &w13_scale}, {"w2", &w2}, {"w2_scale", &w2_scale},
                                {"topk_weights", &topk_weights}, {"topk_ids", &topk_ids}})
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor; found it on ", t->device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16 (W8A16 keeps activations 16-bit); found ", x.scalar_type());
  TORCH_CHECK(w13.scalar_type() == at::kFloat8_e4m3fn, op, ": w13 must be float8_e4m3fn; found ",
              w13.scalar_type());
  TORCH_CHECK(w2.scalar_type() == at::kFloat8_e4m3fn, op, ": w2 must be float8_e4m3fn; found ", w2.scalar_type());
  TORCH_CHECK(w13_scale.scalar_type() == at::kFloat, op, ": w13_scale must be float32; found ",
              w13_scale.scalar_type());
  TORCH_CHECK(w2_scale.scalar_type() == at::kFloat, op, ": w2_scale must be float32; found ",
              w2_scale.scalar_type());
  TORCH_CHECK(at::isFloatingType(topk_weights.scalar_type()), op,
              ": topk_weights must be floating point (float32); found ", topk_weights.scalar_type());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong, op,
              ": topk_ids must be int32 or int64; found ", topk_ids.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, H]; found shape ", shape_str(x.sizes()));
  TORCH_CHECK(w13.dim() == 3, op, ": w13 must be [E, 2I, H]; found shape ", shape_str(w13.sizes()));
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) % 2 == 0 && w13.size(2) == H, op, ": w13 must be [E, 2I, H] with H=", H,
              " (from x ", shape_str(x.sizes()), "); found shape ", shape_str(w13.sizes()));
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, op,
              ": w2 must be [E, H, I] = [", E, ", ", H, ", ", I, "] (from w13 ", shape_str(w13.sizes()),
              "); found shape ", shape_str(w2.sizes()));
  int64_t bn = 0, bk = 0;
  std::vector<int64_t> s13{E, 2 * I}, s2{E, H};
  if (block_size.has_value()) {
    const auto bs = *block_size;
    TORCH_CHECK(bs.size() == 2 && bs[0] > 0 && bs[1] > 0, op,
                ": block_size must be [block_n, block_k] with positive sizes; found ", bs);
    bn = bs[0];
    bk = bs[1];
    auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
    s13 = {E, 2 * cdiv(I, bn), cdiv(H, bk)};
    s2 = {E, cdiv(H, bn), cdiv(I, bk)};
  }
  const char* kind = block_size.has_value() ? "block" : "per-channel";
  TORCH_CHECK(w13_scale.sizes() == at::IntArrayRef(s13), op, ": w13_scale (", kind, " scales) must have shape ",
              shape_str(s13), "; found ", shape_str(w13_scale.sizes()));
  TORCH_CHECK(w2_scale.sizes() == at::IntArrayRef(s2), op, ": w2_scale (", kind, " scales) must have shape ",
              shape_str(s2), "; found ", shape_str(w2_scale.sizes()));
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T, op, ": topk_ids must be [T, k] with T=", T,
              "; found shape ", shape_str(topk_ids.sizes()));
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), op, ": topk_weights must have the shape of topk_ids ",
              shape_str(topk_ids.sizes()), "; found ", shape_str(topk_weights.sizes()));
  const int64_t K = topk_ids.size(1), P = T * K;

  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor tw = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(id[p] >= 0 && id[p] < E, op, ": topk_ids must lie in [0, E=", E, "); found ", id[p],
                " at [", p / K, ", ", p % K, "]");

  // Counting sort of the (token, slot) pairs by expert; stable, so each expert's rows are in
  // token order, as the reference's nonzero() gives them.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) ++start[id[p] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> tok(P), fill(start.begin(), start.end() - 1);
  std::vector<float> wt(P);
  const float* twp = tw.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t q = fill[id[p]]++;
    tok[q] = p / K;
    wt[q] = twp[p];
  }

  at::Tensor out32 = at::zeros({T, H}, x.options().dtype(at::kFloat));
  if (T == 0 || H == 0) return out32.to(x.scalar_type());
  const at::Tensor xc = x.contiguous(), w13c = w13.contiguous(), w2c = w2.contiguous();
  const at::Tensor s13c = w13_scale.contiguous(), s2c = w2_scale.contiguous();
  const MoeArgs a{T, H, E, I, K, bn, bk, selected_cpu_isa(), x.scalar_type() == at::kBFloat16};
  const uint8_t* w13p = reinterpret_cast<const uint8_t*>(w13c.data_ptr());
  const uint8_t* w2p = reinterpret_cast<const uint8_t*>(w2c.data_ptr());
  const float* s13p = s13c.data_ptr<float>();
  const float* s2p = s2c.data_ptr<float>();
  // Gate and up in one pass over [2I, H] unless a block grid splits them (I not a multiple of bn:
  // each half has its own partial last block row).
  const bool fused13 = bn == 0 || I % bn == 0;
  const int64_t s13_rows = bn ? s13[1] / 2 : I;  // scale rows of the gate half
  const int64_t s13_cols = bn ? s13[2] : 1;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) active.push_back(e);
  // Threads: few rows per expert (decode; the GEMV regime) split each expert's output rows, as
  // the dense op. Many rows per expert (prefill) give each thread whole experts, which write
  // their weighted rows to a [T * k, H] buffer reduced afterwards in the same order as the
  // serial path (bit-identical results).
  const int threads = at::get_num_threads();
  const bool by_expert = threads > 1 && static_cast<int64_t>(active.size()) >= 2 * threads &&
                         P > kByExpertMinRows * static_cast<int64_t>(active.size());
  at::Tensor rows_t = by_expert ? at::empty({P, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  float* rows = by_expert ? rows_t.data_ptr<float>() : nullptr;
  auto run = [&](int64_t e) {
    const int64_t M = start[e + 1] - start[e];
    const uint8_t* we = w13p + e * 2 * I * H;
    const float* se = s13p + e * s13[1] * s13_cols;
    const Part gate{we, I, H, se, bn, bk};
    const Part up{we + I * H, I, H, se + s13_rows * s13_cols, bn, bk};
    const Part down{w2p + e * H * I, H, I, s2p + e * s2[1] * (bn ? s2[2] : 1), bn, bk};
    float* ro = rows ? rows + start[e] * H : nullptr;
    if (x.scalar_type() == at::kBFloat16)
      run_expert<c10::BFloat16>(a, xc.data_ptr<c10::BFloat16>(), gate, up, fused13, down, tok.data() + start[e],
                                wt.data() + start[e], M, out32.data_ptr<float>(), ro);
    else
      run_expert<c10::Half>(a, xc.data_ptr<c10::Half>(), gate, up, fused13, down, tok.data() + start[e],
                            wt.data() + start[e], M, out32.data_ptr<float>(), ro);
  };
  if (!by_expert) {
    for (const int64_t e : active) run(e);
  } else {
    // Inside this region the kernels' own parallel_for calls run inline on the calling thread.
    at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) run(active[i]);
    });
    float* o = out32.data_ptr<float>();
    at::parallel_for(0, H, 256, [&](int64_t n0, int64_t n1) {
      for (int64_t q = 0; q < P; ++q)  // expert order, then token order: the serial path's
        for (int64_t n = n0; n < n1; ++n) o[tok[q] * H + n] += rows[q * H + n];
    });
  }
  return out32.to(x.scalar_type());
}

}  // namespace fp8_backend
