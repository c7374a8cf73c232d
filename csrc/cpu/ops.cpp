// The fp8_backend torch ops on CPU: argument checks, activation staging, the choice between
// the register-blocked GEMV (small M, bandwidth-bound) and decode-then-GEMM (large M,
// compute-bound), and the epilogue (scale, bias, rounding) of numerics.w8a16_linear.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "attention.h"
#include "fp8_e4m3.h"
#include "huge_buffer.h"
#include "kernels.h"
#include "moe_w8a16.h"

namespace fp8_backend {
namespace {

// Test overrides of w8a16_plan's measured crossovers; -1: none.
std::atomic<int64_t> g_small_m_max{-1};
std::atomic<int64_t> g_amx_min_m{-1};

// The fp32-activation kernels (GEMV, decode + fp32 GEMM): the amx path runs the VBMI ones there
// (small M, fp16 activations, block sizes the tile GEMM does not take).
CpuIsa fp32_isa(CpuIsa isa) { return isa > CpuIsa::avx512_vbmi ? CpuIsa::avx512_vbmi : isa; }

// Largest M for the GEMV on the avx2 and portable paths: crossovers with decode + torch's fp32
// GEMM measured with benchmarks/bench_w8a16.py's method (numbers in RESULTS.md, w8a16_avx2).
// The scalar GEMV loses to decode + GEMM from M = 1, so the portable path always decodes.
constexpr int64_t kAvx2SmallMMax = 32;
constexpr int64_t kPortableSmallMMax = 0;

constexpr int64_t kBlock = 64;  // GEMV k-block; activations are zero-padded to a multiple

// Activations -> fp32 [M, Kp] (Kp = K rounded up to 64, zero tail), in the order the GEMV's
// decoder of `isa` produces weights (vbmi_source_index / avx2_source_index within blocks).
template <typename T>
void stage_activations(const at::Tensor& x2, int64_t Kp, CpuIsa isa, float* out) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const T* src = x2.data_ptr<T>();
  const int lanes = isa == CpuIsa::avx512_vbmi ? 16 : isa == CpuIsa::avx2 ? 8 : 0;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* s = src + m * K;
      float* o = out + m * Kp;
      if (lanes == 0) {
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(s[k]);
        std::fill(o + K, o + Kp, 0.f);
        continue;
      }
      for (int64_t b = 0; b < Kp; b += 4 * lanes)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < lanes; ++l) {
            const int64_t k = b + gemv_source_index(lanes, j, l);
            o[b + lanes * j + l] = k < K ? static_cast<float>(s[k]) : 0.f;
          }
    }
  });
}

// out_scale: gemv_avx2's (avx2_prescale); the other paths read unscaled activations.
void gemv_dispatch(CpuIsa isa, const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                   int64_t N, float* D, const float* out_scale) {
  // Parallel over blocks of 4 output rows; aim for >= ~64k multiply-adds per task.
  const int64_t nblk = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 4 * K * M));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4);
    switch (fp32_isa(isa)) {
      case CpuIsa::avx512_vbmi: gemv_avx512_vbmi(x, ldx, M, w, K, n0, n1, D, N); break;
      case CpuIsa::avx512: gemv_avx512(x, ldx, M, w, K, n0, n1, D, N); break;
      case CpuIsa::avx2: gemv_avx2(x, ldx, M, w, K, n0, n1, D, N, out_scale); break;
      default: gemv_portable(x, ldx, M, w, K, n0, n1, D, N); break;
    }
  });
}


// Large M: decode blocks of weight rows to fp32 (raw FP8 values, exact) and multiply with
// torch's fp32 GEMM; the decode is O(N*K), amortized over M.
struct BlockScales {  // 128x128-style block scales: s[n / bn][k / bk], row stride kb
  const float* s = nullptr;
  int64_t bn = 0, bk = 0, kb = 0;
  explicit operator bool() const { return s != nullptr; }
};

