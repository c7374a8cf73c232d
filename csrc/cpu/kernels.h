// Internal interface between the op layer (ops.cpp) and the W8A16 CPU kernels.
//
// Every kernel computes raw fp32 dot products with the unscaled FP8 values,
//     D[m, n] = sum_k x[m, k] * fp8_value(w[n, k])      for n in [n0, n1), m in [0, M)
// and the op layer applies the epilogue (scale, bias, rounding to bf16/fp16), exactly as
// numerics.w8a16_linear defines it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "isa.h"

namespace fp8_backend {

// x: fp32 rows of stride ldx (>= K rounded up to 64, zero-padded), natural k order, except
// gemv_avx512_vbmi which wants the vbmi_source_index order within each 64-block.
//
// The AVX2 GEMV decodes an FP8 byte to its value times 2^-120 with two shifts and a mask
// (w8a16_avx2.cpp). For the products to stay in fp32's normal range, each staged activation row
// m of x [M, ld] is multiplied in place by 2^s, s = clamp(100 - exponent(amax_m * headroom), 0,
// 126), where headroom bounds any factor applied to the rows later (block scales); then the
// largest product is < 2^-10 and sums stay far from overflow. out_scale[m] = 2^(120 - s), by
// which the GEMV multiplies row m's sums: powers of two, so the results equal unscaled fp32
// arithmetic whenever that stays normal, whatever the other rows hold.
// avx2_prescale's headroom for block scales s[0, n): the largest |s|, at least 1.
inline float block_scale_headroom(const float* s, int64_t n, float headroom = 1.f) {
  for (int64_t i = 0; i < n; ++i) headroom = std::max(headroom, std::fabs(s[i]));
  return headroom;
}

inline void avx2_prescale(float* x, int64_t M, int64_t ld, float headroom, float* out_scale) {
  for (int64_t m = 0; m < M; ++m) {
    float* r = x + m * ld;
    float amax = 0.f;
    bool finite = true;
    for (int64_t i = 0; i < ld; ++i) {
      const float a = std::fabs(r[i]);
      finite = finite && std::isfinite(a);
      amax = a > amax ? a : amax;
    }
    int s = 126;
    if (!finite || !std::isfinite(amax * headroom)) s = 0;
    else if (amax > 0.f) s = std::min(126, std::max(0, 100 - std::ilogb(amax * headroom)));
    const float f = std::ldexp(1.f, s);
    for (int64_t i = 0; i < ld; ++i) r[i] *= f;
    out_scale[m] = std::ldexp(1.f, 120 - s);
  }
}
void gemv_portable(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                   int64_t n0, int64_t n1, float* D, int64_t ldd);
// gemv_avx2 wants x in avx2_source_index order, pre-multiplied by avx2_prescale's 2^s, and
// multiplies row m's sums by out_scale[m] from avx2_prescale.
void gemv_avx2(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
               int64_t n0, int64_t n1, float* D, int64_t ldd, const float* out_scale);
void gemv_avx512(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                 int64_t n0, int64_t n1, float* D, int64_t ldd);
void gemv_avx512_vbmi(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                      int64_t n0, int64_t n1, float* D, int64_t ldd);

// bf16 activations on AMX (w8a16_amx.cpp); see gemm_amx's definition for the layouts.
struct AmxBlocking {
  int64_t mc, nb, kc;  // activation rows per block, weight rows per panel, K per chunk
};
AmxBlocking amx_blocking(int64_t Mp, int64_t K, int64_t N, int threads);
void pack_x_vnni(const uint16_t* x, int64_t M, int64_t K, int64_t ld, int64_t i0, int64_t i1,
                 int64_t Kp, uint32_t* out);
// The op's epilogue fused into the AMX GEMM's last K chunk: y[m, n] = bf16(D[m, n] * scale[n or
// 0] + bias[n]) for m < M, n < N, rounded to nearest even like c10::BFloat16 (NaN -> 0x7FC0).
struct Bf16Epilogue {
  const float* scale;
  bool per_channel;
  const float* bias;  // nullptr: none
  uint16_t* y;        // bf16 [M, N], row stride N
  int64_t M;
};
void gemm_amx(const uint16_t* x, int64_t ldx, int64_t Mp, const uint8_t* w, int64_t N, int64_t K,
              int64_t nb, int64_t kc, int64_t p0, int64_t p1, const float* blk_s, int64_t blk_bn,
              int64_t blk_bk, const Bf16Epilogue& ep);

// Decode rows [n0, n1) of w [N, K] into out (fp32, natural order, row stride K).
void decode_rows_portable(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out);
void decode_rows_avx2(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out);
void decode_rows_avx512(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out);

// Benchmark helpers: XOR of all 64-bit words of p[0, bytes), bytes a multiple of 4096.
uint64_t stream_xor_portable(const uint8_t* p, int64_t bytes);
uint64_t stream_xor_avx2(const uint8_t* p, int64_t bytes);
uint64_t stream_xor_avx512(const uint8_t* p, int64_t bytes);

// The kernel the op runs for (isa, M, N, K, activation dtype, K block of block scales or 0):
// one of "amx_tile_gemm", "gemv_<isa>", "decode_gemm_<isa>" (decode to fp32 + torch's fp32
// GEMM), where <isa> is the fp32-kernel path (avx512_vbmi on amx CPUs). Pure: a function of its
// arguments and of the measured crossovers (and the test overrides) only.
enum class W8a16Kernel : int { amx_tile_gemm, gemv, decode_gemm };
struct W8a16Plan {
  W8a16Kernel kernel;
  CpuIsa fp32_isa;  // the path of the GEMV / decoder
};
W8a16Plan w8a16_plan(CpuIsa isa, int64_t M, int64_t N, int64_t K, bool bf16, int64_t block_k,
                     int64_t small_m_max_override, int64_t amx_min_m_override);
std::string w8a16_plan_name(const W8a16Plan& p);

}  // namespace fp8_backend
