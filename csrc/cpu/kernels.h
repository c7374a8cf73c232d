// Internal interface between the op layer (ops.cpp) and the W8A16 CPU kernels.
//
// Every kernel computes raw fp32 dot products with the unscaled FP8 values,
//     D[m, n] = sum_k x[m, k] * fp8_value(w[n, k])      for n in [n0, n1), m in [0, M)
// and the op layer applies the epilogue (scale, bias, rounding to bf16/fp16), exactly as
// numerics.w8a16_linear defines it.
#pragma once

#include <cstdint>
#include <string>

namespace fp8_backend {

// Ordered by capability: each path needs every instruction set of the ones before it.
enum class CpuIsa : int { portable = 0, avx512 = 1, avx512_vbmi = 2, amx = 3 };

const char* isa_name(CpuIsa isa);
bool isa_supported(CpuIsa isa);
CpuIsa best_isa();

// x: fp32 rows of stride ldx (>= K rounded up to 64, zero-padded), natural k order, except
// gemv_avx512_vbmi which wants the vbmi_source_index order within each 64-block.
void gemv_portable(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K,
                   int64_t n0, int64_t n1, float* D, int64_t ldd);
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
void decode_rows_avx512(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, float* out);

// Benchmark helpers: XOR of all 64-bit words of p[0, bytes), bytes a multiple of 4096.
uint64_t stream_xor_portable(const uint8_t* p, int64_t bytes);
uint64_t stream_xor_avx512(const uint8_t* p, int64_t bytes);

}  // namespace fp8_backend