void decode_gemm(CpuIsa isa, const at::Tensor& x2, const uint8_t* w, int64_t K, int64_t N,
                 at::Tensor& D, const BlockScales& blk) {
  const at::Tensor xf = x2.to(at::kFloat);
  const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(64, ((int64_t(1) << 20) / K) & ~int64_t(15)));
  at::Tensor wbuf = at::empty({nb, K}, x2.options().dtype(at::kFloat));
  float* wb = wbuf.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t rows = std::min(nb, N - n0);
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      switch (fp32_isa(isa)) {
        case CpuIsa::portable: decode_rows_portable(w + n0 * K, K, r0, r1, wb + r0 * K); break;
        case CpuIsa::avx2: decode_rows_avx2(w + n0 * K, K, r0, r1, wb + r0 * K); break;
        default: decode_rows_avx512(w + n0 * K, K, r0, r1, wb + r0 * K); break;
      }
      if (blk) {  // dequantize: value * s[n / bn][k / bk]
        for (int64_t r = r0; r < r1; ++r) {
          const float* sr = blk.s + ((n0 + r) / blk.bn) * blk.kb;
          float* o = wb + r * K;
          for (int64_t k = 0; k < K; ++k) o[k] *= sr[k / blk.bk];
        }
      }
    });
    at::Tensor Dn = D.narrow(1, n0, rows);
    at::mm_out(Dn, xf, wbuf.narrow(0, 0, rows).t());
  }
}

// Block scales at small M: y[n] = sum_kb s[nb][kb] * sum_{k in kb} x[k] w[n][k]
//                               = sum_k (x[k] * s[nb][k / bk]) * w[n][k],
// so each block of bn weight rows runs the plain GEMV on its own copy of the staged activations
// scaled per K block (bk a multiple of 64: one scale per 64-wide staging block, whatever the lane
// order). The extra work is M*K multiplies per bn rows, against M*K*bn multiply-adds.
void gemv_block_dispatch(CpuIsa isa, const float* xs, int64_t Kp, int64_t M, const uint8_t* w,
                         int64_t K, int64_t N, float* D, const BlockScales& blk, const float* out_scale) {
  const int64_t nblocks = (N + blk.bn - 1) / blk.bn;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor xb = at::empty({M, Kp}, at::TensorOptions().dtype(at::kFloat));  // 64-byte aligned
    float* xp = xb.data_ptr<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const float* sr = blk.s + b * blk.kb;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k0 = 0; k0 < Kp; k0 += kBlock) {
          const float sc = sr[std::min(k0, K - 1) / blk.bk];
          for (int64_t j = 0; j < kBlock; ++j) xp[m * Kp + k0 + j] = xs[m * Kp + k0 + j] * sc;
        }
      const int64_t n0 = b * blk.bn, n1 = std::min(N, n0 + blk.bn);
      switch (fp32_isa(isa)) {
        case CpuIsa::avx512_vbmi: gemv_avx512_vbmi(xp, Kp, M, w, K, n0, n1, D, N); break;
        case CpuIsa::avx512: gemv_avx512(xp, Kp, M, w, K, n0, n1, D, N); break;
        case CpuIsa::avx2: gemv_avx2(xp, Kp, M, w, K, n0, n1, D, N, out_scale); break;
        default: gemv_portable(xp, Kp, M, w, K, n0, n1, D, N); break;
      }
    }
  });
}

// The bias as contiguous fp32 (the epilogue adds it in fp32); undefined when there is none.
at::Tensor bias_fp32(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

template <typename T>
void epilogue(const at::Tensor& D, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
              at::Tensor& y) {
  const int64_t M = D.size(0), N = D.size(1), ldd = D.stride(0);
  const float* d = D.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  const bool per_channel = scale.numel() != 1;
  const at::Tensor bf = bias_fp32(bias);
  const float* b = bf.defined() ? bf.data_ptr<float>() : nullptr;
  T* out = y.data_ptr<T>();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float v = d[m * ldd + n] * s[per_channel ? n : 0];  // scale the fp32 sum, as numerics.py
        if (b) v += b[n];
        out[m * N + n] = static_cast<T>(v);  // round to nearest even
      }
  });
}

at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                        const std::optional<at::Tensor>& bias, at::OptionalIntArrayRef block_size) {
  const char* op = "fp8_backend.w8a16_linear";
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), op,
              ": CPU tensors expected; found x on ", x.device(), ", weight on ", w.device(),
              ", scale on ", scale.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": activations x must be bfloat16 or float16 (W8A16 keeps activations 16-bit); found ",
              x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn, op, ": weight must be float8_e4m3fn; found ",
              w.scalar_type());
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D [N, K]; found shape ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), op, ": weight must be contiguous (use w8a16_prepack)");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.size(-1) == K, op, ": x has K=", x.size(-1), " (shape ", x.sizes(),
              "), weight has K=", K, " (shape ", w.sizes(), ")");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": weight scale must be float32; found ",
              scale.scalar_type());
  BlockScales blk;
  if (block_size.has_value()) {
    const auto bs = *block_size;
    TORCH_CHECK(bs.size() == 2 && bs[0] > 0 && bs[1] > 0, op,
                ": block_size must be [block_n, block_k] with positive sizes; found ", bs);
    blk.bn = bs[0];
    blk.bk = bs[1];
    blk.kb = (K + blk.bk - 1) / blk.bk;
    const int64_t nb = (N + blk.bn - 1) / blk.bn;
    TORCH_CHECK(scale.dim() == 2 && scale.size(0) == nb && scale.size(1) == blk.kb, op,
                ": block scales for weight [", N, ", ", K, "] and block_size [", blk.bn, ", ", blk.bk,
                "] must have shape [", nb, ", ", blk.kb, "] (partial last blocks included); found ",
                scale.sizes());
  } else {
    TORCH_CHECK(scale.numel() == 1 || scale.numel() == N, op,
                ": weight scale must have 1 (per-tensor) or N=", N,
                " (per-channel) elements; found shape ", scale.sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->numel() == N && bias->dim() == 1, op,
                ": bias must be a 1-D CPU tensor of N=", N, " elements; found shape ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point; found ",
                bias->scalar_type());
  }

  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x.options());
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  if (M == 0 || N == 0) return y;

  at::Tensor s = scale.contiguous();
  if (block_size.has_value()) {
    blk.s = s.data_ptr<float>();
    s = at::ones({1}, scale.options());  // block scales are applied inside; the epilogue adds bias
  } else {
    s = s.reshape({-1});
  }
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const CpuIsa isa = selected_cpu_isa();
  const bool bf16 = x2.scalar_type() == at::kBFloat16;
  const W8a16Plan plan = w8a16_plan(isa, M, N, K, bf16, blk ? blk.bk : 0, g_small_m_max.load(), g_amx_min_m.load());
  if (K > 0 && plan.kernel == W8a16Kernel::amx_tile_gemm) {
    // AMX tiles: activations packed into pair-layout B tiles (zero-padded to 32 rows, 64
    // columns), weights decoded into A tiles inside gemm_amx, which also runs the epilogue.
    const int64_t Mp = (M + 31) / 32 * 32, Kp = (K + 63) / 64 * 64;
    // Packed activations: in this thread's huge-page scratch up to 32 MiB (kept between calls),
    // beyond that (long prefills) in a temporary tensor.
    static thread_local HugeBuffer x_scratch;
    const size_t xs_bytes = static_cast<size_t>(Mp * Kp) * 2;
    at::Tensor xs_big;
    uint32_t* xs;
    if (xs_bytes <= (32u << 20)) {
      xs = static_cast<uint32_t*>(x_scratch.get(xs_bytes));
    } else {
      xs_big = at::empty({Mp * Kp}, x2.options());
      xs = reinterpret_cast<uint32_t*>(xs_big.data_ptr());
    }
    at::parallel_for(0, Mp / 16, 1, [&](int64_t i0, int64_t i1) {
      pack_x_vnni(reinterpret_cast<const uint16_t*>(x2.data_ptr()), M, K, K, i0, i1, Kp, xs);
    });
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xs);
    const at::Tensor bf = bias_fp32(bias);
    const AmxBlocking b = amx_blocking(Mp, K, N, at::get_num_threads());
    const int64_t panels = (N + b.nb - 1) / b.nb;
    // Blocks of activation rows: each passes over every weight panel (weights decoded again).
    for (int64_t m0 = 0; m0 < Mp; m0 += b.mc) {
      const int64_t mb = std::min(b.mc, Mp - m0);
      const Bf16Epilogue ep{s.data_ptr<float>(), s.numel() != 1, bf.defined() ? bf.data_ptr<float>() : nullptr,
                            reinterpret_cast<uint16_t*>(y.data_ptr()) + m0 * N, std::min(mb, M - m0)};
      const uint16_t* xb = xp + (m0 / 16) * (Kp / 32) * 512;  // pack_x_vnni tiles of rows m0..
      at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
        gemm_amx(xb, Kp, mb, wp, N, K, b.nb, b.kc, p0, p1, blk ? blk.s : nullptr, blk.bn, blk.bk, ep);
      });
    }
    return y;  // the epilogue ran inside gemm_amx
  }
  // The other paths leave raw fp32 dot products in D for the epilogue below.
  at::Tensor D = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (K == 0) {
    D.zero_();
  } else if (plan.kernel == W8a16Kernel::gemv) {
    const int64_t Kp = (K + kBlock - 1) / kBlock * kBlock;
    at::Tensor xs = at::empty({M, Kp}, x.options().dtype(at::kFloat));
    if (x2.scalar_type() == at::kBFloat16)
      stage_activations<at::BFloat16>(x2, Kp, plan.fp32_isa, xs.data_ptr<float>());
    else
      stage_activations<at::Half>(x2, Kp, plan.fp32_isa, xs.data_ptr<float>());
    std::vector<float> out_scale(static_cast<size_t>(M), 1.f);
    if (plan.fp32_isa == CpuIsa::avx2) {
      // Block scales multiply the staged activations later (gemv_block_dispatch): headroom.
      const float headroom = blk ? block_scale_headroom(blk.s, (N + blk.bn - 1) / blk.bn * blk.kb) : 1.f;
      avx2_prescale(xs.data_ptr<float>(), M, Kp, headroom, out_scale.data());
    }
    if (!blk)
      gemv_dispatch(isa, xs.data_ptr<float>(), Kp, M, wp, K, N, D.data_ptr<float>(), out_scale.data());
    else
      gemv_block_dispatch(isa, xs.data_ptr<float>(), Kp, M, wp, K, N, D.data_ptr<float>(), blk, out_scale.data());
  } else {
    decode_gemm(isa, x2, wp, K, N, D, blk);
  }
  at::Tensor y2 = y.view({M, N});
  if (y.scalar_type() == at::kBFloat16)
    epilogue<at::BFloat16>(D, s, bias, y2);
  else
    epilogue<at::Half>(D, s, bias, y2);
  return y;
}

}  // namespace

// Measured crossovers (benchmarks/bench_w8a16.py and RESULTS.md, 1 thread):
//  * amx_min_m: the AMX tile GEMM beats the VBMI GEMV from 7-8 rows (4096x4096, Sapphire Rapids).
//  * small_m_max: the register-blocked GEMV beats decode + torch's fp32 GEMM up to this M:
//    64 on AVX-512 (2-core Ice Lake-class Xeon, N=K=4096); avx2 32, portable 0 (see above).
W8a16Plan w8a16_plan(CpuIsa isa, int64_t M, int64_t N, int64_t K, bool bf16, int64_t block_k,
                     int64_t small_m_max_override, int64_t amx_min_m_override) {
  (void)N;
  (void)K;
  const CpuIsa f32 = fp32_isa(isa);
  const int64_t amx_min_m = amx_min_m_override >= 0 ? amx_min_m_override : 8;
  if (isa == CpuIsa::amx && bf16 && M >= amx_min_m && (block_k == 0 || block_k % 64 == 0))
    return {W8a16Kernel::amx_tile_gemm, f32};
  int64_t small_m_max;
  switch (f32) {
    case CpuIsa::avx2: small_m_max = kAvx2SmallMMax; break;
    case CpuIsa::portable: small_m_max = kPortableSmallMMax; break;
    default: small_m_max = 64; break;
  }
  if (small_m_max_override >= 0) small_m_max = small_m_max_override;
  // The GEMV applies block scales per 64-wide staging block: K blocks must be multiples of 64.
  if (M <= small_m_max && (block_k == 0 || block_k % kBlock == 0)) return {W8a16Kernel::gemv, f32};
  return {W8a16Kernel::decode_gemm, f32};
}

std::string w8a16_plan_name(const W8a16Plan& p) {
  switch (p.kernel) {
    case W8a16Kernel::amx_tile_gemm: return "amx_tile_gemm";
    case W8a16Kernel::gemv: return std::string("gemv_") + isa_name(p.fp32_isa);
    case W8a16Kernel::decode_gemm: break;
  }
  return std::string("decode_gemm_") + isa_name(p.fp32_isa);
}

std::string w8a16_plan_py(const std::string& isa, int64_t M, int64_t N, int64_t K,
                          const std::string& dtype, int64_t block_k) {
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "w8a16_plan: dtype must be 'bfloat16' or "
              "'float16'; found '", dtype, "'");
  TORCH_CHECK(M >= 0 && N >= 0 && K >= 0 && block_k >= 0, "w8a16_plan: M, N, K, block_k must be >= 0");
  return w8a16_plan_name(w8a16_plan(parse_isa(isa), M, N, K, dtype == "bfloat16", block_k,
                                    g_small_m_max.load(), g_amx_min_m.load()));
}

// For the fused-MoE op (moe_w8a16.h): the same plan overrides as w8a16_linear.
int64_t plan_small_m_max_override() { return g_small_m_max.load(); }
int64_t plan_amx_min_m_override() { return g_amx_min_m.load(); }

// Benchmark helper: read every byte of a contiguous tensor once, split over the intra-op
// threads; each thread streams 4 far-apart regions at once, as the GEMV reads 4 weight rows.
// The machine's attainable streaming read rate, measured with the same threads as the kernels.
int64_t stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.nbytes() % 4096 == 0,
              "stream_read: contiguous tensor of a 4096-byte multiple expected");
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t pages = static_cast<int64_t>(t.nbytes() / 4096);
  std::atomic<uint64_t> total{0};
  at::parallel_for(0, pages, 16, [&](int64_t b0, int64_t b1) {
    const uint8_t* q = p + b0 * 4096;
    const int64_t n = (b1 - b0) * 4096;
    const uint64_t v = isa_supported(CpuIsa::avx512) ? stream_xor_avx512(q, n)
                       : isa_supported(CpuIsa::avx2) ? stream_xor_avx2(q, n)
                                                     : stream_xor_portable(q, n);
    total.fetch_xor(v);
  });
  return static_cast<int64_t>(total.load());
}

// An uninitialized uint8 tensor of nbytes in memory of its own, 2 MiB-aligned and advised to use
// transparent huge pages (weights streamed at M = 1 read ~15% faster from it on Sapphire Rapids:
// fewer TLB misses, and the hardware prefetchers are not stopped at every 4 KiB boundary).
at::Tensor huge_page_empty(int64_t nbytes) {
  TORCH_CHECK(nbytes > 0, "huge_page_empty: nbytes must be positive; found ", nbytes);
  void* p = huge_alloc(static_cast<size_t>(nbytes));
  return at::from_blob(p, {nbytes}, [](void* q) { std::free(q); }, at::TensorOptions().dtype(at::kByte));
}

}  // namespace fp8_backend

TORCH_LIBRARY(fp8_backend, m) {
  m.def("w8a16_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias, int[]? block_size=None) -> Tensor");
  m.def("fused_moe_w8a16(Tensor x, Tensor w13, Tensor w13_scale, Tensor w2, Tensor w2_scale, "
        "Tensor topk_weights, Tensor topk_ids, int[]? block_size=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fp8_backend, CPU, m) {
  m.impl("w8a16_linear", &fp8_backend::w8a16_linear);
  m.impl("fused_moe_w8a16", &fp8_backend::fused_moe_w8a16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fp8-backend CPU kernels (ops are registered as torch.ops.fp8_backend.*)";
  // The CPU path registry (isa.h), one for linear, MoE and attention.
  m.def("cpu_isas", []() {
    std::vector<std::string> names;
    for (int i = fp8_backend::kNumCpuIsas - 1; i >= 0; --i)
      names.push_back(fp8_backend::isa_name(static_cast<fp8_backend::CpuIsa>(i)));
    return names;
  }, "Every CPU code path, most capable first");
  m.def("cpu_isa", []() { return std::string(fp8_backend::isa_name(fp8_backend::selected_cpu_isa())); },
        "The CPU code path every op runs (FP8_BACKEND_CPU_ISA or the best supported, on first use)");
  m.def("set_cpu_isa", [](const std::string& name) {
    return std::string(fp8_backend::isa_name(fp8_backend::select_cpu_isa(name)));
  }, "Select auto|amx|avx512_vbmi|avx512|avx2|portable for every op; returns the path selected");
  m.def("cpu_isa_supported", [](const std::string& name) {
    return fp8_backend::isa_supported(fp8_backend::parse_isa(name));
  }, "Whether this CPU can run a path");
  m.def("attention_path", &fp8_backend::selected_attention_path, pybind11::arg("head_size"),
        pybind11::arg("cache_dtype"),
        "The paged-attention kernel for this head size and cache dtype (torch dtype name: uint8, "
        "float8_e4m3fn, float8_e5m2, bfloat16, float16, float32) on the selected CPU path");
  m.def("set_small_m_max", [](int64_t v) { fp8_backend::g_small_m_max.store(v); },
        "Test override: largest M served by the GEMV kernel (larger M: decode + fp32 GEMM); -1: "
        "the measured crossover (w8a16_plan)");
  m.def("stream_read", &fp8_backend::stream_read, "Benchmark helper: read a tensor once");
  m.def("huge_page_empty", &fp8_backend::huge_page_empty,
        "An uninitialized uint8 tensor in 2 MiB-aligned memory advised to use transparent huge pages");
  m.def("small_m_max", []() { return fp8_backend::g_small_m_max.load(); });
  m.def("set_amx_min_m", [](int64_t v) { fp8_backend::g_amx_min_m.store(v); },
        "Test override: smallest M served by the AMX tile GEMM (bf16 activations, amx path); -1: "
        "the measured crossover (w8a16_plan)");
  m.def("amx_min_m", []() { return fp8_backend::g_amx_min_m.load(); });
  m.def("w8a16_plan", &fp8_backend::w8a16_plan_py, pybind11::arg("isa"), pybind11::arg("M"),
        pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("dtype"), pybind11::arg("block_k") = 0,
        "The kernel w8a16_linear runs for these arguments (path name, M, N, K, 'bfloat16' or "
        "'float16', K block of block scales or 0), with the current test overrides");
}
